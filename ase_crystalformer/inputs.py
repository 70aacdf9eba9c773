"""Structures named on the command line: structure files, folders of them, and tables.

``crystalformer predict`` and ``crystalformer featurize`` both read through here, so they
take the same inputs and give the same messages for ones that cannot be read:

* a structure file in any format ``ase.io.read`` knows (CIF, POSCAR, extxyz, ASE db, ...),
  every frame of it;
* a folder: each (non-hidden) file in it, in name order;
* a table (``.csv``, ``.json``, ``.json.gz``, ``.zip`` holding one JSON file, ``.parquet``)
  with a column of CIF/POSCAR text or pymatgen Structure dicts; a ``.json`` file that is a
  single pymatgen Structure dict, or not a table at all (an ASE JSON database), is a
  structure file.

Every input becomes one ``Entry`` per structure, with a label ("si.cif", "frames.extxyz@1",
"table.csv@3": frame or row k, from 0) and either the atoms or the reason it could not be
read, so that a caller can stop at the first bad one or report each and go on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ase import Atoms

from .errors import CrystalformerError, DataError, StructureError

#: File names read as tables (lower case).
TABLE_SUFFIXES = (".csv", ".json", ".json.gz", ".zip", ".parquet")


@dataclass(frozen=True)
class Entry:
    """One structure of the input: its atoms, or why it could not be read."""

    label: str
    atoms: Atoms | None
    error: str | None = None


def is_table(path: Path) -> bool:
    return path.name.lower().endswith(TABLE_SUFFIXES)


def read_inputs(paths: Iterable[str | Path], column: str = "structure") -> list[Entry]:
    """Every structure of every input, in order (folders expanded, tables row by row).

    A structure or file that cannot be read is an entry with an ``error``; an input that
    cannot be used at all (an empty folder, a table without ``column``) raises ``DataError``.
    """
    entries: list[Entry] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise DataError(f"{path}: no files in this folder")
        else:
            files = [path]
        for file in files:
            try:
                table = read_table(file) if is_table(file) else None
            except DataError as err:  # an unreadable table is one bad input, as a bad file is
                entries.append(Entry(str(file), None, str(err)))
                continue
            entries += _file_entries(file) if table is None else table_entries(table, column, file)
    return entries


def read_table(path: Path) -> pd.DataFrame | None:
    """The table in ``path``; None for a ``.json`` that is not a table (a structure, a db).

    CSV (leading '# ...' lines skipped), JSON (records, columns or pandas "split"; .gz/.zip
    too) or Parquet.
    """
    from .data.files import read_csv_frame
    from .data.parse import read_json

    name = path.name.lower()
    if name.endswith(".csv"):
        return read_csv_frame(path)
    if name.endswith(".parquet"):
        try:
            return pd.read_parquet(path)
        except ImportError as err:
            raise DataError(f"{path}: reading Parquet needs pyarrow ({err})") from err
        except Exception as err:
            raise DataError(f"{path}: cannot read Parquet ({type(err).__name__}: {err})") from err
    if not name.endswith((".json", ".json.gz", ".zip")):
        raise DataError(f"{path}: unknown table format; use .csv, .json or .parquet")
    data = read_json(path)
    if isinstance(data, list):
        return pd.DataFrame(data)
    if isinstance(data, dict) and {"columns", "data"} <= set(data):
        return pd.DataFrame(data["data"], columns=data["columns"], index=data.get("index"))
    if isinstance(data, dict) and data and all(isinstance(v, (list, dict)) for v in data.values()):
        return pd.DataFrame(data)  # column -> values (a Structure dict or an ASE db has scalars)
    return None


def table_entries(table: pd.DataFrame, column: str, path: Path) -> list[Entry]:
    """One entry per row of ``table``, read from its ``column``."""
    if column not in table.columns:
        raise DataError(
            f"{path}: no column {column!r} (pass the one holding the structures with --column); "
            f"columns: {[str(c) for c in table.columns]}"
        )
    entries = []
    for row, value in enumerate(table[column]):
        label = f"{path}@{row}"
        try:
            entries.append(Entry(label, parse_cell(value)))
        except StructureError as err:
            entries.append(Entry(label, None, f"{label}: {err}"))
    return entries


def parse_cell(value: Any) -> Atoms:
    """Atoms from one cell of a structure column: CIF/POSCAR text or a pymatgen dict.

    Every failure is a ``StructureError`` saying the structure could not be read, so that one
    bad row is a reported row, never the end of the run.
    """
    from .data.parse import atoms_from_pmg_dict, atoms_from_text

    if isinstance(value, Atoms):
        return value
    try:
        return atoms_from_pmg_dict(value) if isinstance(value, dict) else atoms_from_text(value)
    except Exception as err:
        reason = str(err) if isinstance(err, CrystalformerError) else f"{type(err).__name__}: {err}"
        raise StructureError(f"cannot read the structure ({reason.strip()})") from err


def read_file(path: Path) -> list[Atoms]:
    """Every frame of a structure file; ``StructureError`` naming the file and the format if
    it cannot be parsed (ASE's own message kept when it says something)."""
    from ase.io import read
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    if path.name.lower().endswith((".json", ".json.gz", ".zip")):
        from .data.parse import atoms_from_pmg_dict, read_json

        data = read_json(path)
        if isinstance(data, dict) and {"lattice", "sites"} <= set(data):
            return [atoms_from_pmg_dict(data)]
    try:
        fmt = filetype(str(path), guess=True)
    except (UnknownFileTypeError, OSError) as err:
        raise StructureError(f"{path}: not a structure file ASE can read ({err})") from err
    what = "CIF" if fmt == "cif" else ioformats[fmt].description if fmt in ioformats else fmt
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ase warns about CIF details it then handles
            frames = read(str(path), index=":", format=fmt)
    except Exception as err:
        message = str(err).strip()
        detail = f"{type(err).__name__}: {message}" if message else type(err).__name__
        raise StructureError(
            f"{path}: could not be parsed as {what} ({detail}); the file may be truncated or corrupt"
        ) from err
    if not frames:
        raise StructureError(f"{path}: no structure found in this {what} file; the file may be truncated or corrupt")
    return frames


def _file_entries(path: Path) -> list[Entry]:
    try:
        frames = read_file(path)
    except CrystalformerError as err:
        return [Entry(str(path), None, str(err))]
    if len(frames) == 1:
        return [Entry(str(path), frames[0])]
    return [Entry(f"{path}@{k}", atoms) for k, atoms in enumerate(frames)]
