"""From a loader's ``Source`` (entries + units) to a ``Dataset``: select and filter targets,
split, then parse and check each structure.

The split is computed over the target-filtered entries *before* structures are parsed, as in
the paper (filter, then split): a structure that later fails to parse drops out of its split
instead of reshuffling every other index.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from ..geometry import build_window
from .parse import clean_atoms, primitive_standard
from .records import Dataset, Entry, Record
from .splits import paper_counts, paper_split, ratio_split, read_split_file, split_by_ids

logger = logging.getLogger(__name__)

#: Radius of the neighbour search that finds overlapping atoms (< 0.1 Å). Any radius
#: ≥ 0.1 Å works; vesin is ~25× slower at 0.1 Å than at 1 Å (finer cell grid).
OVERLAP_SEARCH_CUTOFF = 1.0


@dataclass
class Source:
    """What a loader returns: entries, target units and how the source splits itself.

    ``native_split`` is "labels" (each entry carries ``split``), "paper" (the paper's
    shuffle, with ``fixed_counts(total)`` if the source has fixed counts) or None.
    """

    name: str
    entries: list[Entry]
    units: dict[str, str]
    native_split: str | None = None
    fixed_counts: Callable[[int], tuple[int, int, int]] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Columns or keys that are not targets, with why (empty, not numeric), so that asking
    #: for one says what is wrong with it instead of "unknown target".
    unusable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """The ``load_dataset`` options that shape a dataset (also hashed into the cache key)."""

    targets: tuple[str, ...] | None = None
    split: str | None = None
    split_file: str | None = None
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 123
    primitive: bool = False


def assemble(source: Source, options: Options) -> Dataset:
    """Filter, split, parse and check ``source`` into a ``Dataset``."""
    wanted = _select_targets(source, options.targets)
    entries, values, dropped = _filter_targets(source.entries, wanted, options.targets is not None)
    if options.targets is not None and source.entries:
        empty = [t for t in wanted if dropped[t] == len(source.entries)]
        if empty:
            raise DataError(
                f"{source.name}: target(s) {empty} have no finite value in any of the "
                f"{len(source.entries)} entries"
            )
    provenance: dict[str, Any] = {
        "source": source.name,
        **source.provenance,
        "targets": wanted,
        "n_entries": len(source.entries),
        "n_dropped_nonfinite": len(source.entries) - len(entries),
        "nonfinite_by_target": dropped,
        "primitive": options.primitive,
    }
    splits, split_info = _make_splits(source, entries, options)
    provenance["split"] = split_info

    records: list[Record] = []
    skipped: list[tuple[str, str]] = []
    new_index: dict[int, int] = {}
    prim_failed, prim_kept_forces = 0, 0
    for index, (entry, targets) in enumerate(zip(entries, values, strict=True)):
        try:
            atoms = clean_atoms(entry.parse())
            build_window(atoms, OVERLAP_SEARCH_CUTOFF, label=entry.id)  # check_atoms + overlaps
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            skipped.append((entry.id, reason))
            logger.info("skipping %s: %s", entry.id, reason)
            continue
        if options.primitive:
            if entry.forces is not None or entry.stress is not None:
                prim_kept_forces += 1  # forces belong to the given cell's atoms
            elif atoms.pbc.all():
                try:
                    atoms = primitive_standard(atoms)
                except Exception as exc:
                    prim_failed += 1
                    logger.info(
                        "%s: primitive cell failed (%s); keeping the given cell", entry.id, exc
                    )
        new_index[index] = len(records)
        records.append(Record(entry.id, atoms, targets, entry.forces, entry.stress))

    if skipped:
        logger.warning(
            "%s: skipped %d of %d structures (first: %s: %s)",
            source.name,
            len(skipped),
            len(entries),
            skipped[0][0],
            skipped[0][1],
        )
    if prim_failed:
        logger.warning(
            "%s: primitive cell failed for %d structures; kept their given cells",
            source.name,
            prim_failed,
        )
    if options.primitive:
        provenance["primitive_failed"] = prim_failed
        provenance["primitive_not_applied_force_data"] = prim_kept_forces
    splits = {k: [new_index[i] for i in v if i in new_index] for k, v in splits.items()}
    provenance["n_records"] = len(records)
    provenance["n_skipped"] = len(skipped)
    provenance["split_sizes"] = {k: len(v) for k, v in splits.items()}
    units = {t: source.units.get(t, "") for t in wanted}
    return Dataset(source.name, records, splits, units, skipped, provenance)


def split_ids(source: Source, options: Options) -> dict[str, list[str]]:
    """The ids of each split that ``assemble`` would make, without parsing a structure.

    Used to keep a source's held-out ids out of other datasets' training data even where
    the structure itself would fail to parse.
    """
    wanted = _select_targets(source, options.targets)
    entries, _, _ = _filter_targets(source.entries, wanted, options.targets is not None)
    splits, _ = _make_splits(source, entries, options)
    return {name: [entries[i].id for i in indices] for name, indices in splits.items()}


def _select_targets(source: Source, targets: Sequence[str] | None) -> list[str]:
    available = list(source.units)
    if targets is None:
        return available
    problems = [source.unusable[t] for t in targets if t in source.unusable]
    unknown = [t for t in targets if t not in source.units and t not in source.unusable]
    if unknown:
        problems.append(f"unknown target(s) {unknown}")
    if problems:
        raise DataError(f"{source.name}: {'; '.join(problems)}; available: {available or 'none'}")
    return list(dict.fromkeys(targets))


def _filter_targets(
    entries: list[Entry], wanted: list[str], explicit: bool
) -> tuple[list[Entry], list[dict[str, float]], dict[str, int]]:
    """Requested targets must all be finite; with ``targets=None`` at least one must be."""
    kept, values = [], []
    dropped = dict.fromkeys(wanted, 0)
    for entry in entries:
        finite = {}
        for t in wanted:
            v = entry.targets.get(t, math.nan)
            if isinstance(v, (int, float)) and math.isfinite(v):
                finite[t] = float(v)
            else:
                dropped[t] += 1
        if wanted and (len(finite) < len(wanted) if explicit else not finite):
            continue
        kept.append(entry)
        values.append(finite)
    return kept, values, dropped


def _make_splits(
    source: Source, entries: list[Entry], options: Options
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    total = len(entries)
    if options.split_file is not None:
        ids_by_split = read_split_file(options.split_file)
        splits, missing = split_by_ids(ids_by_split, [e.id for e in entries])
        n_missing = {k: len(v) for k, v in missing.items()}
        if any(n_missing.values()):
            logger.warning(
                "%s: split file %s lists ids without an entry: %s",
                source.name,
                options.split_file,
                {k: v[:5] for k, v in missing.items() if v},
            )
        info = {
            "method": "file",
            "file": str(options.split_file),
            "missing_ids": n_missing,
            "missing_examples": {k: v[:10] for k, v in missing.items() if v},
        }
        return splits, info
    method = options.split or ("source" if source.native_split else "ratio")
    if method == "source":
        if source.native_split == "labels":
            splits: dict[str, list[int]] = {}
            for i, e in enumerate(entries):
                if e.split is not None:
                    splits.setdefault(e.split, []).append(i)
            return splits, {"method": "source labels"}
        if source.native_split == "paper":
            method = "paper"
        else:
            logger.info("%s defines no split; splits left empty", source.name)
            return {}, {"method": "none"}
    if method == "ratio":
        return ratio_split(total, options.split_ratios, options.seed), {
            "method": "ratio",
            "ratios": list(options.split_ratios),
            "seed": options.seed,
        }
    if method == "paper":
        if source.fixed_counts is not None:
            counts = source.fixed_counts(total)
        else:
            counts = paper_counts(total, options.split_ratios)
        return paper_split(total, *counts, seed=options.seed), {
            "method": "paper",
            "counts": list(counts),
            "seed": options.seed,
            "total": total,
        }
    raise DataError(f"unknown split {method!r}; use 'source', 'ratio' or 'paper'")
