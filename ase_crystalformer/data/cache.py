"""On-disk cache of parsed datasets, so a second load never re-parses a structure.

The key hashes the files read (resolved path, size, mtime), the load options and
``CACHE_VERSION``; editing a file or changing an option makes a new entry. The cache is a
pickle of this package's own objects: only point ``cache_dir`` at a folder you trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .pipeline import Options
from .records import Dataset

logger = logging.getLogger(__name__)

#: Bump when parsing or the pickled classes change, so old entries are not reused.
CACHE_VERSION = 1


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
    return Path(cache_dir).expanduser() / f"{safe}-{key[:20]}.pkl"


def load_cached(path: Path) -> Dataset | None:
    """The cached dataset, or None if absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            dataset = pickle.load(handle)
    except Exception as exc:  # noqa: BLE001 - truncated or stale pickle: rebuild rather than fail
        logger.warning("ignoring unreadable dataset cache %s (%s)", path, exc)
        return None
    if not isinstance(dataset, Dataset):
        logger.warning("ignoring dataset cache %s: not a Dataset", path)
        return None
    logger.info("loaded %s from cache %s", dataset.name, path)
    return dataset


def save_cached(path: Path, dataset: Dataset) -> None:
    """Write atomically (temporary file + rename), so readers never see half a pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(dataset, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
