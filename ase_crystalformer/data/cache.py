"""On-disk cache of parsed datasets, so a second load never re-parses a structure.

An entry is one ``.npz`` of plain numeric arrays (read with ``allow_pickle=False``, so a
planted file cannot run code) plus a JSON header inside it. The key hashes the files read
(resolved path, size, mtime), the load options and ``CACHE_VERSION``; the header repeats
the full key, so a foreign, stale, truncated or garbled file is logged and rebuilt, never
trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from .pipeline import Options
from .records import Dataset, Record

logger = logging.getLogger(__name__)

#: Bump when parsing or the stored layout changes, so old entries are not reused.
CACHE_VERSION = 2


def cache_key(
    source: str, files: Sequence[Path], options: Options, extra: dict | None = None
) -> str:
    """A hex digest of everything that determines the dataset."""
    stamp = []
    for path in [*files, *([Path(options.split_file)] if options.split_file else [])]:
        stat = path.stat()
        stamp.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    payload = {
        "version": CACHE_VERSION,
        "source": source,
        "files": stamp,
        "options": asdict(options),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir: str | Path, name: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(cache_dir).expanduser() / f"{safe}-{key[:20]}.npz"


def load_cached(path: Path, key: str) -> Dataset | None:
    """The cached dataset, or None if absent or not a valid entry for ``key`` (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            header = json.loads(arrays["header"].tobytes().decode("utf-8"))
            if header.get("version") != CACHE_VERSION or header.get("key") != key:
                logger.warning(
                    "rebuilding dataset cache %s: it was written for other data, options or "
                    "cache version %r (this is version %d)",
                    path,
                    header.get("version"),
                    CACHE_VERSION,
                )
                return None
            dataset = _from_arrays(header, {name: arrays[name] for name in arrays.files})
    except Exception as exc:
        logger.warning(
            "rebuilding unreadable dataset cache %s (%s: %s)", path, type(exc).__name__, exc
        )
        return None
    logger.info("loaded %s from cache %s", dataset.name, path)
    return dataset


def save_cached(path: Path, dataset: Dataset, key: str) -> None:
    """Write atomically (temporary file + rename), so readers never see half an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header, arrays = _to_arrays(dataset)
    header.update(version=CACHE_VERSION, key=key)
    encoded = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, header=encoded, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_arrays(dataset: Dataset) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Records as concatenated arrays (NaN = target absent) and the rest as JSON."""
    records = dataset.records
    names = list(dict.fromkeys(t for r in records for t in r.targets))
    forces = [r.forces for r in records if r.forces is not None]
    stress = [r.stress for r in records if r.stress is not None]
    arrays = {
        "n_atoms": np.array([len(r.atoms) for r in records], dtype=np.int64),
        "numbers": np.concatenate([r.atoms.numbers for r in records] or [[]]).astype(np.int64),
        "positions": np.concatenate([r.atoms.positions for r in records] or [np.zeros((0, 3))]),
        "cells": np.array([r.atoms.cell.array for r in records], dtype=float).reshape(-1, 3, 3),
        "pbc": np.array([r.atoms.pbc for r in records], dtype=bool).reshape(-1, 3),
        "targets": np.array(
            [[r.targets.get(t, np.nan) for t in names] for r in records], dtype=float
        ).reshape(len(records), len(names)),
        "has_forces": np.array([r.forces is not None for r in records], dtype=bool),
        "forces": np.concatenate(forces or [np.zeros((0, 3))]).astype(float),
        "has_stress": np.array([r.stress is not None for r in records], dtype=bool),
        "stress": np.array(stress, dtype=float).reshape(-1, 6),
    }
    header = {
        "name": dataset.name,
        "ids": [r.id for r in records],
        "target_names": names,
        "splits": dataset.splits,
        "units": dataset.units,
        "skipped": [list(item) for item in dataset.skipped],
        "provenance": dataset.provenance,
    }
    return header, arrays


def _from_arrays(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Dataset:
    """The inverse of ``_to_arrays``; inconsistent sizes raise (and the entry is rebuilt)."""
    ids, names = header["ids"], header["target_names"]
    n_atoms = arrays["n_atoms"]
    ends = np.cumsum(n_atoms)
    force_rows = np.flatnonzero(arrays["has_forces"])
    force_ends = np.cumsum(n_atoms[force_rows])
    if not (
        len(ids) == len(n_atoms) == len(arrays["cells"]) == len(arrays["targets"])
        and arrays["targets"].shape[1] == len(names)
        and len(arrays["numbers"]) == len(arrays["positions"]) == (ends[-1] if len(ends) else 0)
        and len(arrays["forces"]) == (force_ends[-1] if len(force_ends) else 0)
        and len(arrays["stress"]) == int(arrays["has_stress"].sum())
    ):
        raise ValueError("array sizes do not match the header")
    forces = dict(zip(force_rows.tolist(), _split(arrays["forces"], force_ends), strict=True))
    stress = dict(zip(np.flatnonzero(arrays["has_stress"]).tolist(), arrays["stress"], strict=True))
    records = []
    for i, (numbers, positions) in enumerate(
        zip(_split(arrays["numbers"], ends), _split(arrays["positions"], ends), strict=True)
    ):
        cell, pbc = arrays["cells"][i], arrays["pbc"][i]
        atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
        row = arrays["targets"][i]
        targets = {t: float(v) for t, v in zip(names, row, strict=True) if not np.isnan(v)}
        records.append(Record(str(ids[i]), atoms, targets, forces.get(i), stress.get(i)))
    splits = {str(k): [int(i) for i in v] for k, v in header["splits"].items()}
    if any(i < 0 or i >= len(records) for v in splits.values() for i in v):
        raise ValueError("a split index points past the records")
    skipped = [(str(rid), str(reason)) for rid, reason in header["skipped"]]
    return Dataset(header["name"], records, splits, header["units"], skipped, header["provenance"])


def _split(array: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """``array`` cut into consecutive pieces ending at ``ends`` (none for no ends)."""
    return np.split(array, ends[:-1]) if len(ends) else []
