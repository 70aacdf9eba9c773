"""Turn user input (ASE Atoms, pymatgen Structures) into checked ``ase.Atoms``.

All input validation lives here, so that every entry point (predict, calculator,
featurizer, training data) refuses the same bad structures with the same messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from .config import MAX_ATOMIC_NUMBER
from .errors import StructureError

#: Atoms closer than this (Å), counting periodic images, are refused as overlapping.
MIN_DISTANCE = 0.1

DISORDERED = "disordered structures (partial occupancies) are not supported; order them first"


def to_atoms(structure: Any) -> Atoms:
    """Return ``structure`` as ``ase.Atoms``; pymatgen Structures are converted.

    Disordered pymatgen structures (partial occupancies) are refused rather than guessed.
    """
    if isinstance(structure, Atoms):
        return structure
    if hasattr(structure, "lattice") and hasattr(structure, "sites"):
        if not getattr(structure, "is_ordered", True):
            raise StructureError(
                f"{structure.composition.reduced_formula}: {DISORDERED}"
            )
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_atoms(structure)
    raise TypeError(
        f"expected ase.Atoms or pymatgen Structure, got {type(structure).__name__}"
    )


def describe(atoms: Atoms, index: int | None = None) -> str:
    """A short label for error messages: 'structure 3 (NaCl)'."""
    name = f"structure {index}" if index is not None else "structure"
    try:
        formula = atoms.get_chemical_formula() or "empty"
    except (IndexError, KeyError, ValueError):  # an unknown atomic number breaks the formula
        formula = "?"
    return f"{name} ({formula})"


class Label:
    """``describe(atoms, index)``, made only when an error message is formatted: the formula
    costs about a tenth of building a small crystal's window, and is rarely needed."""

    __slots__ = ("atoms", "index")

    def __init__(self, atoms: Atoms, index: int | None = None) -> None:
        self.atoms, self.index = atoms, index

    def __str__(self) -> str:
        return describe(self.atoms, self.index)


def check_atoms(atoms: Atoms, label: str | Label) -> None:
    """Raise ``StructureError`` if the model cannot take ``atoms``.

    Checks that do not need the neighbour list: atoms present, full occupancies, known
    elements, finite coordinates, at least one periodic axis and a non-singular periodic
    cell. Overlapping atoms are found while building the window (``geometry.build_window``).
    """
    if len(atoms) == 0:
        raise StructureError(f"{label}: empty structure (no atoms)")
    # ase.io.read keeps one species per site of a disordered CIF and records the
    # fractions here; predicting on that guess would be a wrong number, not an error.
    occupancy = atoms.info.get("occupancy") or {}
    if any(fraction < 1 - 1e-6 for site in occupancy.values() for fraction in site.values()):
        raise StructureError(f"{label}: {DISORDERED}")
    numbers = atoms.numbers
    bad = numbers[(numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)]
    if bad.size:
        raise StructureError(
            f"{label}: atomic number {int(bad[0])} has no embedding; the model knows "
            f"Z = 1 to {MAX_ATOMIC_NUMBER}"
        )
    if not np.isfinite(atoms.positions).all():
        raise StructureError(f"{label}: positions contain NaN or inf")
    cell = np.asarray(atoms.cell)
    if not np.isfinite(cell).all():
        raise StructureError(f"{label}: cell contains NaN or inf")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        raise StructureError(
            f"{label}: no periodic axis (pbc={pbc.tolist()}); Crystalformer needs a crystal, "
            "a slab or a wire with at least one periodic direction"
        )
    periodic = cell[pbc]
    gram = periodic @ periodic.T
    lengths = np.sqrt(np.diag(gram))
    if (lengths < 1e-6).any():
        raise StructureError(f"{label}: singular cell (a periodic lattice vector has length 0)")
    # Volume (or area) relative to the product of the lengths: 0 means collinear vectors.
    measure = np.sqrt(max(np.linalg.det(gram), 0.0)) / np.prod(lengths)
    if measure < 1e-8:
        raise StructureError(
            f"{label}: singular cell (periodic lattice vectors are linearly dependent)"
        )


def as_atoms_list(structures: Any | Iterable[Any]) -> list[Atoms]:
    """Accept one structure or an iterable of them; return a list of ``ase.Atoms``."""
    if isinstance(structures, Atoms) or hasattr(structures, "lattice"):
        return [to_atoms(structures)]
    return [to_atoms(s) for s in structures]


def check_all(atoms_list: Sequence[Atoms]) -> None:
    """``check_atoms`` for each structure, labelled by its position in the input."""
    for index, atoms in enumerate(atoms_list):
        check_atoms(atoms, describe(atoms, index))


def primitive_cell(atoms: Atoms, symprec: float = 1e-5) -> Atoms:
    """The smallest cell of the same crystal (spglib), or ``atoms`` itself if none is smaller.

    The model is exactly invariant to the choice of cell, so predicting on the primitive
    cell gives the same answer for a fraction of the cost. Only pure lattice translations
    are used (tight ``symprec``, no idealisation): positions and lattice are not symmetrised.
    """
    if not atoms.pbc.all():
        return atoms
    import warnings

    import spglib

    cell = (np.asarray(atoms.cell), atoms.get_scaled_positions(), atoms.numbers)
    with warnings.catch_warnings():  # spglib 2.x warns about its own error-handling switch
        warnings.simplefilter("ignore", DeprecationWarning)
        found = spglib.standardize_cell(cell, to_primitive=True, no_idealize=True, symprec=symprec)
    if found is None or len(found[2]) >= len(atoms):
        return atoms
    lattice, scaled, numbers = found
    return Atoms(numbers=numbers, scaled_positions=scaled, cell=lattice, pbc=True)
