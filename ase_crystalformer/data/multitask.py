"""Several datasets as one multi-task training set: rows merged by material id, tasks kept apart.

A *task* is one learned output, fed by one or more (source, column) pairs::

    e_form@megnet=mp-megnet:e_form          MEGNet's formation energies
    e_form@mp20=mp20:formation_energy_per_atom   MP-20's, under MP's newer corrections
    band_gap@mp=mp20:band_gap  band_gap@mp=mp-li:band_gap   one scheme, two sources

The same quantity under different label schemes is two tasks; a task fed by several sources
says so explicitly, and a plain column name that several sources share is refused. Every
structure keeps only the labels it has (missing ones are NaN, and the training loss masks
them), so no row is dropped because one of its tasks is missing.

Splits. A source with a split of its own (MEGNet's leaderboard split, mp-elastic's and
perov5's) keeps it; a source without one (mp20, mp-li, mp40, mp2015, carbon24, a file) is
split ``val_fraction`` / rest into val / train, with no test part. An id takes the role of
the sources with their own split when any has it (the most held-out one: test > val >
train), else the most held-out drawn role, so a draw never takes a MEGNet training
structure out of training; and an id in ``exclude`` (the
MEGNet val/test ids and the test ids of the shipped models' splits, ``holdout_ids``) never
trains: such ids found only in sources that would train on them are left out of every split
and counted in the provenance.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .builtin import BUILTINS, LEADERBOARD, resolve_data_dir
from .parse import read_json
from .pipeline import Options, split_ids
from .records import SPLIT_NAMES, Dataset, Record
from .splits import ratio_split

logger = logging.getLogger(__name__)

#: The held-out splits of the shipped models' datasets: never training data for anything.
#: mp-li and mp40 (merged, mp-e_above_hull: scripts/export_extxyz.py) have no split of their
#: own in a multi-task run, so a backbone would draw their val ids into training and the
#: model fine-tuned from it would be chosen and calibrated on structures it saw: both
#: held-out parts are listed (the shipped backbone predates this and trained on that val).
SHIPPED_HOLDOUTS: dict[str, tuple[str, ...]] = {
    "mp-elastic": ("test",), "perov5": ("test",),
    "mp-li": ("val", "test"), "mp40": ("val", "test"),
}
_RANK = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class TaskSource:
    """One column of one source that feeds task ``task``."""

    task: str
    source: str
    column: str

    def __str__(self) -> str:
        return f"{self.task}={self.source}:{self.column}"


def parse_tasks(texts: Sequence[str], columns: Mapping[str, Sequence[str]]) -> list[TaskSource]:
    """``TASK=SOURCE:COLUMN`` or a plain ``COLUMN`` (task of the same name, from the one
    source that has it) into task sources; ``columns`` maps each source to its columns."""
    out: list[TaskSource] = []
    for text in texts:
        task, sep, rest = text.partition("=")
        if sep:
            source, colon, column = rest.rpartition(":")
            if not colon or not task or not column:
                raise DataError(f"task {text!r}: expected TASK=SOURCE:COLUMN or COLUMN")
            if source not in columns:
                raise DataError(f"task {text!r}: {source!r} is not one of the datasets {list(columns)}")
            if column not in columns[source]:
                raise DataError(
                    f"task {text!r}: {source} has no column {column!r}; it has {list(columns[source])}"
                )
            out.append(TaskSource(task, source, column))
            continue
        having = [s for s, cols in columns.items() if text in cols]
        if not having:
            raise DataError(f"target {text!r} is a column of none of {list(columns)}")
        if len(having) > 1:
            raise DataError(
                f"target {text!r} is a column of {having}: labels of one quantity from different "
                f"sources may follow different schemes; name each task, e.g. "
                f"--target {text}@{having[0]}={having[0]}:{text} (give one task name to several "
                f"sources only where they share a scheme)"
            )
        out.append(TaskSource(text, having[0], text))
    seen = set()
    for item in out:
        if (item.source, item.column) in seen:
            raise DataError(f"{item.source}:{item.column} feeds more than one task")
        seen.add((item.source, item.column))
    return out


def holdout_ids(data_dir: str | Path | None) -> dict[str, set[str]]:
    """Ids that no multi-task run may train on, by reason: the MEGNet leaderboard's val and
    test ids (every id, with or without a structure here) and the test ids of the shipped
    models' splits (``SHIPPED_HOLDOUTS``, computed as their loaders split, before parsing)."""
    root = resolve_data_dir(data_dir)
    out: dict[str, set[str]] = {}
    for name in ("val", "test"):
        out[f"mp-megnet {name}"] = {
            rid for f in LEADERBOARD.values() for rid in read_json(root / f).get(name, {})
        }
    for source, parts in SHIPPED_HOLDOUTS.items():
        splits = split_ids(BUILTINS[source].load(root), Options())
        for part in parts:
            out[f"{source} {part}"] = set(splits.get(part, []))
    return out


def merge(
    datasets: Mapping[str, Dataset],
    tasks: Sequence[TaskSource],
    *,
    exclude: Mapping[str, Iterable[str]] | None = None,
    val_fraction: float = 0.05,
    seed: int = 123,
) -> Dataset:
    """One ``Dataset`` whose targets are the tasks (module docstring for the split rules).

    ``datasets`` are in precedence order: an id's structure comes from the first source
    that has it, and where two sources feed one task for the same id, the first one's value
    is kept (the disagreements are counted per task in the provenance).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    names = list(dict.fromkeys(t.task for t in tasks))
    if not names:
        raise DataError("no task given")
    excluded = {reason: set(ids) for reason, ids in (exclude or {}).items()}
    strengths = {name: int(_has_split(ds)) for name, ds in datasets.items()}
    roles = {name: _roles(ds, val_fraction, seed) for name, ds in datasets.items()}
    records: dict[str, Record] = {}
    role_of: dict[str, tuple[int, int]] = {}  # (own split?, rank) of the strongest role
    origin: dict[str, str] = {}
    conflicts = dict.fromkeys(names, 0)
    worst = dict.fromkeys(names, 0.0)
    for source, ds in datasets.items():
        feeds = [t for t in tasks if t.source == source]
        for index, record in enumerate(ds.records):
            labels = {t.task: record.targets[t.column] for t in feeds if t.column in record.targets}
            if not labels:
                continue
            merged = records.get(record.id)
            if merged is None:
                records[record.id] = Record(record.id, record.atoms, {}, record.forces, record.stress)
                merged, origin[record.id] = records[record.id], source
            for task, value in labels.items():
                if task in merged.targets:
                    if merged.targets[task] != value:
                        conflicts[task] += 1
                        worst[task] = max(worst[task], abs(merged.targets[task] - value))
                else:
                    merged.targets[task] = value
            role = roles[source].get(index)
            if role is not None:  # a source's own split outranks a drawn one, then test > val > train
                key = (strengths[source], _RANK[role])
                if record.id not in role_of or key > role_of[record.id]:
                    role_of[record.id] = key
    splits: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    removed = {reason: 0 for reason in excluded}
    ordered = list(records.values())
    names_of = {rank: name for name, rank in _RANK.items()}
    for i, record in enumerate(ordered):
        role = names_of[role_of[record.id][1]] if record.id in role_of else None
        if role == "train":
            hits = [reason for reason, ids in excluded.items() if record.id in ids]
            for reason in hits:
                removed[reason] += 1
            role = None if hits else role
        if role is not None:
            splits[role].append(i)
    units: dict[str, str] = {}
    for t in tasks:
        units.setdefault(t.task, datasets[t.source].units.get(t.column, ""))
    provenance = _provenance(datasets, tasks, ordered, splits, removed, conflicts, worst, origin,
                             val_fraction, seed)
    skipped = [item for ds in datasets.values() for item in ds.skipped]
    for task in names:
        if conflicts[task]:
            logger.warning("task %s: %d ids labelled differently by two sources (largest "
                           "difference %.4g); the first source's value kept", task, conflicts[task],
                           worst[task])
    return Dataset("multitask", ordered, {k: v for k, v in splits.items() if v}, units, skipped,
                   provenance)


def _has_split(dataset: Dataset) -> bool:
    """Whether the source has a split of its own (labels, the paper's shuffle or a file),
    not only a default ratio split."""
    return dataset.provenance.get("split", {}).get("method") not in ("ratio", "none", None)


def _roles(dataset: Dataset, val_fraction: float, seed: int) -> dict[int, str]:
    """Split of each record index: the source's own, or val_fraction/rest for a source
    whose split is only a default ratio split (or none)."""
    if not _has_split(dataset):
        n = len(dataset.records)
        split = ratio_split(n, (1.0 - val_fraction, val_fraction, 0.0), seed)
    else:
        split = dataset.splits
    return {i: name for name, indices in split.items() for i in indices}


def _provenance(datasets, tasks, records, splits, removed, conflicts, worst, origin,
                val_fraction, seed) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for task in dict.fromkeys(t.task for t in tasks):
        counts[task] = {
            name: int(sum(task in records[i].targets for i in indices))
            for name, indices in splits.items()
        }
    structures = {source: 0 for source in datasets}
    for source in origin.values():
        structures[source] += 1
    return {
        "source": "multitask",
        "sources": {
            name: {
                "n_records": len(ds.records),
                "structures_taken": structures[name],
                "split": ds.provenance.get("split"),
                "files": ds.provenance.get("files"),
            }
            for name, ds in datasets.items()
        },
        "tasks": {
            task: {"from": [f"{t.source}:{t.column}" for t in tasks if t.task == task],
                   "labels": counts[task], "conflicts": conflicts[task],
                   "largest_conflict": None if not conflicts[task] else worst[task]}
            for task in counts
        },
        "excluded_from_train": removed,
        "rule": "sources without their own split: val_fraction drawn to val, the rest train; an id "
                "takes the most held-out role (test > val > train) of the sources with their own "
                "split that have it, else of the drawn ones; excluded ids never train",
        "val_fraction": val_fraction,
        "seed": seed,
        "n_records": len(records),
        "split_sizes": {k: len(v) for k, v in splits.items()},
    }


def load_multitask(
    sources: Sequence[str],
    targets: Sequence[str],
    *,
    data_dir: str | Path | None = None,
    exclude: Mapping[str, Iterable[str]] | None = None,
    val_fraction: float = 0.05,
    seed: int = 123,
    **load_options: Any,
) -> Dataset:
    """Load each of ``sources`` (``load_dataset``: built-in names or files) and ``merge`` them
    into the tasks ``targets`` (``parse_tasks`` syntax). ``exclude=None`` means
    ``holdout_ids(data_dir)`` when any source is built in, else nothing."""
    from . import load_dataset

    if len(set(sources)) != len(sources):
        raise DataError(f"a dataset is given twice: {list(sources)}")
    datasets = {s: load_dataset(s, None, data_dir=data_dir, seed=seed, **load_options) for s in sources}
    tasks = parse_tasks(targets, {s: ds.targets for s, ds in datasets.items()})
    if exclude is None:
        exclude = holdout_ids(data_dir) if any(s in BUILTINS for s in sources) else {}
    dataset = merge(datasets, tasks, exclude=exclude, val_fraction=val_fraction, seed=seed)
    for task, info in dataset.provenance["tasks"].items():
        if not info["labels"].get("train"):
            raise DataError(f"task {task} ({', '.join(info['from'])}) has no training label")
    return dataset

