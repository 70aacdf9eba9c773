"""Reading crystal datasets for training and evaluation.

``load_dataset(source, targets)`` reads a built-in dataset of the shared data directory
(``BUILTIN_NAMES``) or a file (CSV, extxyz, ASE db, pymatgen or jarvis-tools JSON) into a
``Dataset`` of ``Record``s with train/val/test splits and provenance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ..errors import DataError
from .builtin import BUILTINS, ENV_VAR, resolve_data_dir
from .cache import cache_key, cache_path, load_cached, save_cached
from .files import SUFFIXES, load_file
from .pipeline import Options, assemble
from .records import Dataset, Record
from .splits import paper_split, ratio_split, read_split_file, split_by_ids

__all__ = [
    "BUILTIN_NAMES",
    "ENV_VAR",
    "Dataset",
    "Record",
    "load_dataset",
    "paper_split",
    "ratio_split",
    "read_split_file",
    "split_by_ids",
]

logger = logging.getLogger(__name__)

BUILTIN_NAMES = tuple(BUILTINS)


def load_dataset(
    source: str | Path,
    targets: Sequence[str] | str | None = None,
    *,
    data_dir: str | Path | None = None,
    structure_column: str | None = None,
    id_column: str | None = None,
    split_file: str | Path | None = None,
    split: Literal["source", "ratio", "paper"] | None = None,
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 123,
    primitive: bool = False,
    cache_dir: str | Path | None = None,
    kind: Literal["megnet", "dft_3d_2021"] | None = None,
) -> Dataset:
    """Load a dataset by built-in name or file path.

    ``targets=None`` takes every target of the source, keeping entries with at least one
    finite value; named targets must all be finite (entries that are not are dropped and
    counted in ``provenance``). ``split``: "source" is the source's own split (the default
    when it has one, else "ratio"), "ratio" is ``ratio_split``, "paper" is ``paper_split``
    with the source's fixed counts or ``int(ratio * total)``. ``split_file`` (JSON or text
    id lists, e.g. ``jarvis_leaderboard/*.json.zip``) replaces the split. ``primitive``
    applies the paper's primitive standard cell. ``kind`` names the jarvis-tools dataset
    of a JSON file when its file name does not. With ``cache_dir``, the parsed dataset is
    cached and reused as long as the files and options are unchanged.
    """
    if split is not None and split not in ("source", "ratio", "paper"):
        raise DataError(f"unknown split {split!r}; use 'source', 'ratio' or 'paper'")
    if split_file is not None and split is not None:
        raise DataError("give either split_file= or split=, not both")
    if isinstance(targets, str):
        targets = [targets]
    options = Options(
        targets=None if targets is None else tuple(targets),
        split=split,
        split_file=None if split_file is None else str(Path(split_file).expanduser()),
        split_ratios=tuple(float(r) for r in split_ratios),  # type: ignore[arg-type]
        seed=int(seed),
        primitive=bool(primitive),
    )
    name = str(source)
    if name in BUILTINS:
        root = resolve_data_dir(data_dir)
        builtin = BUILTINS[name]
        files = builtin.files(root)

        def read():
            return builtin.load(root)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(
                f"{name!r} is neither a built-in dataset {list(BUILTINS)} nor an existing file "
                f"({', '.join(SUFFIXES)})"
            )
        files = [path]

        def read():
            return load_file(
                path, structure_column=structure_column, id_column=id_column, kind=kind
            )

    target = None
    if cache_dir is not None:
        extra = {"structure_column": structure_column, "id_column": id_column, "kind": kind}
        key = cache_key(name, files, options, extra)
        target = cache_path(cache_dir, Path(name).name, key)
        cached = load_cached(target, key)
        if cached is not None:
            return cached
    start = time.perf_counter()
    dataset = assemble(read(), options)
    dataset.provenance["load_seconds"] = round(time.perf_counter() - start, 3)
    logger.info(
        "loaded %s: %d records, splits %s, %d skipped",
        dataset.name,
        len(dataset),
        dataset.provenance.get("split_sizes"),
        len(dataset.skipped),
    )
    if target is not None:
        dataset.provenance["cache_file"] = str(target)
        save_cached(target, dataset, key)
    return dataset
