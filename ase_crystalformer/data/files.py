"""User data files: CSV, extxyz, ASE databases and JSON (pymatgen or jarvis-tools).

Targets are every numeric column / ``info`` key / key-value pair the file has; ids come from
``id_column`` or the first unique one of the usual id names, else ``<file stem>:<row>``. A
``split`` column (or info key) with train/val/test values is the file's own split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from .jarvis import is_jarvis, load_jarvis
from .parse import (
    atoms_from_cell,
    clean_atoms,
    first_present,
    read_json,
    voigt_stress,
)
from .pipeline import Source
from .records import Entry
from .splits import normalise_split_name

logger = logging.getLogger(__name__)

STRUCTURE_COLUMNS = ("cif", "structure", "poscar")
ID_CANDIDATES = ("id", "material_id", "mp_id", "mpid", "jid", "structure_id", "name", "uid")
#: Units of the quantities ASE itself defines (calculator results); other targets get "".
ASE_UNITS = {"energy": "eV", "free_energy": "eV"}
SUFFIXES = (".csv", ".xyz", ".extxyz", ".db", ".json", ".json.gz", ".json.zip")


def load_file(
    path: Path,
    *,
    structure_column: str | None = None,
    id_column: str | None = None,
    kind: str | None = None,
) -> Source:
    """Dispatch on the file name; JSON is told apart (jarvis-tools or pymatgen) by content."""
    name = path.name.lower()
    if name.endswith(".csv"):
        return load_csv(path, structure_column=structure_column, id_column=id_column)
    if name.endswith((".xyz", ".extxyz")):
        return load_extxyz(path, id_column=id_column)
    if name.endswith(".db"):
        return load_ase_db(path, id_column=id_column)
    if name.endswith((".json", ".json.gz", ".json.zip")):
        data = read_json(path)
        if is_jarvis(data):
            return load_jarvis(path, data, kind=kind, id_column=id_column)
        return load_pymatgen_json(
            path, data, structure_column=structure_column, id_column=id_column
        )
    raise DataError(f"{path}: unsupported file type; use one of {list(SUFFIXES)}")


# -- CSV ---------------------------------------------------------------------------------


def read_csv_frame(path: Path) -> pd.DataFrame:
    """A CSV whose leading '# ...' lines (matminer's '# ref:') are skipped."""
    skip = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            skip += 1
    try:
        return pd.read_csv(path, skiprows=skip)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc


def csv_entries(
    frame: pd.DataFrame,
    path: Path,
    *,
    structure_column: str | None = None,
    id_column: str | None = None,
    target_columns: Sequence[str] | None = None,
) -> tuple[list[Entry], list[str]]:
    """Entries of a CSV frame and the target columns used."""
    columns = [str(c) for c in frame.columns]
    column = structure_column or first_present(columns, STRUCTURE_COLUMNS)
    if column is None or column not in columns:
        raise DataError(
            f"{path}: no structure column {structure_column or list(STRUCTURE_COLUMNS)} "
            f"(columns: {columns}); pass structure_column="
        )
    if id_column is not None and id_column not in columns:
        raise DataError(f"{path}: no id column {id_column!r} (columns: {columns})")
    id_col = id_column or first_present(columns, ID_CANDIDATES)
    split_col = first_present(columns, ("split",))
    if target_columns is None:
        skip = {column, id_col, split_col}
        target_columns = [
            c
            for c in columns
            if c not in skip
            and not c.startswith("Unnamed:")
            and pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c])
            and frame[c].notna().any()
        ]
    values = {t: pd.to_numeric(frame[t], errors="coerce").to_numpy(float) for t in target_columns}
    texts = frame[column].tolist()
    raw_ids = frame[id_col].tolist() if id_col else [None] * len(frame)
    splits = frame[split_col].tolist() if split_col else [None] * len(frame)
    entries = []
    for row, (text, rid, label) in enumerate(zip(texts, raw_ids, splits, strict=True)):
        rid = (
            f"{path.stem}:{row}"
            if rid is None or (isinstance(rid, float) and math.isnan(rid))
            else str(rid)
        )
        split = (
            None
            if label is None or pd.isna(label)
            else normalise_split_name(label, f"{path} row {row}")
        )
        targets = {t: float(v[row]) for t, v in values.items()}
        where = f"row {row}, column {column!r}"
        entries.append(Entry(rid, targets, partial(atoms_from_cell, text, where), split))
    return entries, list(target_columns)


def load_csv(
    path: Path, *, structure_column: str | None = None, id_column: str | None = None
) -> Source:
    """A CSV with a CIF/POSCAR/pymatgen-dict structure column and numeric target columns."""
    frame = read_csv_frame(path)
    entries, targets = csv_entries(
        frame, path, structure_column=structure_column, id_column=id_column
    )
    unusable = {
        str(c): value_problem(f"column {str(c)!r}", frame[c].tolist(), "row")
        for c in frame.columns
        if str(c) not in targets
    }
    return _source(path, "csv", entries, targets, unusable)


# -- extxyz and ASE db --------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def choose_id_key(rows: Sequence[dict[str, Any]], id_column: str | None, path: Path) -> str | None:
    """``id_column``, else the first usual id key present in every row with unique values."""
    if id_column is not None:
        if not any(id_column in r for r in rows):
            raise DataError(f"{path}: no entry has the id key {id_column!r}")
        return id_column
    keys = sorted({k for r in rows for k in r if str(k).lower().endswith("id")})
    for key in [*ID_CANDIDATES, *keys]:
        values = [r.get(key) for r in rows]
        if (
            values
            and all(v is not None for v in values)
            and len(set(map(str, values))) == len(values)
        ):
            return key
    return None


def load_extxyz(path: Path, *, id_column: str | None = None) -> Source:
    """Extended XYZ: targets from ``info``; energy/forces/stress from the calculator results.

    ``energy`` is the total energy (eV); stress is kept as ASE reads it (Voigt, eV/Å³).
    """
    from ase.io import read

    try:
        frames = read(path, index=":", format="extxyz")
    except Exception as exc:  # ase raises many types on malformed files
        raise DataError(f"{path}: cannot read extxyz ({type(exc).__name__}: {exc})") from exc
    id_key = choose_id_key([f.info for f in frames], id_column, path)
    entries = []
    for index, atoms in enumerate(frames):
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        targets = {k: float(v) for k, v in atoms.info.items() if _is_number(v) and k != id_key}
        targets.update({k: float(v) for k, v in results.items() if _is_number(v)})
        if "energy" not in targets and _is_number(atoms.info.get("energy")):
            targets["energy"] = float(atoms.info["energy"])
        forces = results.get("forces", atoms.arrays.get("forces"))
        stress = results.get("stress", atoms.info.get("stress"))
        label = atoms.info.get("split")
        entries.append(
            Entry(
                id=_id(atoms.info.get(id_key) if id_key else None, path, index),
                targets=targets,
                parse=partial(clean_atoms, atoms),
                split=normalise_split_name(label, f"{path} frame {index}") if label else None,
                forces=None if forces is None else np.asarray(forces, dtype=float).copy(),
                stress=None if stress is None else voigt_stress(stress),
            )
        )
    problems = _key_problems([f.info for f in frames], _targets(entries), "frame")
    return _source(path, "extxyz", entries, None, problems)


def load_ase_db(path: Path, *, id_column: str | None = None) -> Source:
    """An ASE database: targets from numeric key-value pairs and scalar ``data`` entries."""
    from ase.db import connect

    try:
        rows = list(connect(str(path)).select())
    except Exception as exc:
        raise DataError(f"{path}: cannot read ASE database ({type(exc).__name__}: {exc})") from exc
    id_key = choose_id_key([r.key_value_pairs for r in rows], id_column, path)
    entries = []
    for row in rows:
        pairs = row.key_value_pairs
        targets = {k: float(v) for k, v in pairs.items() if _is_number(v) and k != id_key}
        targets.update({k: float(v) for k, v in (row.data or {}).items() if _is_number(v)})
        if row.get("energy") is not None:
            targets["energy"] = float(row.energy)
        forces, stress, label = row.get("forces"), row.get("stress"), pairs.get("split")
        entries.append(
            Entry(
                id=str(pairs[id_key]) if id_key and id_key in pairs else str(row.id),
                targets=targets,
                parse=row.toatoms,
                split=normalise_split_name(label, f"{path} row {row.id}") if label else None,
                forces=None if forces is None else np.asarray(forces, dtype=float),
                stress=None if stress is None else voigt_stress(stress),
            )
        )
    pairs = [r.key_value_pairs for r in rows]
    return _source(path, "ase db", entries, None, _key_problems(pairs, _targets(entries), "row"))


# -- pymatgen JSON ------------------------------------------------------------------------


def load_pymatgen_json(
    path: Path, data: Any, *, structure_column: str | None = None, id_column: str | None = None
) -> Source:
    """A list of ``{"structure": Structure.as_dict() or text, <targets>...}`` or of
    ``Structure`` dicts carrying targets in ``properties``; a pandas "split" table is accepted.
    """
    if isinstance(data, dict) and {"columns", "data"} <= set(data):
        data = [dict(zip(data["columns"], row, strict=True)) for row in data["data"]]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (structures with labels)")
    rows, structures = [], []
    for record in data:
        if "lattice" in record and "sites" in record:  # a Structure dict itself
            rows.append(dict(record.get("properties") or {}))
            structures.append(record)
            continue
        column = structure_column or first_present(list(record), STRUCTURE_COLUMNS)
        if column is None:
            raise DataError(
                f"{path}: an entry has no structure key {list(STRUCTURE_COLUMNS)}; "
                f"its keys are {sorted(record)}; pass structure_column="
            )
        rows.append({k: v for k, v in record.items() if k != column})
        structures.append(record.get(column))
    id_key = choose_id_key(rows, id_column, path)
    entries = []
    for index, (row, structure) in enumerate(zip(rows, structures, strict=True)):
        targets = {k: float(v) for k, v in row.items() if k != id_key and _is_number(v)}
        label = row.get("split")
        entries.append(
            Entry(
                id=_id(row.get(id_key) if id_key else None, path, index),
                targets=targets,
                parse=partial(atoms_from_cell, structure, f"entry {index}"),
                split=normalise_split_name(label, f"{path} entry {index}")
                if isinstance(label, str)
                else None,
            )
        )
    problems = _key_problems(rows, _targets(entries), "entry")
    return _source(path, "pymatgen json", entries, None, problems)


# -- shared -------------------------------------------------------------------------------


def _id(value: Any, path: Path, index: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{path.stem}:{index}"
    return str(value)


def value_problem(label: str, values: Sequence[Any], row_word: str) -> str:
    """Why the values of a column (or key) ``label`` cannot be a target, for the error a
    user gets on asking for it: empty, or the first value that is not a number."""
    missing = [v is None or (isinstance(v, str) and not v.strip()) or _is_nan(v) for v in values]
    if all(missing):
        return f"{label} is empty"
    bad = [
        (i, v)
        for i, (v, m) in enumerate(zip(values, missing, strict=True))
        if not m and not _numeric(v)
    ]
    if not bad:
        return f"{label} is not a target: it holds the ids, the split or true/false values"
    shown = repr(bad[0][1])
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    first = f"first bad value {shown} in {row_word} {bad[0][0]}"
    if len(bad) == sum(not m for m in missing):
        return f"{label} has no numeric values ({first})"
    return f"{label} has non-numeric values ({first}; {len(bad)} of {len(values)} {row_word}s)"


def _is_nan(value: Any) -> bool:
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _numeric(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _key_problems(
    rows: Sequence[dict[str, Any]], targets: Sequence[str], row_word: str
) -> dict[str, str]:
    """``value_problem`` for every key of ``rows`` that is not a target."""
    keys = dict.fromkeys(str(k) for r in rows for k in r if str(k) not in targets)
    return {k: value_problem(f"key {k!r}", [r.get(k) for r in rows], row_word) for k in keys}


def _targets(entries: Sequence[Entry]) -> list[str]:
    """The union of the entries' target keys, in first-seen order."""
    return list(dict.fromkeys(k for e in entries for k in e.targets))


def _source(
    path: Path,
    fmt: str,
    entries: list[Entry],
    targets: Sequence[str] | None = None,
    unusable: dict[str, str] | None = None,
) -> Source:
    """Wrap entries; targets default to the union of the entries' keys, in first-seen order."""
    if targets is None:
        targets = _targets(entries)
    ids = [e.id for e in entries]
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        logger.warning(
            "%s: %d duplicate ids; a split file puts every copy in its split", path, duplicates
        )
    labelled = any(e.split is not None for e in entries)
    # A user's column name says nothing reliable about its unit (e_form per atom or per
    # cell?), so only ASE's own quantities get one.
    units = {t: ASE_UNITS.get(t, "") for t in targets}
    return Source(
        name=path.name,
        entries=entries,
        units=units,
        native_split="labels" if labelled else None,
        provenance={"files": [str(path)], "format": fmt, "duplicate_ids": duplicates},
        unusable=unusable or {},
    )
