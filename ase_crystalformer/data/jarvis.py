"""jarvis-tools datasets: the JSON that ``jarvis.db.figshare.data(name)`` delivers.

A list of dicts, each with an ``atoms`` dict (``lattice_mat`` rows = lattice vectors in Å,
``coords``, ``elements``, ``cartesian``), an id (``jid`` for JARVIS-DFT, ``id`` for MEGNet)
and labels, where a missing label is the string ``'na'``.

The kind decides the paper split: ``megnet`` uses the fixed counts
60000/5000/4239 of the 69,239-entry snapshot; ``dft_3d_2021`` (and any other JARVIS file)
uses ``int(ratio * total)`` of the entries left after target filtering.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import DataError
from .parse import atoms_from_jarvis, read_json
from .pipeline import Source
from .records import Entry, as_float

logger = logging.getLogger(__name__)

KINDS = ("megnet", "dft_3d_2021")

#: MEGNet snapshot size and the paper's fixed split counts for it.
MEGNET_TOTAL = 69239
MEGNET_COUNTS = (60000, 5000, 4239)

#: Raw JARVIS keys renamed to this package's target names (shared with ``mp-megnet``).
RENAME = {"megnet": {"gap pbe": "band_gap"}}

UNITS = {
    "e_form": "eV/atom",
    "band_gap": "eV",
    "formation_energy_peratom": "eV/atom",
    "optb88vdw_total_energy": "eV/atom",
    "optb88vdw_bandgap": "eV",
    "mbj_bandgap": "eV",
    "hse_gap": "eV",
    "ehull": "eV/atom",
    "bulk_modulus_kv": "GPa",
    "shear_modulus_gv": "GPa",
}

#: File names jarvis-tools downloads, looked up in the data directory for built-in names.
FILE_NAMES = {
    "megnet": ("megnet.json", "megnet.json.zip"),
    "dft_3d_2021": (
        "jdft_3d-4-26-2021.json",
        "jdft_3d-4-26-2021.json.zip",
        "dft_3d_2021.json",
        "dft_3d_2021.json.zip",
    ),
}

_ID_KEYS = ("jid", "id")
_NOT_TARGETS = {"atoms", "jid", "id"}


def is_jarvis(data: Any) -> bool:
    """A JSON list of dicts whose ``atoms`` is a jarvis-tools Atoms dict."""
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return False
    atoms = data[0].get("atoms")
    return isinstance(atoms, dict) and "lattice_mat" in atoms


def detect_kind(path: Path, kind: str | None) -> str | None:
    """``kind`` if given, else 'megnet'/'dft_3d_2021' from the file name, else None."""
    if kind is not None:
        if kind not in KINDS:
            raise DataError(f"unknown JARVIS dataset kind {kind!r}; use one of {list(KINDS)}")
        return kind
    name = path.name.lower()
    if "megnet" in name:
        return "megnet"
    if "dft_3d" in name:
        return "dft_3d_2021"
    return None


def find_file(root: Path, kind: str) -> Path:
    """The jarvis-tools file of ``kind`` in ``root`` (or ``root/jarvis``)."""
    for folder in (root, root / "jarvis"):
        for name in FILE_NAMES[kind]:
            if (folder / name).is_file():
                return folder / name
    raise DataError(
        f"no jarvis-tools {kind!r} file in {root} (looked for {list(FILE_NAMES[kind])}); "
        f"get it with `jarvis.db.figshare.data({kind!r})` on a machine with internet, or "
        "pass the JSON file's path as the source"
    )


def megnet_counts(total: int) -> tuple[int, int, int]:
    """60000/5000/4239 for the full snapshot; the same fractions for any other size."""
    if total == MEGNET_TOTAL:
        return MEGNET_COUNTS
    logger.warning(
        "megnet file has %d usable entries, not %d: using the paper's fractions instead of "
        "its fixed counts (the split is not the paper's)",
        total,
        MEGNET_TOTAL,
    )
    n_train, n_val, n_test = (int(c / MEGNET_TOTAL * total) for c in MEGNET_COUNTS)
    return n_train, n_val, n_test


def load_jarvis(
    path: Path,
    data: list[dict[str, Any]] | None = None,
    *,
    kind: str | None = None,
    id_column: str | None = None,
) -> Source:
    """A jarvis-tools JSON list as a ``Source`` whose own split is the paper's shuffle."""
    if data is None:
        data = read_json(path)
    if not is_jarvis(data):
        raise DataError(f"{path} is not a jarvis-tools dataset (a JSON list of dicts with 'atoms')")
    kind = detect_kind(path, kind)
    rename = RENAME.get(kind or "", {})
    id_key = id_column or next((k for k in _ID_KEYS if k in data[0]), None)
    if id_column is not None and id_column not in data[0]:
        raise DataError(f"{path}: no id key {id_column!r}; keys are {sorted(data[0])}")

    # A key is a target if some row holds a number there ('na' marks the missing ones).
    target_keys = list(
        dict.fromkeys(
            key
            for row in data
            for key, value in row.items()
            if isinstance(value, (int, float))
            and not isinstance(value, bool)
            and key not in _NOT_TARGETS
            and key != id_key
        )
    )
    entries = []
    for index, row in enumerate(data):
        rid = str(row[id_key]) if id_key and row.get(id_key) is not None else f"{path.stem}:{index}"
        targets = {rename.get(k, k): as_float(row.get(k)) for k in target_keys}
        entries.append(Entry(rid, targets, partial(atoms_from_jarvis, row.get("atoms"))))
    names = [rename.get(k, k) for k in target_keys]
    return Source(
        name=kind or path.stem,
        entries=entries,
        units={n: UNITS.get(n, "") for n in names},
        native_split="paper",
        fixed_counts=megnet_counts if kind == "megnet" else None,
        provenance={
            "files": [str(path)],
            "format": "jarvis-tools json",
            "kind": kind,
            "renamed": {k: v for k, v in rename.items() if k in target_keys},
        },
    )
