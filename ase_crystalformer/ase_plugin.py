"""Entry point for ASE's plugin registry (``ase.plugins`` group, ASE's experimental ``ase._4``).

ASE versions with the registry read ``__ase_plugins__`` from this module, which lists the
calculator under the name ``crystalformer``; the class itself is imported by name only when
ASE asks for it (loading this module still imports the package, hence torch). Older ASE versions never load this module; if one does and lacks ``ase._4.plugins``, the
set is empty, so registration can never break an import. Declared in ``pyproject.toml``:

    [project.entry-points."ase.plugins"]
    crystalformer = "ase_crystalformer.ase_plugin"
"""

from __future__ import annotations

from typing import Any

__ase_plugins__: set[Any]

try:
    from ase._4.plugins.plugin import CalculatorPlugin
except ImportError:  # ASE without the plugin system: nothing to register
    __ase_plugins__ = set()
else:
    __ase_plugins__ = {
        CalculatorPlugin(
            name="crystalformer",
            citation="Taniai et al., Crystalformer: Infinitely Connected Attention for "
            "Periodic Structure Encoding, ICLR 2024",
            implementation="ase_crystalformer.calculator.CrystalformerCalculator",
        )
    }
