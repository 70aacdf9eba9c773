"""Bulk moduli of a potential by isotropic strain, and the DFT moduli a potential learns them from.

Why this exists: potentials trained on our ~5k DFT frames and the relaxed MP structures came out
about 7× too soft (diamond Si 13 GPa, NaCl 9.5 GPa against DFT's ~90 and ~25). A soft energy
surface fails every near-equilibrium check at once: a stress error P moves a relaxed volume by
ΔV/V ≈ P/B, and phonons scale with the square root of the curvature. Energies, forces and
stresses constrain the first derivatives; the MP elastic data (``mp-elastic``, thousands of
DFT bulk moduli at DFT-relaxed cells) is the curvature data we have, so the potential's loss can
include B.

B = V d²E/dV² comes from three energies of the structure scaled by (1 + s), s ∈ {−h, 0, h}:
with V(s) = V₀(1 + s)³, d²E/ds² = 9V₀²E'' − 6V₀P at s = 0, so
B = (E₊ + E₋ − 2E₀)/(9V₀h²) + (2/3)P with P = −(E₊ − E₋)/(6V₀h), exact to O(h²) also off
equilibrium. Plain forward passes: training on B needs one backward, not a double one. The
window (which images exist) stays fixed across the three strains, as in ``forces``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from ase.units import GPa

from .forces import energy_target_index
from .geometry import Batch, Window, collate
from .model import Crystalformer

#: Isotropic linear strain of the central differences (volume ±3 %).
STRAIN = 0.01
#: The floor of the relative error |B − B_DFT| / (B_DFT + FLOOR): soft materials (B of a few
#: GPa, where DFT moduli are least certain) do not dominate the loss.
FLOOR = 10 * GPa


@dataclass
class ModulusExample:
    """One structure with its DFT bulk modulus (eV/Å³)."""

    id: str
    window: Window
    bulk_modulus: float


def bulk_modulus(model: Crystalformer, batch: Batch, strain: float = STRAIN) -> torch.Tensor:
    """The model's bulk modulus (B,) in eV/Å³ at each crystal's cell (module docstring)."""
    index = energy_target_index(model)
    n = batch.n_atoms.to(batch.positions.dtype)
    energies = []
    for s in (-strain, 0.0, strain):
        scaled = replace(batch, positions=batch.positions * (1 + s), cells=batch.cells * (1 + s))
        energies.append(model.targets(model(scaled))[:, index] * n)
    e_minus, e_zero, e_plus = energies
    volume = torch.linalg.det(batch.cells).abs()
    pressure = -(e_plus - e_minus) / (6 * volume * strain)
    return (e_plus + e_minus - 2 * e_zero) / (9 * volume * strain**2) + 2 / 3 * pressure


def relative_errors(model: Crystalformer, examples: list[ModulusExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's bulk moduli of ``examples`` (eV/Å³) and their errors relative to DFT
    (``FLOOR`` added to the denominator), both (B,)."""
    batch = collate([e.window for e in examples], model.dtype).to(model.target_mean.device)
    target = torch.as_tensor(np.array([e.bulk_modulus for e in examples]), dtype=model.dtype,
                             device=batch.positions.device)
    predicted = bulk_modulus(model, batch)
    return predicted, (predicted - target).abs() / (target + FLOOR)
