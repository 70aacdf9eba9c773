"""Train/val/test splits: the paper's seeded shuffle, a seeded ratio split, and id lists.

All functions return ``{"train": [...], "val": [...], "test": [...]}`` of indices.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from .parse import read_json
from .records import SPLIT_NAMES

logger = logging.getLogger(__name__)

_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def paper_split(
    total: int, n_train: int, n_val: int, n_test: int, seed: int = 123
) -> dict[str, list[int]]:
    """ALIGNN/Matformer ``get_id_train_val_test``, used by Crystalformer.

    Shuffle ``list(range(total))`` with the Python stdlib RNG seeded with ``seed`` (same
    sequence as ``random.seed(seed); random.shuffle(ids)``, without touching the global
    RNG). Train is the first ``n_train``, test the last ``n_test``, val the ``n_val`` just
    before test; indices between train and val stay unused when the counts do not add up.
    """
    counts = (n_train, n_val, n_test)
    if min(counts) < 0 or sum(counts) > total:
        raise DataError(f"split counts {counts} do not fit {total} entries")
    ids = list(range(total))
    random.Random(seed).shuffle(ids)
    return {
        "train": ids[:n_train],
        "val": ids[total - n_test - n_val : total - n_test],
        "test": ids[total - n_test :],
    }


def paper_counts(total: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """The paper's ratio counts: ``int(ratio * total)`` each, the remainder left unused."""
    _check_ratios(ratios)
    n_train, n_val, n_test = (int(r * total) for r in ratios)
    return n_train, n_val, n_test


def ratio_split(
    total: int, ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 123
) -> dict[str, list[int]]:
    """A seeded random split by ``ratios`` (numpy ``default_rng(seed)`` permutation).

    Train and val get ``round(ratio * total)``; when the ratios sum to 1, test gets every
    remaining index, so nothing is left unused.
    """
    _check_ratios(ratios)
    n_train = round(ratios[0] * total)
    n_val = min(round(ratios[1] * total), total - n_train)
    if abs(sum(ratios) - 1.0) < 1e-9:
        n_test = total - n_train - n_val
    else:
        n_test = min(round(ratios[2] * total), total - n_train - n_val)
    order = np.random.default_rng(seed).permutation(total).tolist()
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val : n_train + n_val + n_test],
    }


def _check_ratios(ratios: Sequence[float]) -> None:
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) > 1 + 1e-9 or sum(ratios) <= 0:
        raise DataError(
            f"split_ratios must be three non-negative fractions (train, val, test) summing "
            f"to at most 1; got {tuple(ratios)}"
        )


def split_by_ids(
    ids_by_split: Mapping[str, Iterable[str]], record_ids: Sequence[str]
) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """Map id lists to indices into ``record_ids``; also return the ids that were not found.

    A record id that occurs several times puts every occurrence into the split.
    """
    where: dict[str, list[int]] = {}
    for index, rid in enumerate(record_ids):
        where.setdefault(rid, []).append(index)
    splits: dict[str, list[int]] = {}
    missing: dict[str, list[str]] = {}
    for name, ids in ids_by_split.items():
        splits[name], missing[name] = [], []
        for rid in ids:
            if rid in where:
                splits[name].extend(where[rid])
            else:
                missing[name].append(rid)
    seen: dict[int, str] = {}
    for name, indices in splits.items():
        for i in indices:
            if i in seen and seen[i] != name:
                raise DataError(
                    f"id {record_ids[i]!r} is in both the {seen[i]!r} and the {name!r} split"
                )
            seen[i] = name
    return splits, missing


def normalise_split_name(name: str, where: str) -> str:
    """'train'/'val'/'test', accepting common aliases ('valid', 'validation', ...)."""
    try:
        return _ALIASES[str(name).strip().lower()]
    except KeyError:
        raise DataError(f"{where}: unknown split name {name!r}; use {list(SPLIT_NAMES)}") from None


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """Id lists per split from a file.

    JSON (also ``.json.zip``/``.json.gz``, e.g. ``jarvis_leaderboard/*.json.zip``):
    ``{"train": [ids] or {id: value}, "val": ..., "test": ...}``. Any other file is text,
    one ``<split> <id>`` per line (separated by whitespace, ',' or ':'); '#' starts a comment.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    if ".json" in path.suffixes:
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: a split file holds a JSON object of train/val/test id lists")
        out: dict[str, list[str]] = {}
        for name, ids in data.items():
            key = normalise_split_name(name, str(path))
            if isinstance(ids, dict):
                out[key] = [str(i) for i in ids]
            elif isinstance(ids, list):
                out[key] = [str(next(iter(i))) if isinstance(i, dict) else str(i) for i in ids]
            else:
                raise DataError(f"{path}: split {name!r} is neither a list nor a mapping of ids")
        return out
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p for p in re.split(r"[\s,:]+", line, maxsplit=1) if p]
        if len(parts) != 2:
            raise DataError(f"{path}:{number}: expected '<split> <id>', got {line!r}")
        key = normalise_split_name(parts[0], f"{path}:{number}")
        out.setdefault(key, []).append(parts[1].strip())
    return out
