"""What the ASE calculator, the matminer featurizer and the CLI share: loading models for
inference and naming their targets.

Training target names come from the datasets (``e_form``, ``bandgap``, ``k_vrh``, JARVIS's
``formation_energy_peratom`` ...). Downstream users should not need to know which dataset a
model was trained on, so every target gets one stable, ASE-style property name and a unit
(``formation_energy_per_atom`` in eV/atom, ``band_gap`` in eV, ``bulk_modulus_vrh`` in GPa).
Names we do not know pass through unchanged.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import BACKBONE_ROLE, COMMITTEE_FILE, is_backbone, list_models, load_model, model_role
from .committee import Committee
from .config import TargetSpec
from .errors import CheckpointError
from .model import Crystalformer

#: The paper, as its authors cite it (github.com/omron-sinicx/crystalformer README).
CRYSTALFORMER_BIBTEX = """@inproceedings{taniai2024crystalformer,
  title     = {Crystalformer: Infinitely Connected Attention for Periodic Structure Encoding},
  author    = {Tatsunori Taniai and Ryo Igarashi and Yuta Suzuki and Naoya Chiba and
               Kotaro Saito and Yoshitaka Ushiku and Kanta Ono},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR 2024)},
  year      = {2024},
  url       = {https://openreview.net/forum?id=fxQiecl9HB}
}"""

DTypeName = Literal["float32", "float64"]
ModelSpec = str | Path | Crystalformer | Committee
#: What a loaded model is: a network, or a committee of them (mean and std).
Model = Crystalformer | Committee

#: Normalised training name -> (property name, unit). Keys are lower case with spaces and
#: hyphens turned into underscores. Distinct quantities keep distinct names (the JARVIS
#: OptB88vdW and TBmBJ gaps are not the MP PBE gap).
TARGET_ALIASES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        ("e_form", "eform", "formation_energy_per_atom", "formation_energy_peratom"),
        ("formation_energy_per_atom", "eV/atom"),
    ),
    **dict.fromkeys(
        ("bandgap", "band_gap", "gap_pbe", "gappbe", "dft_band_gap"), ("band_gap", "eV")
    ),
    "optb88vdw_bandgap": ("band_gap_optb88vdw", "eV"),
    "mbj_bandgap": ("band_gap_mbj", "eV"),
    **dict.fromkeys(
        ("energy_per_atom", "e_total", "total_energy_per_atom"), ("energy_per_atom", "eV/atom")
    ),
    "optb88vdw_total_energy": ("energy_per_atom_optb88vdw", "eV/atom"),
    **dict.fromkeys(
        ("ehull", "e_hull", "e_above_hull", "energy_above_hull"), ("energy_above_hull", "eV/atom")
    ),
    **dict.fromkeys(("k_vrh", "bulk_modulus", "bulk_modulus_vrh"), ("bulk_modulus_vrh", "GPa")),
    **dict.fromkeys(("g_vrh", "shear_modulus", "shear_modulus_vrh"), ("shear_modulus_vrh", "GPa")),
    "bulk_modulus_kv": ("bulk_modulus_voigt", "GPa"),
    "shear_modulus_gv": ("shear_modulus_voigt", "GPa"),
}

#: Names a target may not take: ASE's own properties and the calculator's extras. An
#: energy-type target named "energy" is a per-atom value, not ASE's total energy.
RESERVED_NAMES = frozenset(
    {
        "energy", "free_energy", "forces", "stress", "stresses", "energies", "dipole",
        "charges", "magmom", "magmoms", "dielectric_tensor", "born_effective_charges",
        "polarization", "embedding",
    }
)


@dataclass(frozen=True)
class TargetProperty:
    """One model output as a named property: ``model``/``column`` say where it comes from."""

    name: str  # property name, e.g. "formation_energy_per_atom"
    unit: str  # e.g. "eV/atom"
    model: int  # index into the loaded models
    column: int  # column of that model's (B, T) output
    target: TargetSpec  # the training target it reports


def property_models() -> list[str]:
    """The shipped models that serve properties when no model is named: every findable
    model but the backbones (``checkpoint.BACKBONE_ROLE``)."""
    return [name for name in list_models() if not is_backbone(name)]


def embedding_model() -> str | None:
    """The model whose embedding the featurizer gives when none is named: the first
    shipped backbone (trained on every labelled set), else the first shipped model; None
    when there is none. A shipped model whose header cannot be read raises its
    ``CheckpointError`` here: it may be the backbone, and features from another model
    under the same column names would go unnoticed."""
    names = list_models()
    return next((n for n in names if model_role(n) == BACKBONE_ROLE), names[0] if names else None)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else goes to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: DTypeName | torch.dtype) -> torch.dtype:
    """float64 is for finite-difference checks and phonons; float32 for everything else."""
    choices = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, torch.dtype) and dtype in choices.values():
        return dtype
    if dtype in choices:
        return choices[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported; use 'float32' or 'float64'")


def model_label(spec: ModelSpec, index: int) -> str:
    """A short name for a model: its shipped name, its checkpoint folder, or model<index>."""
    if isinstance(spec, (Crystalformer, Committee)):
        name = spec.metadata.get("name")
        return str(name) if name else f"model{index}"
    path = Path(spec)
    if path.name == COMMITTEE_FILE:
        return path.parent.name
    if path.suffix == ".safetensors":
        return path.parent.name if path.stem == "model" else path.stem
    return path.name


def load_models(
    spec: ModelSpec | Sequence[ModelSpec] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> list[tuple[str, Model]]:
    """Resolve ``spec`` into labelled models (networks or committees) on ``device``/``dtype``.

    ``None`` means every shipped property model (``property_models``: no backbone). A
    ``Crystalformer`` passed in is used as is when it already sits on ``device``/``dtype``;
    otherwise a copy is moved, so the caller's model is never changed behind its back.
    """
    if spec is None:
        names: list[ModelSpec] = list(property_models())
        if not names:
            backbones = [n for n in list_models() if is_backbone(n)]
            found = f"only the backbone(s) {backbones}, which serve when named" if backbones else "no shipped model"
            raise CheckpointError(
                f"no model given and {found}; pass model=<name, checkpoint path "
                "or Crystalformer>, or point CRYSTALFORMER_MODELS at a folder of checkpoints"
            )
    elif isinstance(spec, (str, Path, Crystalformer, Committee)):
        names = [spec]
    else:
        names = list(spec)
        if not names:
            raise ValueError("model=[] names no model; pass at least one")
    out: list[tuple[str, Model]] = []
    for index, item in enumerate(names):
        if isinstance(item, (Crystalformer, Committee)):
            model = item
            if model.device != device or model.dtype != dtype:
                model = copy.deepcopy(model).to(device=device, dtype=dtype)
        elif isinstance(item, (str, Path)):
            model = load_model(item, device=device).to(dtype=dtype)
        else:
            raise TypeError(
                f"model {index}: expected a model name, a checkpoint path, a Crystalformer or a Committee, "
                f"got {type(item).__name__}"
            )
        out.append((model_label(item, index), model))
    return out


def _sanitise(label: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", label).strip("_") or "model"


def property_name(target: TargetSpec) -> tuple[str, str]:
    """The ASE-style name and unit of one training target (before de-duplication)."""
    base, _, scheme = target.name.partition("@")  # a multi-task label scheme: e_form@megnet
    key = re.sub(r"[\s\-]+", "_", base.strip().lower())
    name, unit = TARGET_ALIASES.get(key, (base, ""))
    if scheme:
        name = f"{name}_{_sanitise(scheme)}" if key in TARGET_ALIASES else target.name
    if name in RESERVED_NAMES:
        name = "energy_per_atom" if target.kind == "energy" else f"{name}_prediction"
    if target.kind == "energy":
        unit = "eV/atom"
    return name, target.unit or unit


def target_properties(models: Sequence[tuple[str, Crystalformer]]) -> list[TargetProperty]:
    """Name every target of every model; a repeated name gets the model's label appended."""
    out: list[TargetProperty] = []
    taken: set[str] = set()
    for m, (label, model) in enumerate(models):
        for column, target in enumerate(model.config.targets):
            name, unit = property_name(target)
            if name in taken:
                base = f"{name}_{_sanitise(label)}"
                name, k = base, 2
                while name in taken:
                    name, k = f"{base}_{k}", k + 1
            taken.add(name)
            out.append(TargetProperty(name, unit, m, column, target))
    return out


def std_property(prop: TargetProperty) -> tuple[str, str]:
    """Name and unit of a committee's std of ``prop`` (``<name>_std``): in the target's
    training space, so log10 units for a log10 target (``committee`` module)."""
    if prop.target.transform == "log10":
        return f"{prop.name}_std", f"log10({prop.unit})" if prop.unit else "log10"
    return f"{prop.name}_std", prop.unit


@contextmanager
def eval_mode(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Evaluate in eval mode and restore each model's own mode afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def describe_models(models: Sequence[tuple[str, Any]]) -> str:
    """'a, b' for error messages."""
    return ", ".join(label for label, _ in models) or "none"
