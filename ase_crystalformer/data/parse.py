"""Structure and file parsing shared by the loaders: text, dicts and arrays to ``ase.Atoms``.

Hot paths build ``Atoms`` directly (numpy caches, JARVIS dicts, ordered pymatgen dicts):
a pymatgen round trip costs ~1 ms per crystal, which adds up over ~10⁴ structures.
"""

from __future__ import annotations

import ast
import gzip
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers as SYMBOL_TO_Z

from ..errors import DataError, StructureError
from .cif import read_p1_cif


def read_json(path: Path) -> Any:
    """JSON from ``.json``, ``.json.gz`` or a ``.zip`` holding one JSON file."""
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if not n.endswith("/")]
                if len(members) != 1:
                    raise DataError(f"{path}: expected one file in the zip, found {members}")
                return json.loads(archive.read(members[0]))
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return json.load(handle)
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError, RecursionError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read JSON ({type(exc).__name__}: {exc})") from exc


def symbols_to_numbers(symbols: Any) -> np.ndarray:
    """Element symbols to atomic numbers; an unknown symbol is a ``StructureError``."""
    try:
        return np.array([SYMBOL_TO_Z[str(s)] for s in symbols], dtype=int)
    except KeyError as exc:
        raise StructureError(f"unknown element symbol {exc.args[0]!r}") from None


def atoms_from_arrays(
    numbers: Any, cell: Any, *, fractional: Any = None, cartesian: Any = None, pbc: Any = True
) -> Atoms:
    """``Atoms`` from atomic numbers, a (3, 3) cell (rows = vectors) and one coordinate set."""
    cell = np.asarray(cell, dtype=float).reshape(3, 3)
    numbers = np.asarray(numbers, dtype=int).reshape(-1)
    if fractional is not None:
        positions = np.asarray(fractional, dtype=float).reshape(-1, 3) @ cell
    else:
        positions = np.asarray(cartesian, dtype=float).reshape(-1, 3)
    if len(positions) != len(numbers):
        raise StructureError(f"{len(numbers)} species but {len(positions)} positions")
    return Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)


def atoms_from_jarvis(atoms: dict[str, Any]) -> Atoms:
    """A jarvis-tools ``Atoms.to_dict()``: lattice_mat, coords, elements, cartesian."""
    if not isinstance(atoms, dict):
        raise StructureError("no jarvis 'atoms' dict")
    try:
        key = "cartesian" if atoms.get("cartesian", False) else "fractional"
        return atoms_from_arrays(
            symbols_to_numbers(atoms["elements"]), atoms["lattice_mat"], **{key: atoms["coords"]}
        )
    except KeyError as exc:
        raise StructureError(f"jarvis 'atoms' dict lacks {exc.args[0]!r}") from None


def atoms_from_structure(structure: Any, pbc: Any = True) -> Atoms:
    """A pymatgen ``Structure`` without the adaptor's site-property copying; disorder refused."""
    if not structure.is_ordered:
        raise StructureError(
            f"{structure.composition.reduced_formula}: disordered structure (partial occupancies)"
        )
    try:
        numbers = [site.specie.Z for site in structure]
    except AttributeError as exc:  # DummySpecies and the like have no element
        raise StructureError(f"site without a real element ({exc})") from None
    return atoms_from_arrays(
        numbers, structure.lattice.matrix, cartesian=structure.cart_coords, pbc=pbc
    )


def atoms_from_pmg_dict(data: dict[str, Any]) -> Atoms:
    """A ``Structure.as_dict()``; ordered sites are read directly, others via pymatgen."""
    try:
        sites = data["sites"]
        species = [site["species"] for site in sites]
        if all(len(s) == 1 and float(s[0].get("occu", 1)) == 1.0 for s in species):
            numbers = symbols_to_numbers(s[0]["element"] for s in species)
            cell = data["lattice"]["matrix"]
            if all("abc" in site for site in sites):
                return atoms_from_arrays(numbers, cell, fractional=[s["abc"] for s in sites])
            return atoms_from_arrays(numbers, cell, cartesian=[s["xyz"] for s in sites])
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise StructureError(
            f"not a pymatgen Structure dict ({type(exc).__name__}: {exc})"
        ) from None
    from pymatgen.core import Structure

    return atoms_from_structure(Structure.from_dict(data))


def looks_like_cif(text: str) -> bool:
    return "_cell_length_a" in text or text.lstrip().startswith("data_")


#: Longest dict text read as JSON (linear time and memory: ~0.3 s for 20 MB).
MAX_JSON_CHARS = 20_000_000
#: Longest dict text read as a Python literal (matminer's ``str(dict)``): ``ast`` needs
#: ~2 s and 0.5 GB per MB, so this allows ~7,000 sites in ~1 s. A 200-site dict is 27 kB.
MAX_LITERAL_CHARS = 500_000


def dict_from_text(text: str) -> Any:
    """A dict cell parsed as JSON, else as a Python literal, with bounded time and memory.

    Every failure, too long or too deeply nested text included, is a ``DataError`` that
    says which limit or syntax stopped it, never a ``MemoryError`` or ``RecursionError``.
    """
    if len(text) > MAX_JSON_CHARS:
        raise DataError(
            f"structure text of {len(text):,} characters exceeds the limit of "
            f"{MAX_JSON_CHARS:,} characters"
        )
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError("structure dict nested too deeply to read as JSON") from None
    except ValueError:
        pass  # not JSON: matminer's CSVs store str(dict)
    if len(text) > MAX_LITERAL_CHARS:
        raise DataError(
            f"structure text of {len(text):,} characters is not JSON and exceeds the limit of "
            f"{MAX_LITERAL_CHARS:,} characters for a Python literal dict (store it as JSON)"
        )
    try:
        return ast.literal_eval(text)
    except (MemoryError, RecursionError):
        raise DataError("structure dict nested too deeply to read as a Python literal") from None
    except (SyntaxError, ValueError, TypeError) as exc:
        raise DataError(
            "structure text is neither JSON nor a Python literal dict "
            f"({type(exc).__name__}: {exc})"
        ) from None


def atoms_from_text(text: Any) -> Atoms:
    """CIF, POSCAR or a (JSON or Python-literal) pymatgen dict, told apart by content."""
    if not isinstance(text, str) or not text.strip():
        raise StructureError("no structure (empty cell in the structure column)")
    stripped = text.strip()
    if stripped.startswith("{"):
        return atoms_from_pmg_dict(dict_from_text(stripped))
    from pymatgen.core import Structure

    fmt = "cif" if looks_like_cif(stripped) else "poscar"
    if fmt == "cif":
        atoms = read_p1_cif(text)
        if atoms is not None:
            return atoms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about rounding on most MP CIFs
        try:
            structure = Structure.from_str(text, fmt=fmt)
        except Exception as exc:
            raise StructureError(
                f"cannot parse {fmt.upper()} text ({type(exc).__name__}: {exc})"
            ) from None
    return atoms_from_structure(structure)


def atoms_from_cell(value: Any, where: str = "") -> Atoms:
    """A structure column's cell: a pymatgen dict or CIF/POSCAR/dict text.

    ``where`` (e.g. "row 3, column 'cif'") prefixes every error, so a skipped row's
    reason says which cell to fix.
    """
    try:
        if isinstance(value, dict):
            return atoms_from_pmg_dict(value)
        return atoms_from_text(value)
    except (StructureError, DataError) as exc:
        if not where:
            raise
        raise type(exc)(f"{where}: {exc}") from None


def clean_atoms(atoms: Atoms) -> Atoms:
    """A copy with numbers, positions, cell and pbc only (no calculator, info or extra arrays)."""
    return Atoms(
        numbers=atoms.numbers.copy(),
        positions=atoms.positions.copy(),
        cell=np.array(atoms.cell),
        pbc=atoms.pbc.copy(),
    )


def primitive_standard(atoms: Atoms) -> Atoms:
    """pymatgen's primitive standard cell (spglib, symprec 0.01): the paper's preprocessing."""
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    structure = AseAtomsAdaptor.get_structure(clean_atoms(atoms))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib's error-handling notice
        primitive = SpacegroupAnalyzer(structure).get_primitive_standard_structure()
    return atoms_from_structure(primitive)


def voigt_stress(stress: Any) -> np.ndarray:
    """A stress as a Voigt 6-vector (xx, yy, zz, yz, xz, xy); 3×3 input is converted."""
    s = np.asarray(stress, dtype=float)
    if s.shape == (3, 3):
        return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
    if s.shape == (6,):
        return s.copy()
    if s.size == 9:
        return voigt_stress(s.reshape(3, 3))
    raise StructureError(f"stress of shape {s.shape}; expected (6,) or (3, 3)")


def first_present(names: list[str], candidates: tuple[str, ...]) -> str | None:
    """The first of ``candidates`` among ``names``, matched case-insensitively."""
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    return None
