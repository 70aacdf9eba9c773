"""ASE calculator: Crystalformer predictions as ASE properties, forces and stress by autograd.

Importing this module does nothing but define the class; models load when it is built.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import (
    Calculator,
    CalculatorSetupError,
    PropertyNotImplementedError,
    all_changes,
)

from . import inference
from .checkpoint import energy_models
from .committee import Committee
from .domain import warn_outside
from .errors import DataError, StructureError
from .forces import energy_forces_stress
from .geometry import Batch, collate, windows_for
from .inference import (
    DTypeName,
    ModelSpec,
    TargetProperty,
    describe_models,
    eval_mode,
    load_models,
    resolve_device,
    resolve_dtype,
    std_property,
    target_properties,
)
from .model import Crystalformer, crystal_mean
from .potential import DEFAULT_POTENTIAL, is_potential, references_of
from .structures import as_atoms_list, check_atoms, describe

logger = logging.getLogger(__name__)

#: Properties that exist only with an energy-type target (TargetSpec.kind == "energy").
ENERGY_PROPERTIES = ("energy", "free_energy", "forces", "stress")
#: Prefix of the ``atoms.info`` keys that mirror the custom properties.
INFO_PREFIX = "crystalformer_"
_ASE_KEYWORDS = frozenset({"label", "atoms", "directory"})
_FIXED_PARAMETERS = frozenset({"model", "models", "device", "dtype"})
_NO_VOLUME = (
    "stress needs a cell of non-zero volume: give the non-periodic axes of a slab or wire "
    "a vacuum vector (ASE's convention divides dE/dε by the whole cell volume, vacuum "
    "included). Forces work for any cell."
)


class NotAPotentialWarning(UserWarning):
    """Energy, forces and stress taken from a property regressor rather than a potential."""


def _has_volume(atoms: Atoms) -> bool:
    return abs(np.linalg.det(np.asarray(atoms.cell))) > 1e-9


class CrystalformerCalculator(Calculator):
    """Crystalformer models as an ASE calculator.

    Properties (a fresh list per instance, in ``implemented_properties``; units in
    ``units``):

    * every target of every loaded model under an ASE-style name (``inference.TARGET_ALIASES``:
      ``e_form`` → ``formation_energy_per_atom`` eV/atom, ``bandgap`` → ``band_gap`` eV,
      ``k_vrh``/``g_vrh`` → ``bulk_modulus_vrh``/``shear_modulus_vrh`` GPa; unknown names
      pass through; a name two models share gets the second model's label appended);
    * ``<property>_std`` for each target of a committee (``committee.Committee``, e.g. a
      shipped committee directory): its members' sample std (ddof=1) in the target's
      training space (log10 units for a log10 target); the property itself is their mean;
    * ``embedding``: the mean-pooled crystal vector (d,) of the first model (with no model
      named, the first property model's, not the backbone's that the featurizer defaults to);
    * ``energy``, ``free_energy`` (eV), ``forces`` (eV/Å) and ``stress`` (eV/Å³, Voigt
      xx yy zz yz xz xy) from a potential (a model trained on DFT energies, forces and
      stresses; ``potential.py``). ``CrystalformerCalculator()`` loads every shipped property
      model (not the backbone, ``inference.property_models``), and the potential
      ``potential.DEFAULT_POTENTIAL`` for these four.
      A model with an energy-type target that is not a potential (``mp-e_form``: formation
      energy per atom × N) gives them only when named explicitly, with a
      ``NotAPotentialWarning``. A potential's energy is its network's energy plus the
      per-element reference energies of its default source (MPtrj-compatible PBE(+U)).

    A model runs only when a property it provides is asked for, so a relaxation or MD step
    (energy, forces, stress) runs the potential alone.

    Energy and derivatives. With e(p, L) the predicted energy per atom of a crystal with
    positions p (n, 3) and lattice rows L (3, 3), the total energy is E = n·e. The model
    builds every image vector r = p_j − p_i + n·L inside autograd, so

        F = −∂E/∂p,      σ = (1/V) ∂E/∂ε at ε = 0,

    where the symmetric strain ε acts as p → p(I + ε)ᵀ, L → L(I + ε)ᵀ (ASE's sign: σ > 0
    under tension). ``forces.energy_forces_stress`` computes both with one backward pass.
    The window of images is fixed per structure, so these are exact derivatives of the
    model as evaluated. For slabs and wires the stress follows ASE's convention (the one
    ``ase.calculators.fd.calculate_numerical_stress`` uses): the derivative with respect to a
    strain of the whole cell, atoms included, over the whole cell volume, vacuum included; a
    cell of zero volume (zero vectors on open axes) gets ``PropertyNotImplementedError``.

    What the forces mean: a potential was trained on forces and stresses away from
    equilibrium; the gradient of a regressor trained on relaxed structures only is not a
    force field, hence the warning.

    Custom properties (targets, embedding) are also written to ``atoms.info`` as
    ``crystalformer_<name>`` so that they survive ``ase.io.write`` in extxyz; energy,
    forces and stress travel as the calculator results extxyz already stores.

    Several models share one neighbour search per structure when their cutoffs agree.

    Threads: ASE keeps the last structure and its results on the calculator (``atoms``,
    ``results``), so threads sharing one calculator would read each other's results. Every
    public method that reads or writes that state, and ``predict``, holds one lock per
    calculator: concurrent calls run one at a time (torch already uses every core within a
    call) and each gets its own structure's values.

    ``predict`` evaluates many structures in batches, far faster than one ``calculate`` per
    structure.
    """

    # implemented_properties: the base class's empty list until __init__ sets a new
    # list on the instance (extending a class-level list would leak between instances).
    default_parameters: ClassVar[dict[str, Any]] = {"batch_size": 32}
    # The model reads neither magnetic moments nor charges.
    ignored_changes: ClassVar[frozenset[str]] = frozenset({"initial_magmoms", "initial_charges"})

    def __init__(
        self,
        model: ModelSpec | Sequence[ModelSpec] | None = None,
        *,
        device: str | torch.device = "auto",
        dtype: DTypeName = "float32",
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - _ASE_KEYWORDS
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {sorted(unknown)}; CrystalformerCalculator "
                f"takes model, device, dtype, batch_size and ASE's {sorted(_ASE_KEYWORDS)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        explicit = model is not None
        self.models: list[tuple[str, Crystalformer]] = load_models(
            model if explicit else (_default_models() or None), self.device, self.dtype
        )
        self.targets: list[TargetProperty] = target_properties(self.models)
        self.energy_target: TargetProperty | None = _energy_target(self.models, self.targets, explicit)
        self._warned_not_potential = False
        # A committee's targets also give <name>_std, the members' spread (committee.py).
        self.std_names: dict[str, tuple[str, str]] = {
            t.name: std_property(t) for t in self.targets if isinstance(self.models[t.model][1], Committee)
        }
        names = [t.name for t in self.targets] + [n for n, _ in self.std_names.values()] + ["embedding"]
        energy = list(ENERGY_PROPERTIES) if self.energy_target is not None else []
        self.implemented_properties = energy + names  # a new list: never the base class's
        self.units: dict[str, str] = {t.name: t.unit for t in self.targets}
        self.units.update(self.std_names.values())
        self.units["embedding"] = ""
        if energy:
            self.units.update(energy="eV", free_energy="eV", forces="eV/Å", stress="eV/Å^3")
        # Models with the same cutoff share one window (neighbour search) per structure.
        self._groups: dict[float, list[int]] = {}
        for index, (_, m) in enumerate(self.models):
            self._groups.setdefault(m.config.cutoff, []).append(index)
        # Before super().__init__, which calls reset(); reentrant: get_property -> calculate.
        self._lock = threading.RLock()
        super().__init__(batch_size=batch_size, **kwargs)
        self.parameters.update(
            models=[label for label, _ in self.models], device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )
        logger.info(
            "CrystalformerCalculator: %s on %s (%s)",
            describe_models(self.models), self.device, self.parameters["dtype"],
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]  # a lock cannot be pickled; a copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------ ASE contract
    def set(self, **kwargs: Any) -> dict[str, Any]:
        """Change ``batch_size``; the models, device and dtype are fixed at construction."""
        fixed = _FIXED_PARAMETERS & set(kwargs)
        if fixed:
            raise CalculatorSetupError(
                f"{sorted(fixed)} cannot be changed on an existing CrystalformerCalculator; "
                "build a new one"
            )
        unknown = set(kwargs) - set(self.default_parameters)
        if unknown:  # ASE would store a typo silently and keep the old value
            raise CalculatorSetupError(
                f"unknown parameter(s) {sorted(unknown)}; set() takes {sorted(self.default_parameters)}"
            )
        if "batch_size" in kwargs and not int(kwargs["batch_size"]) >= 1:
            raise ValueError(f"batch_size must be >= 1, got {kwargs['batch_size']}")
        with self._lock:
            return super().set(**kwargs)

    def reset(self) -> None:
        """Forget the last structure and its results (under the lock, see the class docs)."""
        with self._lock:
            super().reset()

    def calculation_required(self, atoms: Atoms, properties: Sequence[str]) -> bool:
        with self._lock:
            return super().calculation_required(atoms, properties)

    def get_property(
        self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True
    ) -> Any:
        """ASE's ``get_property``, with errors that say why energy or stress is missing."""
        with self._lock:
            self._check_request([name], [atoms if atoms is not None else self.atoms])
            return super().get_property(name, atoms, allow_calculation)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] | None = None,
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        """Fill ``self.results`` with every target, the embedding and, if asked, derivatives.

        One forward pass gives all targets, the energy and the embedding at once; forces
        (and stress, for a cell with a volume) cost one backward pass and are computed
        together when either is requested.
        """
        with self._lock:
            if properties is None:
                properties = ["energy"] if self.energy_target is not None else [self.targets[0].name]
            Calculator.calculate(self, atoms, list(properties), list(system_changes))
            if self.atoms is None:
                raise CalculatorSetupError("no atoms: pass atoms or attach the calculator first")
            if system_changes:
                self.results = {}
            current = self.atoms
            self._check_request(properties, [current])
            self._check_names(properties)
            want_grad = bool({"forces", "stress"} & set(properties))
            result = self._evaluate(
                [current],
                properties,
                forces=want_grad,
                stress=want_grad and _has_volume(current),
                batch_size=1,
            )[0]
            self.results.update(result)
            if atoms is not None:
                self._store_info(atoms, result)

    def precheck(self, atoms: Atoms) -> bool:
        """Cheap test that ``atoms`` is in scope (``structures.check_atoms``); no raise.

        ``calculate``/``predict`` raise ``StructureError`` with the reason, and also refuse
        overlapping atoms, which only the neighbour search finds.
        """
        try:
            check_atoms(atoms, describe(atoms))
        except StructureError:
            return False
        return True

    # --------------------------------------------------------------------------- batch API
    def predict(
        self,
        structures: Any,
        properties: Sequence[str] | None = None,
        batch_size: int | None = None,
        output: Literal["list", "dict"] = "list",
        store_info: bool = False,
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Evaluate many ASE/pymatgen structures in batches; same values as ``calculate``.

        ``properties`` defaults to every implemented property (stress only when every
        structure's cell has a volume). Returns one dict per structure, or with
        ``output="dict"`` one entry per property: scalars (n,), stress (n, 6), embedding
        (n, d), forces a list of (n_i, 3) arrays. ``store_info=True`` also mirrors the
        custom properties into each input's ``atoms.info``. The inputs are never attached
        to this calculator.
        """
        if output not in ("list", "dict"):
            raise ValueError(f"output={output!r}; use 'list' or 'dict'")
        atoms_list = as_atoms_list(structures)
        all_have_volume = all(_has_volume(a) for a in atoms_list)
        if properties is None:
            properties = [
                p for p in self.implemented_properties if p != "stress" or all_have_volume
            ]
        properties = list(properties)
        self._check_names(properties)
        self._check_request(properties, atoms_list)
        size = int(self.parameters["batch_size"] if batch_size is None else batch_size)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        want_grad = bool({"forces", "stress"} & set(properties))
        results = self._evaluate(
            atoms_list, properties, forces=want_grad, stress="stress" in properties, batch_size=size
        )
        results = [{p: r[p] for p in properties} for r in results]
        if store_info:
            for atoms, r in zip(atoms_list, results):
                self._store_info(atoms, r)
        if output == "list":
            return results
        # Shapes of one structure's value, so that no structures still stack to (0, ...).
        shapes = {"stress": (6,), "embedding": (self.models[0][1].config.d_model,)}
        stacked: dict[str, Any] = {}
        for p in properties:
            values = [r[p] for r in results]
            stacked[p] = values if p == "forces" else np.asarray(values).reshape(-1, *shapes.get(p, ()))
        return stacked

    # ----------------------------------------------------------------------------- helpers
    def _check_names(self, properties: Sequence[str]) -> None:
        unknown = [p for p in properties if p not in self.implemented_properties]
        unknown = [p for p in unknown if p not in ENERGY_PROPERTIES]  # own message below
        if unknown:
            raise PropertyNotImplementedError(
                f"{unknown} not available from this calculator; it provides "
                f"{self.implemented_properties}"
            )

    def _check_request(self, properties: Sequence[str], atoms_list: Sequence[Atoms | None]) -> None:
        """Refuse energy-type properties without an energy model, and stress without a volume."""
        wanted = [p for p in properties if p in ENERGY_PROPERTIES]
        if wanted and self.energy_target is None:
            raise PropertyNotImplementedError(self._no_energy_message(wanted))
        if "stress" in properties:
            for index, atoms in enumerate(atoms_list):
                if atoms is not None and not _has_volume(atoms):
                    where = describe(atoms, index if len(atoms_list) > 1 else None)
                    raise PropertyNotImplementedError(f"{where}: {_NO_VOLUME}")

    def _no_energy_message(self, wanted: Sequence[str]) -> str:
        loaded = ", ".join(
            f"{label} ({', '.join(model.config.target_names)})" for label, model in self.models
        )
        providers = energy_models()
        hint = (
            f"shipped models with an energy target: {providers}"
            if providers
            else "no shipped model has one; train or load one whose config has "
            "TargetSpec(..., kind='energy')"
        )
        if DEFAULT_POTENTIAL not in inference.list_models():
            hint += (
                f"; the potential {DEFAULT_POTENTIAL!r} that CrystalformerCalculator() uses by "
                "default is not shipped in this version (still in training): pass a potential "
                "checkpoint, or name a regressor to get its (unphysical) gradients"
            )
        return (
            f"{list(wanted)} need a model with an energy-type target (TargetSpec kind='energy', "
            f"a total energy in eV/atom); the loaded models predict only intensive targets: "
            f"{loaded}. Available here: {self.implemented_properties}; {hint}"
        )

    def _store_info(self, atoms: Atoms, result: dict[str, Any]) -> None:
        for name, value in result.items():
            if name in ENERGY_PROPERTIES:
                continue  # extxyz stores these from the calculator results
            atoms.info[INFO_PREFIX + name] = value.copy() if isinstance(value, np.ndarray) else value

    def _needed(self, properties: Sequence[str]) -> set[int]:
        """Indices of the models that provide one of ``properties``: only those run."""
        stds = {std: name for name, (std, _) in self.std_names.items()}  # <property>_std → property
        wanted = set(properties) | {stds[p] for p in properties if p in stds}
        need = {t.model for t in self.targets if t.name in wanted}
        if "embedding" in properties:
            need.add(0)
        if self.energy_target is not None and set(ENERGY_PROPERTIES) & set(properties):
            need.add(self.energy_target.model)
            if not is_potential(self.models[self.energy_target.model][1]):
                self._warn_not_potential()
        return need

    def _warn_not_potential(self) -> None:
        if self._warned_not_potential:
            return
        self._warned_not_potential = True
        label = self.models[self.energy_target.model][0]
        name = self.energy_target.target.name
        warnings.warn(
            f"{label}: energy, forces and stress come from a property regressor: the energy is its "
            f"{name!r} (eV/atom) × number of atoms, a model fitted to relaxed structures only, so "
            "its forces and stress are gradients that no training constrained, not those of a "
            "potential. For relaxations, MD and phonons use a potential: a checkpoint trained "
            f"on forces, or {DEFAULT_POTENTIAL!r} (CrystalformerCalculator() with no model) "
            "once it ships.",
            NotAPotentialWarning,
            stacklevel=4,
        )

    def _evaluate(
        self, atoms_list: Sequence[Atoms], properties: Sequence[str], *, forces: bool, stress: bool,
        batch_size: int,
    ) -> list[dict[str, Any]]:
        """The outputs of the models that provide ``properties`` (all their targets, the
        embedding if the first model ran), and energy/forces/stress when asked; per structure.

        ``stress`` must only be asked for cells with a volume (``_check_request``).
        """
        results: list[dict[str, Any]] = [{} for _ in atoms_list]
        energy = self.energy_target
        with self._lock, eval_mode([m for _, m in self.models]):
            needed = self._needed(properties)
            for cutoff, group in self._groups.items():
                members = [index for index in group if index in needed]
                if not members:
                    continue
                windows = windows_for(atoms_list, cutoff)  # raises StructureError, labelled
                for index in members:
                    label, model = self.models[index]
                    numbers = enumerate(w.numbers for w in windows)
                    warn_outside(label, model.metadata.get("domain"), numbers, len(windows))
                offsets = None
                if energy is not None and energy.model in members:
                    offsets = _reference_energies(self.models[energy.model], windows, atoms_list)
                for start in range(0, len(windows), batch_size):
                    batch = collate(windows[start : start + batch_size], self.dtype)
                    batch = batch.to(self.device)
                    rows = results[start : start + batch_size]
                    for index in members:
                        model = self.models[index][1]
                        derivatives, std = None, None
                        wants = energy is not None and energy.model == index and (forces or stress)
                        if isinstance(model, Committee):
                            out, std, emb, derivatives = _committee_pass(model, batch, derivatives=wants, stress=stress)
                        elif wants:
                            with _atom_features(model) as seen:
                                derivatives = energy_forces_stress(
                                    model, batch, forces=True, stress=stress
                                )
                            emb = crystal_mean(seen[-1].detach(), batch)  # (B, d)
                            out = model.targets(derivatives["outputs"].detach())  # (B, T)
                        else:
                            with torch.no_grad():
                                outputs, emb = model.readout(model.atom_features(batch), batch)
                                out = model.targets(outputs)  # (B, T)
                        shift = None if offsets is None else offsets[start : start + batch_size]
                        self._fill(rows, index, batch, out, emb, derivatives, shift, std)
        return results

    def _fill(
        self,
        rows: list[dict[str, Any]],
        index: int,
        batch: Batch,
        out: torch.Tensor,
        emb: torch.Tensor,
        derivatives: dict[str, torch.Tensor] | None,
        shift: np.ndarray | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        """Copy one model's outputs (and a committee's std) for one batch into the
        per-structure result dicts; ``shift`` (B,) eV is added to the energy (a potential's
        reference energies)."""
        values = out.detach().to("cpu", torch.float64).numpy()  # (B, T)
        spread = None if std is None else std.detach().to("cpu", torch.float64).numpy()  # (B, T)
        n_atoms = batch.n_atoms.cpu().numpy()
        energy = self.energy_target
        if shift is not None and energy is not None and energy.model == index:
            values = values.copy()  # the energy per atom, references included, as the energy
            values[:, energy.column] += shift / n_atoms
        for t in self.targets:
            if t.model == index:
                for b, row in enumerate(rows):
                    row[t.name] = float(values[b, t.column])
                    if spread is not None:
                        row[self.std_names[t.name][0]] = float(spread[b, t.column])
        if index == 0:
            embedding = emb.detach().to("cpu", torch.float64).numpy()  # (B, d)
            for b, row in enumerate(rows):
                row["embedding"] = embedding[b]
        if energy is None or energy.model != index:
            return
        for b, row in enumerate(rows):
            row["energy"] = row["free_energy"] = float(values[b, energy.column] * n_atoms[b])
        if derivatives is None:
            return
        forces = derivatives["forces"].detach().to("cpu", torch.float64).numpy()  # (N, 3)
        for b, part in enumerate(np.split(forces, np.cumsum(n_atoms)[:-1])):
            rows[b]["forces"] = part
        if "stress" in derivatives:
            stress = derivatives["stress"].detach().to("cpu", torch.float64).numpy()  # (B, 3, 3)
            for b, row in enumerate(rows):
                row["stress"] = stress[b][[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # Voigt


def _committee_pass(committee: Committee, batch: Batch, *, derivatives: bool, stress: bool):
    """Mean (target units) and std (training space) of a committee's targets, the first
    member's embedding, and with ``derivatives`` the members' mean forces (and stress):
    the derivatives of the mean energy."""
    with torch.no_grad():
        emb = committee.embed(batch)
        if not derivatives:
            mean, std = committee.mean_std(batch)
    averaged = None
    if derivatives:
        parts = [energy_forces_stress(m, batch, forces=True, stress=stress) for m in committee.members]
        values = torch.stack([p["outputs"].detach() * m.target_std + m.target_mean
                              for p, m in zip(parts, committee.members)])
        mean, std = values.mean(0), values.std(0, correction=1)
        averaged = {k: torch.stack([p[k].detach() for p in parts]).mean(0)
                    for k in ("forces", "stress") if k in parts[0]}
    out = committee.targets((mean - committee.target_mean) / committee.target_std)
    return out, std, emb, averaged


@contextmanager
def _atom_features(model: Crystalformer) -> Iterator[list[torch.Tensor]]:
    """Record the atom features (N, d) that leave the last block, whose crystal means are
    the embedding: ``forces.energy_forces_stress`` returns the outputs only, and this
    recovers the embedding from the same forward pass instead of running the model again.
    """
    seen: list[torch.Tensor] = []
    thread = threading.get_ident()  # a model shared with another thread runs its blocks too

    def record(_module: torch.nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if threading.get_ident() == thread:
            seen.append(output)

    handle = model.blocks[-1].register_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def _default_models() -> list[str]:
    """What ``CrystalformerCalculator()`` loads: every findable property model (no backbone),
    with ``DEFAULT_POTENTIAL`` last (so the first model, whose embedding is reported, is a
    property model as before)."""
    names = inference.property_models()
    rest = [n for n in names if n != DEFAULT_POTENTIAL]
    return rest + [DEFAULT_POTENTIAL] if DEFAULT_POTENTIAL in names else rest


def _energy_target(
    models: Sequence[tuple[str, Crystalformer]], targets: Sequence[TargetProperty], explicit: bool
) -> TargetProperty | None:
    """The energy-type target that gives energy, forces and stress: a potential's first; a
    regressor's only when the models were named explicitly (and none is a potential)."""
    energy = [t for t in targets if t.target.kind == "energy"]
    for t in energy:
        if is_potential(models[t.model][1]):
            return t
    return energy[0] if energy and explicit else None


def _reference_energies(
    entry: tuple[str, Crystalformer], windows: Sequence[Any], atoms_list: Sequence[Atoms]
) -> np.ndarray | None:
    """Σ n μ (eV) per structure for a potential; None for a model without references."""
    label, model = entry
    refs = references_of(model)
    if refs is None:
        return None
    out = np.empty(len(windows))
    for k, window in enumerate(windows):
        try:
            out[k] = refs.energy(window.numbers)
        except DataError as err:
            where = describe(atoms_list[k], k if len(atoms_list) > 1 else None)
            raise StructureError(f"{where}: {label} has no energy for it: {err}") from err
    return out
