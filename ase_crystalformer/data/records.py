"""The containers every loader produces: ``Record`` (one crystal) and ``Dataset``.

``Entry`` is the loaders' intermediate form: an id, its labels and a deferred structure
parser, so that entries dropped by target filtering are never parsed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from ..errors import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(eq=False)
class Record:
    """One labelled crystal: positions in Å, cell rows are lattice vectors, pbc set.

    ``targets`` holds only finite values: a target that is NaN for this crystal is absent.
    ``forces`` (n, 3) eV/Å and ``stress`` (6,) Voigt eV/Å³ (ASE sign convention) are set
    for force data only.
    """

    id: str
    atoms: Atoms
    targets: dict[str, float]
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        # Written out because the dataclass default compares arrays with ``==``.
        if not isinstance(other, Record):
            return NotImplemented
        return (
            self.id == other.id
            and self.targets == other.targets
            and self.atoms == other.atoms
            and _same_array(self.forces, other.forces)
            and _same_array(self.stress, other.stress)
        )


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


@dataclass
class Dataset:
    """Records, their splits (indices into ``records``) and where they came from.

    ``splits`` is ``{}`` when the source defines none and none was asked for.
    ``skipped`` lists (id, reason) for every structure that could not be parsed or was
    physically invalid; ``provenance`` is JSON-serialisable (it goes into checkpoints).
    """

    name: str
    records: list[Record]
    splits: dict[str, list[int]]
    units: dict[str, str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def targets(self) -> list[str]:
        """The target names this dataset was loaded with."""
        return list(self.units)

    def subset(self, split: str) -> list[Record]:
        """The records of one split ('train', 'val' or 'test')."""
        if split not in self.splits:
            have = sorted(self.splits) or "none"
            raise DataError(f"dataset {self.name!r} has no split {split!r}; it has {have}")
        return [self.records[i] for i in self.splits[split]]

    def values(self, target: str, split: str | None = None) -> np.ndarray:
        """One target over all records (or one split), NaN where a record lacks it."""
        records = self.records if split is None else self.subset(split)
        return np.array([r.targets.get(target, np.nan) for r in records], dtype=float)


@dataclass
class Entry:
    """A source row before its structure is parsed.

    ``targets`` may hold NaN (filtering happens later); ``parse`` builds the ``Atoms`` and
    may raise anything: the pipeline turns failures into ``Dataset.skipped`` lines.
    ``split`` is the source's own split label, if it has one.
    """

    id: str
    targets: dict[str, float]
    parse: Callable[[], Atoms]
    split: str | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None


def as_float(value: Any) -> float:
    """A label as float; NaN for the JARVIS 'na', None, empty or unparsable values."""
    if value is None or isinstance(value, bool):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
