"""Harmonic phonons with phonopy: finite displacements, forces from a calculator, then bands,
DOS and thermal properties.

All displaced supercells go through ``CrystalformerCalculator.predict`` in batches (any other
ASE calculator works too, one supercell at a time). The forces are the model's position
gradients, by default those of the shipped potential (trained on DFT energies, forces and
stresses); a model trained on relaxed structures only gives a curvature that nothing
constrained.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from ase.cell import Cell

from .calculator import CrystalformerCalculator
from .errors import missing_extra
from .potential import DEFAULT_POTENTIAL
from .structures import check_atoms, describe, to_atoms

try:
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise missing_extra("phonopy", "phonopy") from err

logger = logging.getLogger(__name__)

#: Below this (THz) a frequency counts as imaginary; phonopy reports them as negative.
IMAGINARY_TOL = -0.05


@dataclass
class PhononResult:
    """What ``run_phonons`` computed. Frequencies in THz; thermal properties per mole of
    primitive cells (kJ/mol, J/K/mol) as phonopy reports them (``phonopy.primitive``).
    """

    phonopy: Any  # the Phonopy object, for anything not summarised here
    force_constants: np.ndarray  # (n_sc, n_sc, 3, 3) eV/Å²
    band: dict[str, Any]  # phonopy's band dict plus "labels" and "path_connections"
    dos: dict[str, np.ndarray]  # "frequency_points", "total_dos"
    thermal: dict[str, np.ndarray]  # temperatures, free_energy, entropy, heat_capacity
    min_frequency: float  # THz, over the band path and mesh; < 0 means imaginary
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def has_imaginary_modes(self) -> bool:
        return self.min_frequency < IMAGINARY_TOL


def run_phonons(
    atoms: Any,
    calc_or_model: Any = None,
    supercell: Sequence[int] | np.ndarray = (2, 2, 2),
    displacement: float = 0.01,
    mesh: Sequence[int] | float = (20, 20, 20),
    out_dir: str | Path | None = None,
    *,
    batch_size: int = 16,
    npoints: int = 51,
    temperatures: tuple[float, float, float] = (0.0, 1000.0, 10.0),
    symmetrize: bool = True,
) -> PhononResult:
    """Phonons of ``atoms`` (ASE or pymatgen, fully periodic) at the given cell.

    ``calc_or_model``: a ``CrystalformerCalculator``, any ASE calculator, or what
    ``CrystalformerCalculator`` takes (name, path, ``Crystalformer``, list; ``None``: the
    shipped potential ``potential.DEFAULT_POTENTIAL``), then evaluated in float64. ``supercell`` is a diagonal (3,) or a
    (3, 3) matrix; ``displacement`` in Å; ``mesh`` a q-mesh or a length (phonopy's
    convention). With ``out_dir``: ``phonopy_params.yaml``, ``band_dos.png`` and
    ``thermal.csv`` are written there. The structure is used as given; relax it first.
    """
    atoms = to_atoms(atoms)
    check_atoms(atoms, describe(atoms))
    if not np.all(atoms.pbc):
        raise ValueError(f"phonons need a fully periodic structure, got pbc={atoms.pbc.tolist()}")
    if displacement <= 0:
        raise ValueError(f"displacement must be > 0 Å, got {displacement}")
    calc = _as_calculator(calc_or_model)
    matrix = np.asarray(supercell, dtype=int)
    if matrix.shape == (3,):
        matrix = np.diag(matrix)
    if matrix.shape != (3, 3) or abs(np.linalg.det(matrix)) < 1:
        raise ValueError(f"supercell must be 3 integers or a non-singular 3x3 matrix, got {supercell}")

    unitcell = PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(), cell=np.array(atoms.cell),
        scaled_positions=atoms.get_scaled_positions(), masses=atoms.get_masses(),
    )
    # The primitive cell (found by symmetry) carries the band path and the thermal
    # properties, so a conventional or super cell gives the same bands as a primitive one.
    with warnings.catch_warnings():  # phonopy >= 4 warns that "auto" is not v3's identity
        warnings.filterwarnings("ignore", message="primitive_matrix defaulted")
        phonon = Phonopy(unitcell, supercell_matrix=matrix, primitive_matrix="auto")
    phonon.generate_displacements(distance=displacement)
    supercells = [
        Atoms(
            symbols=sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True
        )
        for sc in phonon.supercells_with_displacements
    ]
    logger.info("phonons: %d displaced supercells of %d atoms", len(supercells), len(supercells[0]))
    forces = np.array(_forces(calc, supercells, batch_size))  # (n_disp, n_sc, 3)
    drift = np.abs(forces.sum(axis=1)).max()
    if drift > 1e-6:
        logger.info("phonons: largest force drift %.2e eV/Å", drift)
    phonon.forces = forces
    phonon.produce_force_constants(show_drift=False)
    if symmetrize:
        phonon.symmetrize_force_constants(show_drift=False)

    path = Cell(np.array(phonon.primitive.cell)).bandpath(npoints=0)
    segments, labels, connections = _band_segments(path, npoints)
    phonon.run_band_structure(segments, labels=labels, path_connections=connections)
    bands = phonon.band_structure
    band = {
        "qpoints": bands.qpoints, "distances": bands.distances, "frequencies": bands.frequencies,
        "labels": labels, "path_connections": connections,
    }
    phonon.run_mesh(mesh, is_gamma_center=True)  # a shifted even mesh loses the symmetry
    mesh_freq = np.asarray(phonon.mesh.frequencies)
    phonon.run_total_dos()
    dos = {
        "frequency_points": np.asarray(phonon.total_dos.frequency_points),
        "total_dos": np.asarray(phonon.total_dos.dos),
    }
    thermal = _thermal(phonon, temperatures)
    min_freq = float(min(np.min(mesh_freq), min(np.min(f) for f in band["frequencies"])))

    result = PhononResult(
        phonopy=phonon, force_constants=np.asarray(phonon.force_constants), band=band,
        dos=dos, thermal=thermal, min_frequency=min_freq,
    )
    if out_dir is not None:
        result.files = _write(result, Path(out_dir), atoms.get_chemical_formula())
    return result


def _thermal(phonon: Any, temperatures: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Thermal properties per mole of primitive cells (kJ/mol, J/K/mol).

    The three Γ acoustic modes have ω = 0 in the limit but come out as ~1e-8 THz of either
    sign, which would add a spurious kT·log(ω) term to the free energy; phonopy >= 4 drops
    them on request, older versions ignore them only below their cutoff frequency.
    """
    t_min, t_max, t_step = temperatures
    options: dict[str, Any] = {}
    if "exclude_gamma_acoustic" in inspect.signature(phonon.run_thermal_properties).parameters:
        options["exclude_gamma_acoustic"] = True
    phonon.run_thermal_properties(t_min=t_min, t_max=t_max, t_step=t_step, **options)
    tp = phonon.thermal_properties
    if hasattr(tp, "free_energy"):
        values = (tp.temperatures, tp.free_energy, tp.entropy, tp.heat_capacity)
    else:  # older phonopy: the dict accessor
        d = phonon.get_thermal_properties_dict()
        values = (d["temperatures"], d["free_energy"], d["entropy"], d["heat_capacity"])
    keys = ("temperatures", "free_energy", "entropy", "heat_capacity")
    return {k: np.asarray(v) for k, v in zip(keys, values)}


def _as_calculator(calc_or_model: Any) -> BaseCalculator:
    if isinstance(calc_or_model, BaseCalculator):
        return calc_or_model
    return CrystalformerCalculator(DEFAULT_POTENTIAL if calc_or_model is None else calc_or_model, dtype="float64")


def _forces(calc: BaseCalculator, supercells: list[Atoms], batch_size: int) -> list[np.ndarray]:
    """Forces of every supercell: batched for Crystalformer, one by one otherwise."""
    if isinstance(calc, CrystalformerCalculator):
        return calc.predict(supercells, properties=["forces"], batch_size=batch_size, output="dict")["forces"]
    out = []
    for sc in supercells:
        sc.calc = calc
        out.append(sc.get_forces())
    return out


def _band_segments(path: Any, npoints: int) -> tuple[list[np.ndarray], list[str], list[bool]]:
    """Straight q-point lines along ASE's high-symmetry path, in phonopy's layout.

    ASE gives the special points in scaled coordinates of the reciprocal lattice of the cell
    it was built from, phonopy's primitive cell, which is what phonopy expects. phonopy
    wants one label per point of each branch ("GXW,LK": G X W L K) and, per segment,
    whether the next one continues from its end.
    """
    points = path.special_points
    segments: list[np.ndarray] = []
    labels: list[str] = []
    connections: list[bool] = []
    for branch in path.path.split(","):
        names = _split_labels(branch)
        labels += [r"$\Gamma$" if n == "G" else n for n in names]
        for a, b in pairwise(names):
            segments.append(np.linspace(points[a], points[b], npoints))
            connections.append(True)
        connections[-1] = False
    return segments, labels, connections


def _split_labels(branch: str) -> list[str]:
    """'GXW1K' -> ['G', 'X', 'W1', 'K'] (ASE labels are a letter plus optional digits)."""
    names: list[str] = []
    for ch in branch:
        if ch.isdigit() and names:
            names[-1] += ch
        else:
            names.append(ch)
    return names


def _write(result: PhononResult, out_dir: Path, formula: str) -> dict[str, Path]:
    """phonopy_params.yaml, band_dos.png and thermal.csv under ``out_dir``."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"phonopy": out_dir / "phonopy_params.yaml", "plot": out_dir / "band_dos.png",
             "thermal": out_dir / "thermal.csv"}
    result.phonopy.save(files["phonopy"])
    t = result.thermal
    pd.DataFrame(
        {
            "temperature_K": t["temperatures"],
            "free_energy_kJ_per_mol": t["free_energy"],
            "entropy_J_per_K_mol": t["entropy"],
            "heat_capacity_J_per_K_mol": t["heat_capacity"],
        }
    ).to_csv(files["thermal"], index=False)
    _plot(result, files["plot"], formula)
    logger.info("phonons: wrote %s", ", ".join(str(p) for p in files.values()))
    return files


def _plot(result: PhononResult, path: Path, title: str) -> None:
    """Band structure and DOS side by side, drawn without pyplot (no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax_band, ax_dos = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    band = result.band
    connections = result.band["path_connections"]
    labels = iter(band["labels"])
    ticks: dict[float, str] = {}  # position -> label; a break shows both ends as "X|L"

    def tick(x: float, label: str) -> None:
        key = round(float(x), 8)
        ticks[key] = f"{ticks[key]}|{label}" if key in ticks and ticks[key] != label else label

    for k, (dist, freq) in enumerate(zip(band["distances"], band["frequencies"])):
        ax_band.plot(dist, freq, color="tab:blue", lw=1)
        if k == 0 or not connections[k - 1]:
            tick(dist[0], next(labels))
        tick(dist[-1], next(labels))
    ax_band.set_xticks(list(ticks), list(ticks.values()))
    for x in ticks:
        ax_band.axvline(x, color="0.8", lw=0.5)
    ax_band.axhline(0, color="0.5", lw=0.5)
    ax_band.set_xlim(band["distances"][0][0], band["distances"][-1][-1])
    ax_band.set_ylabel("frequency (THz)")
    ax_band.set_title(title)
    ax_dos.plot(result.dos["total_dos"], result.dos["frequency_points"], color="tab:blue", lw=1)
    ax_dos.set_xlabel("DOS (states/THz)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
