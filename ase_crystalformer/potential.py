"""The Crystalformer potential: a model trained on DFT energies, forces and stresses.

Everything that makes a potential rather than a property regressor lives here:

* the data: extxyz frames with total energy, forces and stress (one DFT setup per
  ``info["source"]``), plus DFT-relaxed structures whose formation energy per atom × N is one
  more source and whose forces and stress are zero at equilibrium;
* the split, by material (trajectory) id, never frame by frame: a material that the MEGNet
  leaderboard split lists keeps that split (its val/test stay out of training), any other goes
  to train/val/test by a hash of its id;
* per-source, per-element reference energies μ: the sources differ in code, correction scheme
  and zero of energy (a formation energy is a total energy minus elemental references). By
  default (``REFERENCE_SCALES`` "aligned") every source is put on MP's formation-energy scale:
  the relaxed structures' formation energies are the scale itself (μ = 0), and each total-energy
  source's μ are fitted by least squares as E/N − ê ≈ Σ_el x_el μ_{s,el} on its training
  frames, ê the shipped ``FORMATION_SOURCE`` model's formation energy of the frame. The network
  then learns one residual for all sources, about the formation energy plus the frame's energy
  above its relaxed structure. ("linear": each source fitted as E/N ≈ Σ x μ_s on its own, which
  leaves residuals of the same material that disagree between sources by ~0.5 eV/atom, because
  each fit absorbs a different composition-linear part of the formation energies;
  scripts/reference_consistency.py measures it.)
* the reported energy: network + Σ n μ of ``DEFAULT_SOURCE`` (MPtrj, i.e. MP-compatible PBE(+U)
  total energies); elements that source never saw take the pooled fit over all total-energy
  sources. Forces and stress do not depend on μ;
* the training loop (``training.Trainer`` with force-aware validation and sub-epochs) and the
  name of the shipped potential, ``DEFAULT_POTENTIAL``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from ase.units import GPa
from ase.stress import voigt_6_to_full_3x3_stress

from .checkpoint import load_model, model_path, read_checkpoint
from .config import ModelConfig, TargetSpec, TrainConfig
from .data import load_dataset
from .domain import OutOfDomainWarning, training_domain
from .elastic import ModulusExample, relative_errors
from .errors import CheckpointError, DataError, StructureError
from .forces import energy_forces_stress
from .geometry import build_window, windows_for
from .inference import resolve_device
from .model import Crystalformer
from .rundir import run_directory
from .training import Example, Trainer, _to_batch, ids_digest, write_json

log = logging.getLogger(__name__)

#: The shipped potential that ``CrystalformerCalculator()`` uses for energy, forces and stress.
DEFAULT_POTENTIAL = "dft-pes"
#: The source whose references the reported energy uses: MPtrj (MP-compatible total energies).
DEFAULT_SOURCE = "mptrj"
#: Source name of the relaxed structures' formation energies (eV/atom × N).
FORMATION_SOURCE = "mp-e_form"
#: ``info["source"]`` of the extxyz frames → reference-energy source.
SOURCE_NAMES = {"MPtrj": "mptrj", "Alexandria": "alexandria", "Internal": "mattersim"}
#: The ``info`` key that names a frame's material or trajectory, by preference.
GROUP_KEYS = ("mptrj_traj_id", "alexandria_id", "internal_id")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
#: The energy target of a potential: the residual energy per atom after the references.
ENERGY_TARGET = TargetSpec("energy", "eV/atom", kind="energy")
#: Ridge weight (eV², per atom) that keeps an element seen in few frames near the pooled μ.
RIDGE = 1e-3
#: How reference energies are fitted (see the module docstring); the first is the default.
REFERENCE_SCALES = ("aligned", "linear")


@dataclass
class Frame:
    """One labelled structure of a potential's data set.

    ``energy`` is the source's total energy in eV (for ``FORMATION_SOURCE``: formation energy
    per atom × N); ``forces`` (n, 3) eV/Å and ``stress`` (3, 3) eV/Å³ in ASE's sign convention.
    """

    id: str  # unique: file stem and frame index, or the MP id
    group: str  # the split unit: material / trajectory id
    source: str  # reference-energy source
    file: str  # where it came from, for per-file reports
    atoms: Atoms
    energy: float
    forces: np.ndarray
    stress: np.ndarray


# ------------------------------------------------------------------------------- reading
def read_frames(path: str | Path) -> list[Frame]:
    """Every frame of one extxyz file with energy, forces and stress (``DataError`` otherwise)."""
    from ase.io import read

    path = Path(path)
    first = read(path, index=0, format="extxyz")
    raw = first.info.get("source")
    if raw not in SOURCE_NAMES:
        raise DataError(f"{path}: info['source'] is {raw!r}; known sources: {sorted(SOURCE_NAMES)}")
    key = next((k for k in GROUP_KEYS if k in first.info), None)
    if key is None:
        raise DataError(f"{path}: frames carry no material/trajectory id (one of {list(GROUP_KEYS)})")
    dataset = load_dataset(path, ["energy"], id_column=key, split="ratio")
    if dataset.skipped:
        log.warning("%s: skipped %d frames: %s", path, len(dataset.skipped), dataset.skipped[:3])
    frames = []
    for index, record in enumerate(dataset.records):
        if record.forces is None or record.stress is None:
            raise DataError(f"{path}: frame {index} ({record.id}) lacks forces or stress")
        frames.append(
            Frame(f"{path.stem}#{index}", record.id, SOURCE_NAMES[raw], path.name, record.atoms,
                  record.targets["energy"], record.forces, voigt_6_to_full_3x3_stress(record.stress))
        )
    return frames


def read_relaxed(data_dir: str | Path) -> tuple[list[Frame], dict[str, str]]:
    """The DFT-relaxed MP structures (``mp-megnet``) as frames of ``FORMATION_SOURCE`` with
    zero forces and stress, and the MEGNet leaderboard split of every listed id."""
    dataset = load_dataset("mp-megnet", ["e_form"], data_dir=data_dir)
    split_of = {dataset.records[i].id: name for name, rows in dataset.splits.items() for i in rows}
    frames = []
    for record in dataset.records:
        n = len(record.atoms)
        frames.append(
            Frame(record.id, record.id, FORMATION_SOURCE, "mp-megnet", record.atoms,
                  record.targets["e_form"] * n, np.zeros((n, 3)), np.zeros((3, 3)))
        )
    return frames, split_of


def read_all(data_dir: str | Path) -> tuple[list[Frame], dict[str, str]]:
    """Every frame of ``<data_dir>/forces/*.xyz`` followed by the relaxed MP structures."""
    files = sorted((Path(data_dir) / "forces").glob("*.xyz"))
    if not files:
        raise DataError(f"{data_dir}: no forces/*.xyz files")
    frames = [f for path in files for f in read_frames(path)]
    relaxed, split_of = read_relaxed(data_dir)
    return frames + relaxed, split_of


# -------------------------------------------------------------------------------- split
def _unit_interval(text: str) -> float:
    """A deterministic number in [0, 1) from a string (platform and seed independent)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_frames(
    frames: Sequence[Frame], fixed: dict[str, str], fractions: tuple[float, float, float] = SPLIT_FRACTIONS
) -> dict[str, list[int]]:
    """Indices of train/val/test by material: ``fixed`` (id → split) wins, others by hash.

    All frames of one group (and so one trajectory or material, across sources) share a split.
    """
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for index, frame in enumerate(frames):
        splits[_split_of(frame.group, fixed, fractions)].append(index)
    return splits


def _split_of(group: str, fixed: dict[str, str], fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> str:
    """The split ``split_frames`` gives a frame of material ``group``."""
    name = fixed.get(group)
    if name is None:
        u = _unit_interval(group)
        name = "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"
    return name


def modulus_examples(
    data_dir: str | Path, fixed: dict[str, str], cutoff: float, max_val: int = 200
) -> tuple[list[ModulusExample], list[ModulusExample]]:
    """DFT bulk moduli (``mp-elastic``'s K_VRH, in eV/Å³) for training and validation.

    Training takes a structure only where both mp-elastic's split (the shipped moduli models'
    split) and this potential's split of its material say train, and never a MEGNet
    leaderboard val/test id; validation: mp-elastic val, not test anywhere, at most ``max_val``
    chosen by hash. K_VRH is the Voigt-Reuss-Hill average, ``elastic.bulk_modulus`` the
    isotropic-strain (Voigt) one: equal for cubic crystals, a few per cent apart for most others."""
    from .data.multitask import holdout_ids

    dataset = load_dataset("mp-elastic", ["k_vrh"], data_dir=data_dir)
    held = holdout_ids(data_dir)
    leaderboard = held["mp-megnet val"] | held["mp-megnet test"]
    chosen: dict[str, list[int]] = {"train": [], "val": []}
    for name, rows in dataset.splits.items():
        for i in rows:
            rid = dataset.records[i].id
            own = _split_of(rid, fixed)
            if name == "train" and own == "train" and rid not in leaderboard:
                chosen["train"].append(i)
            elif name == "val" and own != "test" and rid not in held["mp-megnet test"]:
                chosen["val"].append(i)
    chosen["val"] = sorted(chosen["val"], key=lambda i: _unit_interval(dataset.records[i].id))[:max_val]
    out = {}
    for name, rows in chosen.items():
        records = [dataset.records[i] for i in rows]
        windows = windows_for([r.atoms for r in records], cutoff)
        out[name] = [ModulusExample(r.id, w, r.targets["k_vrh"] * GPa) for r, w in zip(records, windows, strict=True)]
    return out["train"], out["val"]


# --------------------------------------------------------------------- reference energies
@dataclass(frozen=True)
class References:
    """Per-source, per-element reference energies μ (eV/atom), and the default source.

    ``pooled`` is one fit over every total-energy source; it is the prior each source's fit
    is pulled towards and the fallback of the default source for elements it never saw.
    """

    sources: dict[str, dict[int, float]]
    pooled: dict[int, float]
    default: str = DEFAULT_SOURCE
    scale: str = "linear"  # one of REFERENCE_SCALES

    def mu(self, source: str | None = None) -> dict[int, float]:
        """μ of ``source`` (default: the default source, completed by the pooled fit)."""
        if source is None:
            return {**self.pooled, **self.sources.get(self.default, {})}
        return self.sources[source]

    def energy(self, numbers: np.ndarray, source: str | None = None) -> float:
        """Σ_i μ(Z_i) in eV; ``DataError`` for an element without a reference."""
        mu = self.mu(source)
        missing = sorted({int(z) for z in numbers} - set(mu))
        if missing:
            names = [chemical_symbols[z] for z in missing]
            raise DataError(f"no reference energy for {names} in source {source or self.default!r}")
        return float(sum(mu[int(z)] for z in numbers))

    def to_dict(self) -> dict[str, Any]:
        def named(mu: dict[int, float]) -> dict[str, float]:
            return {chemical_symbols[z]: round(v, 6) for z, v in sorted(mu.items())}

        return {"default": self.default, "pooled": named(self.pooled),
                "sources": {s: named(mu) for s, mu in sorted(self.sources.items())},
                "scale": self.scale, "unit": "eV/atom"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> References:
        def numbered(mu: dict[str, float]) -> dict[int, float]:
            return {chemical_symbols.index(s): float(v) for s, v in mu.items()}

        return cls({s: numbered(mu) for s, mu in data["sources"].items()},
                   numbered(data["pooled"]), data["default"], data.get("scale", "linear"))


def _fit(frames: Sequence[Frame], prior: dict[int, float] | None, offset: Sequence[float] | None = None
         ) -> dict[int, float]:
    """Least squares on per-atom energies minus ``offset`` (eV/atom, per frame; 0 by default),
    e ≈ Σ x_el μ_el (x: composition fractions), with a ridge term pulling μ towards ``prior``
    (0 where it has none)."""
    elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
    column = {z: k for k, z in enumerate(elements)}
    x = np.zeros((len(frames), len(elements)))
    e = np.empty(len(frames))
    for row, f in enumerate(frames):
        for z in f.atoms.numbers:
            x[row, column[int(z)]] += 1.0 / len(f.atoms)
        e[row] = f.energy / len(f.atoms) - (offset[row] if offset is not None else 0.0)
    mu0 = np.array([(prior or {}).get(z, 0.0) for z in elements])
    # min |x μ - e|² + RIDGE |μ - μ0|²  ⇔  (xᵀx + RIDGE) δ = xᵀ(e - x μ0), μ = μ0 + δ
    lhs = x.T @ x + RIDGE * np.eye(len(elements))
    delta = np.linalg.solve(lhs, x.T @ (e - x @ mu0))
    return {z: float(v) for z, v in zip(elements, mu0 + delta, strict=True)}


def fit_references(
    frames: Sequence[Frame], default: str = DEFAULT_SOURCE, formation: Sequence[float] | None = None
) -> References:
    """Fit μ per source on ``frames`` (the training frames); see ``References``.

    ``formation``: with one formation energy per atom per frame (``formation_estimates``),
    the "aligned" scale: total-energy sources are fitted on E/N minus it, and the
    formation-energy source gets μ = 0. Without: the "linear" scale, each source on its own.
    """
    if formation is not None and len(formation) != len(frames):
        raise ValueError(f"formation has {len(formation)} values for {len(frames)} frames")
    by_source: dict[str, list[int]] = {}
    for k, f in enumerate(frames):
        by_source.setdefault(f.source, []).append(k)

    def fit(rows: list[int], prior: dict[int, float] | None) -> dict[int, float]:
        offset = None if formation is None else [formation[k] for k in rows]
        return _fit([frames[k] for k in rows], prior, offset)

    total = [k for k, f in enumerate(frames) if f.source != FORMATION_SOURCE]
    if not total:
        raise DataError("no total-energy frames to fit reference energies on")
    pooled = fit(total, None)
    sources = {}
    for source, rows in by_source.items():
        if source != FORMATION_SOURCE:
            sources[source] = fit(rows, pooled)
        elif formation is None:
            sources[source] = fit(rows, None)
        else:
            sources[source] = {int(z): 0.0 for k in rows for z in frames[k].atoms.numbers}
    return References(sources, pooled, default, "linear" if formation is None else "aligned")


def formation_estimates(frames: Sequence[Frame], model: Any = None, batch_size: int = 64) -> np.ndarray:
    """Formation energy per atom (eV/atom) of each frame on MP's scale, for ``fit_references``.

    A relaxed structure's own label; otherwise the prediction of ``model`` (default: the
    shipped ``FORMATION_SOURCE`` model) or, for a frame with an element that model never saw
    (its prediction would be noise), a composition-linear fit to the relaxed structures
    among ``frames`` (0 without any).
    """
    out = np.zeros(len(frames))
    relaxed = [k for k, f in enumerate(frames) if f.source == FORMATION_SOURCE]
    for k in relaxed:
        out[k] = frames[k].energy / len(frames[k].atoms)
    linear = _fit([frames[k] for k in relaxed], None) if relaxed else {}
    others = [k for k, f in enumerate(frames) if f.source != FORMATION_SOURCE]
    if not others:
        return out
    model = load_model(FORMATION_SOURCE) if model is None else model
    domain = model.metadata.get("domain") or {}
    known = {chemical_symbols.index(e) for e in domain.get("elements", chemical_symbols[1:])}
    seen = [k for k in others if set(frames[k].atoms.numbers.tolist()) <= known]
    unseen = sorted(set(others) - set(seen))
    if seen:
        with warnings.catch_warnings():  # cell sizes beyond its training set: predicted anyway
            warnings.simplefilter("ignore", OutOfDomainWarning)
            values = np.asarray(model.predict([frames[k].atoms for k in seen], batch_size))
        out[seen] = values.reshape(len(seen), -1)[:, 0]
    for k in unseen:
        numbers = frames[k].atoms.numbers
        out[k] = sum(linear.get(int(z), 0.0) for z in numbers) / len(numbers)
    log.info("formation energies: %d relaxed labels, %d predicted by %s, %d linear (unseen elements)",
             len(relaxed), len(seen), model.metadata.get("name", FORMATION_SOURCE), len(unseen))
    return out


def is_potential(model: Crystalformer) -> bool:
    """Whether ``model`` was trained as a potential (on energies, forces and stresses)."""
    return getattr(model, "metadata", {}).get("kind") == "potential"


def references_of(model: Crystalformer) -> References | None:
    """The reference energies a potential's checkpoint carries (None for other models)."""
    data = getattr(model, "metadata", {}).get("reference_energies")
    return None if data is None else References.from_dict(data)


def reference_per_atom(model: Crystalformer, structures: Sequence[Atoms]) -> np.ndarray | None:
    """Σ n μ / N (eV/atom) per structure for a potential (NaN for an element without a
    reference), to add to its network's energy per atom; None for other models."""
    refs = references_of(model)
    if refs is None:
        return None
    out = np.full(len(structures), np.nan)
    for k, atoms in enumerate(structures):
        try:
            out[k] = refs.energy(atoms.numbers) / len(atoms)
        except DataError:
            pass
    return out


# ------------------------------------------------------------------------------- examples
def trim_relaxed_val(frames: Sequence[Frame], splits: dict[str, list[int]], max_val_relaxed: int) -> dict[str, list[int]]:
    """``splits`` with validation's relaxed MP structures cut to the first ``max_val_relaxed``
    by hash of their ids: a training run's validation set (``train_potential``), which
    ``benchmarks/eval_potential.py --split val`` recomputes."""
    relaxed = sorted((i for i in splits["val"] if frames[i].file == "mp-megnet"), key=lambda i: _unit_interval(frames[i].id))
    keep = set(relaxed[:max_val_relaxed])
    return {**splits, "val": [i for i in splits["val"] if frames[i].file != "mp-megnet" or i in keep]}


def make_examples(
    frames: Sequence[Frame], refs: References, cutoff: float, relaxed_energies: bool = True
) -> tuple[list[Example], list[str]]:
    """Training examples (label: residual energy per atom) and the source of each.

    ``relaxed_energies=False``: the relaxed structures' energy label is NaN (masked in the
    loss), so they teach zero forces and stress only. Why one would: their formation energies
    and MPtrj's total energies of the same materials disagree, after each source's linear
    references, by ~0.5 eV/atom (a composition-dependent correction scheme, not a linear one),
    and the network, which does not know the source, sees both. Measured over 12 sub-epochs
    it did not help (in_training/dft-pes-atoms/README.md), so the default keeps them."""
    examples, sources = [], []
    for f in frames:
        try:
            window = build_window(f.atoms, cutoff, label=f.id)
        except StructureError as err:
            log.warning("skipped %s: %s", f.id, err)
            continue
        if f.source == FORMATION_SOURCE and not relaxed_energies:
            residual = np.nan
        else:
            residual = (f.energy - refs.energy(f.atoms.numbers, f.source)) / len(f.atoms)
        examples.append(Example(f.id, window, np.array([residual]), f.forces, f.stress))
        sources.append(f.file)
    return examples, sources


# ------------------------------------------------------------------------------ training
class PotentialTrainer(Trainer):
    """``Trainer`` with what a potential needs: validation on energy, forces and stress
    (the training loss's terms, also per source file), and sub-epochs of ``steps_per_epoch``
    batches drawn with the relaxed structures down-weighted to ``relaxed_share`` of the draws,
    so that a run on a CPU checkpoints every few minutes."""

    def __init__(self, *args: Any, val_sources: Sequence[str], train_sources: Sequence[str],
                 steps_per_epoch: int, relaxed_share: float,
                 moduli: tuple[list[ModulusExample], list[ModulusExample]] = ([], []),
                 modulus_weight: float = 0.0, modulus_batch: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_sources = list(val_sources)
        self.modulus_train, self.modulus_val = moduli
        self.modulus_weight, self.modulus_batch = modulus_weight, modulus_batch
        relaxed = np.array([s == "mp-megnet" for s in train_sources])
        n_relaxed, n_other = relaxed.sum(), (~relaxed).sum()
        weights = np.ones(len(train_sources))
        if n_relaxed and n_other:
            weights[relaxed] = relaxed_share / (1 - relaxed_share) * n_other / n_relaxed
        self.weights = torch.as_tensor(weights)
        self.steps_per_epoch = steps_per_epoch

    def _batches(self) -> list[list[int]]:
        size = self.config.batch_size
        n = min(self.steps_per_epoch * size, len(self.train_set))
        order = torch.multinomial(self.weights, n, replacement=False, generator=self.generator).tolist()
        return [order[k : k + size] for k in range(0, n - size + 1, size)] or [order]

    def _loss(self, examples: list[Example], batch, y: torch.Tensor) -> torch.Tensor:
        """The energy/force/stress loss plus, with a modulus weight, the mean relative bulk
        modulus error (``elastic``) of ``modulus_batch`` structures drawn afresh each step."""
        loss = super()._loss(examples, batch, y)
        if self.modulus_weight > 0 and self.modulus_train:
            n = len(self.modulus_train)
            draw = torch.randint(n, (min(self.modulus_batch, n),), generator=self.generator).tolist()
            _, error = relative_errors(self.model, [self.modulus_train[i] for i in draw])
            loss = loss + self.modulus_weight * error.mean()
        return loss

    def validate(self, model: Crystalformer | None = None) -> dict[str, float]:
        model = model or self.model
        if not self.val_set:
            return {}
        model.eval()
        c = self.config
        rows = []  # per structure: source, n atoms, |ΔE|/atom, Σ|ΔF|, n F comps, mean |Δσ|
        for k in range(0, len(self.val_set), c.eval_batch_size):
            chunk = self.val_set[k : k + c.eval_batch_size]
            batch, y = _to_batch(chunk, model.dtype, self.device)
            out = energy_forces_stress(model, batch, forces=True, stress=True)
            n = batch.n_atoms.cpu().numpy()
            e = (out["energy"].detach().cpu().numpy() / n) - y[:, 0].cpu().numpy()
            forces = np.split(out["forces"].detach().cpu().numpy(), np.cumsum(n)[:-1])
            stress = out["stress"].detach().cpu().numpy()
            for b, ex in enumerate(chunk):
                rows.append((self.val_sources[k + b], abs(e[b]), np.abs(forces[b] - ex.forces).mean(),
                             np.abs(stress[b] - ex.stress).mean()))
        std = float(model.target_std[0])
        result = _summaries(rows)
        result["val_loss"] = (result["val_mae_energy"] / std + c.force_weight * result["val_mae_forces"]
                              + c.stress_weight * result["val_mae_stress"])
        if self.modulus_val:
            predicted, relative = [], []
            for k in range(0, len(self.modulus_val), c.eval_batch_size):
                with torch.no_grad():
                    b, r = relative_errors(model, self.modulus_val[k : k + c.eval_batch_size])
                predicted.append(b.cpu().numpy())
                relative.append(r.cpu().numpy())
            target = np.array([e.bulk_modulus for e in self.modulus_val])
            result["val_mae_bulk_modulus_gpa"] = float(np.abs(np.concatenate(predicted) - target).mean() / GPa)
            result["val_rel_bulk_modulus"] = float(np.concatenate(relative).mean())
            result["val_loss"] += self.modulus_weight * result["val_rel_bulk_modulus"]
        return result


def _summaries(rows: Sequence[tuple[str, float, float, float]]) -> dict[str, float]:
    """Mean energy (eV/atom), force (eV/Å, per structure) and stress (eV/Å³) errors, overall
    and per source; energies over the structures that have an energy label (a source
    without any gets no energy entry)."""
    result: dict[str, float] = {}
    groups: dict[str, list] = {"": list(rows)}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    for name, group in groups.items():
        values = np.array([r[1:] for r in group])
        suffix = f"/{name}" if name else ""
        for col, what in enumerate(("energy", "forces", "stress")):
            known = values[np.isfinite(values[:, col]), col]
            if len(known):
                result[f"val_mae_{what}{suffix}"] = float(known.mean())
    return result


def default_model_config(**changes: Any) -> ModelConfig:
    """The potential's architecture: smooth (SiLU), 3 blocks of width 64, the 10 Å window,
    energy as a sum of per-atom energies (``readout="atoms"``)."""
    base = ModelConfig(n_blocks=3, d_model=64, n_heads=4, d_ff=256, d_head_mlp=64,
                       activation="silu", readout="atoms", targets=(ENERGY_TARGET,))
    return replace(base, **changes)


#: Pre-activations of a trained ReLU backbone are small (T-Fixup scales), so a smooth
#: activation in place of ReLU changes its outputs a lot: GELU gives formation energies off by
#: ~2 eV/atom. GELU(βx)/β is smooth and within 0.17/β of ReLU; with β = 50 the backbone's
#: e_form@megnet MAE on 300 MEGNet val structures moved from 0.0437 to 0.0451 eV/atom
#: (scripts/backbone_activation.py). (The
#: same function as plain GELU on rescaled weights diverged in its first 150 steps: Adam moves
#: every weight by ~lr, so the weights divided by β moved β times faster.)
BACKBONE_SHARPNESS = 50.0


def from_backbone(backbone: Crystalformer, task: str, target_mean: float, target_std: float,
                  sharpness: float = BACKBONE_SHARPNESS) -> Crystalformer:
    """A smooth potential initialised from a (ReLU) multi-task backbone and its ``task`` head.

    The architecture is ``backbone_potential_config``: every ReLU becomes GELU(βx)/β, the
    weights are the backbone's. The head's last layer keeps ``task``'s row, rescaled from the
    backbone's normalisation of that task to this run's (``target_mean``, ``target_std``), so
    that the network starts from the backbone's estimate of the energy (on the aligned scale:
    the formation energy)."""
    t = _backbone_head(backbone, task)
    std, mean = float(backbone.target_std[t]), float(backbone.target_mean[t])
    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    state["head.2.weight"] = state["head.2.weight"][t : t + 1] * (std / target_std)
    state["head.2.bias"] = (state["head.2.bias"][t : t + 1] * std + mean - target_mean) / target_std
    state["target_mean"] = torch.tensor([target_mean], dtype=state["target_mean"].dtype)
    state["target_std"] = torch.tensor([target_std], dtype=state["target_std"].dtype)
    model = Crystalformer(backbone_potential_config(backbone.config, sharpness)).to(backbone.dtype)
    model.load_state_dict(state)
    return model


def _backbone_head(backbone: Crystalformer, task: str) -> int:
    """The index of ``task``'s head; ``CheckpointError`` if there is none or the backbone is
    not a real-space ReLU model."""
    names = [t.name for t in backbone.config.targets]
    if task not in names:
        raise CheckpointError(f"the backbone has no head {task!r} (it has {names})")
    if backbone.config.activation != "relu" or backbone.config.domain != "real":
        raise CheckpointError("from_backbone expects a real-space ReLU backbone "
                              f"(got activation {backbone.config.activation!r}, domain {backbone.config.domain!r})")
    return names.index(task)


def backbone_potential_config(config: ModelConfig, sharpness: float = BACKBONE_SHARPNESS) -> ModelConfig:
    """The architecture of a potential made by ``from_backbone``: the backbone's, with
    GELU(βx)/β, per-atom energies (``readout="atoms"``) and one energy target."""
    return replace(config, activation="gelu", activation_sharpness=sharpness, readout="atoms",
                   targets=(ENERGY_TARGET,))


def train_potential(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    config: TrainConfig,
    model_config: ModelConfig | None = None,
    steps_per_epoch: int = 150,
    relaxed_share: float = 0.5,
    relaxed_energies: bool = True,
    max_val_relaxed: int = 200,
    references: str = REFERENCE_SCALES[0],
    modulus_weight: float = 0.0,
    modulus_batch: int = 8,
    init_from: str | Path | None = None,
    backbone: str | Path | None = None,
    backbone_task: str = "e_form@megnet",
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    command: str = "",
    progress: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    frames: tuple[list[Frame], dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Train a potential on ``read_all(data_dir)`` (or ``frames``: frames and fixed splits).

    Writes the run directory of ``training.Trainer`` (locked; a used one needs ``resume`` or
    ``overwrite``) plus ``splits.json`` (frame ids per split) and ``references.json``.
    Validation holds the val frames and up to ``max_val_relaxed`` relaxed structures of the
    fixed val split (chosen by hash). ``relaxed_energies``: see ``make_examples``;
    ``references``: one of ``REFERENCE_SCALES`` (module docstring). A resumed run must keep
    its sampling (steps per epoch, relaxed share, relaxed energies, validation size,
    reference scale, modulus weight and batch). ``modulus_weight`` > 0 adds the relative bulk
    modulus error of ``modulus_batch`` mp-elastic structures per step to the loss
    (``modulus_examples``, ``elastic``). ``init_from``: start from this potential's weights (same
    architecture and reference energies), e.g. to add the modulus loss to a trained run.
    ``backbone``: start from a multi-task backbone (name or path) and its ``backbone_task``
    head instead (``from_backbone``; the architecture is the backbone's, ``model_config`` is
    not used).
    """
    if init_from is not None and backbone is not None:
        raise ValueError("give init_from (a potential) or backbone, not both")
    backbone_file = model_path(backbone) if backbone is not None else None
    trunk = read_checkpoint(backbone_file)[0] if backbone_file is not None else None
    if trunk is not None:  # checked before the data are read
        _backbone_head(trunk, backbone_task)
    if references not in REFERENCE_SCALES:
        raise ValueError(f"references must be one of {REFERENCE_SCALES}, got {references!r}")
    sampling = {"steps_per_epoch": steps_per_epoch, "relaxed_share": relaxed_share,
                "relaxed_energies": relaxed_energies, "max_val_relaxed": max_val_relaxed,
                "references": references, "modulus_weight": modulus_weight, "modulus_batch": modulus_batch}
    with run_directory(out_dir, resume=resume, overwrite=overwrite) as run:
        out = run.path
        if run.state is not None:  # before anything in the run directory is rewritten
            _check_sampling(out, sampling)
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        all_frames, fixed = frames if frames is not None else read_all(data_dir)
        splits = trim_relaxed_val(all_frames, split_frames(all_frames, fixed), max_val_relaxed)
        train_frames = [all_frames[i] for i in splits["train"]]
        val_frames = [all_frames[i] for i in splits["val"]]
        formation = formation_estimates(train_frames) if references == "aligned" else None
        refs = fit_references(train_frames, formation=formation)
        # The aligned fit depends on the shipped mp-e_form, which changes between releases: a
        # resumed run keeps its own references and an initialised one its checkpoint's, so
        # that the network's residual energies keep their meaning.
        base = read_checkpoint(Path(init_from))[0] if init_from is not None and run.state is None else None
        if run.state is not None and (out / "references.json").is_file():
            refs = _same_references(refs, References.from_dict(json.loads((out / "references.json").read_text())),
                                    out / "references.json")
        elif base is not None:
            theirs = references_of(base)
            if theirs is None:
                raise CheckpointError(f"{init_from}: not a potential (its metadata holds no reference energies)")
            refs = _same_references(refs, theirs, Path(init_from))
        if trunk is not None:
            model_config = backbone_potential_config(trunk.config)
        model_config = replace(model_config or default_model_config(), targets=(ENERGY_TARGET,))
        moduli = modulus_examples(data_dir, fixed, model_config.cutoff) if modulus_weight > 0 else ([], [])
        train_ex, train_src = make_examples(train_frames, refs, model_config.cutoff, relaxed_energies)
        val_ex, val_src = make_examples(val_frames, refs, model_config.cutoff, relaxed_energies)
        if not train_ex:
            raise DataError("no usable training frame")
        if val_ex and not any(np.isfinite(e.y[0]) for e in val_ex):
            raise DataError("no validation frame has an energy label (only relaxed structures, "
                            "and relaxed_energies=False): validation could not score energies")
        y = np.array([e.y[0] for e in train_ex])
        y = y[np.isfinite(y)]
        if not len(y):
            raise DataError("no training frame with an energy label")
        if trunk is not None:
            model = from_backbone(trunk, backbone_task, float(y.mean()), float(y.std()) or 1.0)
            initial = {**_file_record(backbone_file), "backbone": str(backbone), "task": backbone_task,
                       "sharpness": BACKBONE_SHARPNESS}
        else:
            model = Crystalformer(model_config)
            model.target_mean.fill_(float(y.mean()))
            model.target_std.fill_(float(y.std()) or 1.0)
            initial = _load_initial(model, base, Path(init_from)) if base is not None else None
        split_ids = {k: [all_frames[i].id for i in v] for k, v in splits.items()}
        write_json(split_ids, out / "splits.json")
        write_json(refs.to_dict(), out / "references.json")
        files: dict[str, dict[str, int]] = {}
        for name, rows in splits.items():
            for i in rows:
                files.setdefault(all_frames[i].file, {}).setdefault(name, 0)
                files[all_frames[i].file][name] += 1
        metadata = {
            "kind": "potential",
            "data": {"dir": str(data_dir), "frames_per_file_and_split": files,
                     "split": "by material/trajectory id: MEGNet leaderboard split where it lists the id, "
                              "else sha256(id) into 80/10/10; relaxed MP structures: MEGNet train only"},
            "reference_energies": refs.to_dict(),
            "split_sizes": {k: len(v) for k, v in splits.items()},
            "train_ids_sha256": ids_digest(split_ids["train"]),
            "val_ids_sha256": ids_digest(split_ids["val"]),
            "test_ids_sha256": ids_digest(split_ids["test"]),
            "n_train": len(train_ex),
            "domain": training_domain(e.window.numbers for e in train_ex),
            "train_config": config.to_dict(),
            "sampling": sampling,
            "moduli": {"train": len(moduli[0]), "val": len(moduli[1])},
            "init_from": initial,
            "command": command,
            "hardware": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {device}",
        }
        log.info("potential data: %d train, %d val examples (%.0f s)", len(train_ex), len(val_ex),
                 time.perf_counter() - start)
        trainer = PotentialTrainer(
            model, train_ex, val_ex, config, out, device=resolve_device(device), metadata=metadata,
            progress=progress, on_epoch=on_epoch, val_sources=val_src, train_sources=train_src,
            steps_per_epoch=steps_per_epoch, relaxed_share=relaxed_share, moduli=moduli,
            modulus_weight=modulus_weight, modulus_batch=modulus_batch,
        )
        if run.state is not None:
            trainer.resume(run.state)
        trainer.fit()
        report = {"epochs_run": trainer.epoch, "wall_time_s": round(trainer.wall_time, 1), "n_train": len(train_ex)}
        write_json(report, out / "report.json")
        return report


def _flat(refs: References) -> dict[tuple[str, str], float]:
    data = refs.to_dict()
    return {(s, el): v for s, mu in {**data["sources"], "": data["pooled"]}.items() for el, v in mu.items()}


def _same_references(fitted: References, kept: References, where: Path) -> References:
    """``kept`` (a run's or a checkpoint's references) when it covers the same sources and
    elements as ``fitted`` (this run's data); otherwise a ``CheckpointError``. Values may
    differ (a refit against another mp-e_form): the kept ones are used, and the largest
    difference is logged."""
    theirs, ours = _flat(kept), _flat(fitted)
    if theirs.keys() != ours.keys():
        missing, extra = sorted(ours.keys() - theirs.keys())[:5], sorted(theirs.keys() - ours.keys())[:5]
        raise CheckpointError(f"{where}: its reference energies cover other sources or elements than this run's "
                              f"data (missing {missing}, extra {extra}): not the same data")
    shift = max((abs(theirs[k] - ours[k]) for k in ours), default=0.0)
    if shift > 2e-6:
        log.info("%s: keeping its reference energies (a refit now differs by up to %.4g eV)", where, shift)
    return kept


def _load_initial(model: Crystalformer, base: Crystalformer, path: Path) -> dict[str, str]:
    """Copy the trained potential ``base`` (read from ``path``; its reference energies are
    already this run's) into ``model``; refuse another architecture."""
    if base.config != model.config:
        raise CheckpointError(f"{path}: its architecture differs from this run's ({base.config} against {model.config})")
    model.load_state_dict(base.state_dict())
    return _file_record(path)


def _file_record(path: Path) -> dict[str, str]:
    """Where a run's initial weights came from: the file and its sha256."""
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _check_sampling(out: Path, sampling: dict[str, Any]) -> None:
    """Refuse to resume a run with other labels, draws or validation set than it was started
    with (runs from before these were recorded used the defaults of their time)."""
    latest = out / "latest.safetensors"
    if not latest.is_file():
        return
    saved = {"relaxed_energies": True, "max_val_relaxed": 200, "references": "linear",
             "modulus_weight": 0.0, "modulus_batch": 8,
             **read_checkpoint(latest)[0].metadata.get("sampling", {})}
    if saved != sampling:
        raise ValueError(f"{out}: the run was started with sampling {saved}; given {sampling}")


def test_frames(data_dir: str | Path, run_or_model: Any) -> list[Frame]:
    """The test frames of a potential's split, read again from ``data_dir``.

    ``run_or_model``: a run directory with ``splits.json``, or such a file."""
    path = Path(run_or_model)
    path = path / "splits.json" if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"{path}: no splits.json of a potential's training run")
    wanted = set(json.loads(path.read_text())["test"])
    frames, _ = read_all(data_dir)
    return [f for f in frames if f.id in wanted]
