"""A fast reader for the P1 CIFs that pymatgen writes (most of the shared data's CIFs).

pymatgen's ``CifParser`` spends ~2 ms per crystal applying and de-duplicating symmetry
operations; for a P1 file with full occupancies there is nothing to apply. ``read_p1_cif``
accepts only that simple case (one data block, the identity as the only symmetry operation,
element symbols, occupancy 1, one site per line) and returns None for anything else, so the
caller falls back to pymatgen. Cell vectors follow pymatgen's ``Lattice.from_parameters``
and fractional coordinates are wrapped to [0, 1) as pymatgen does, so both paths give the
same crystal (atom order aside: pymatgen sorts species, this reader keeps the file order).
"""

from __future__ import annotations

import re

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers as SYMBOL_TO_Z

_CELL_KEYS = (
    "_cell_length_a",
    "_cell_length_b",
    "_cell_length_c",
    "_cell_angle_alpha",
    "_cell_angle_beta",
    "_cell_angle_gamma",
)
_SYMOP_KEYS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz")
_ELEMENT = re.compile(r"^([A-Z][a-z]?)(\d*[+-]?|[+-]\d*)$")  # 'Fe', 'Fe2+', 'O2-'
_UNCERTAINTY = re.compile(r"\(\d+\)$")


def _number(text: str) -> float:
    return float(_UNCERTAINTY.sub("", text))


def _loops(lines: list[str]) -> tuple[dict[str, str], list[tuple[list[str], list[list[str]]]]]:
    """Single-valued tags and loops (header names, rows of tokens) of one data block."""
    tags: dict[str, str] = {}
    loops: list[tuple[list[str], list[list[str]]]] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if line == "loop_":
            header, rows = [], []
            i += 1
            while i < n and lines[i].startswith("_"):
                header.append(lines[i].split()[0])
                i += 1
            while i < n and lines[i] != "loop_" and not lines[i].startswith(("_", "data_")):
                rows.append(lines[i])
                i += 1
            loops.append((header, rows))
            continue
        if line.startswith("_"):
            parts = line.split(None, 1)
            if len(parts) == 2:
                tags[parts[0]] = parts[1].strip().strip("'\"")
        i += 1
    return tags, loops


def read_p1_cif(text: str) -> Atoms | None:
    """``Atoms`` from a simple P1 CIF, or None when pymatgen should read it instead."""
    if ";" in text or text.count("data_") != 1:  # multi-line values or several blocks
        return None
    lines = [s.strip() for s in text.splitlines()]
    lines = [s for s in lines if s and not s.startswith("#")]
    tags, loops = _loops(lines)
    try:
        params = [_number(tags[k]) for k in _CELL_KEYS]
    except (KeyError, ValueError):
        return None
    symops = [rows for header, rows in loops if any(h in _SYMOP_KEYS for h in header)]
    if len(symops) != 1 or len(symops[0]) != 1:
        return None
    op = re.sub(r"^\d+\s+", "", symops[0][0].replace("'", "").replace('"', ""))
    if op.replace(" ", "").lower() not in ("x,y,z", "+x,+y,+z"):
        return None
    sites = [(h, r) for h, r in loops if "_atom_site_fract_x" in h]
    if len(sites) != 1:
        return None
    header, rows = sites[0]
    col = {name: k for k, name in enumerate(header)}
    symbol_col = col.get("_atom_site_type_symbol", col.get("_atom_site_label"))
    occ_col = col.get("_atom_site_occupancy")
    if symbol_col is None or "'" in "".join(rows) or '"' in "".join(rows):
        return None
    numbers, frac = [], []
    try:
        for row in rows:
            tokens = row.split()
            if len(tokens) != len(header):
                return None
            match = _ELEMENT.match(tokens[symbol_col])
            if match is None or match.group(1) not in SYMBOL_TO_Z:
                return None
            if occ_col is not None and abs(_number(tokens[occ_col]) - 1.0) > 1e-6:
                return None
            numbers.append(SYMBOL_TO_Z[match.group(1)])
            frac.append([_number(tokens[col[f"_atom_site_fract_{x}"]]) for x in "xyz"])
    except (KeyError, ValueError):
        return None
    if not numbers:
        return None
    from pymatgen.core import Lattice

    cell = Lattice.from_parameters(*params).matrix
    frac_arr = np.asarray(frac, dtype=float)
    frac_arr -= np.floor(frac_arr)
    return Atoms(numbers=numbers, positions=frac_arr @ cell, cell=cell, pbc=True)
