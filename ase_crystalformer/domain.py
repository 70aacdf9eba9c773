"""What a model was trained on, and a warning when a structure lies outside it.

A Crystalformer answers for any structure, but two kinds of answer carry no information:

* an element that its training set never held keeps its random initial embedding, so a
  prediction for a structure containing it is noise;
* a model trained on cells of one size only (``perov5-heat_all``: 5-atom cubic perovskites)
  has never seen another structure type, and its ``heat_all`` is a per-cell quantity.

Training records the elements and the range of cell sizes of the training set in the
checkpoint metadata (``metadata["domain"]``); prediction checks each structure against it
and warns with ``OutOfDomainWarning``, which names the structures and the reasons (the CLI
leaves those cells empty). Cells of other sizes are fine for a model trained on many sizes:
the model is invariant to the choice of cell, so a supercell is not an extrapolation.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from .structures import describe

#: Structures named in one warning's message; the warning's ``problems`` holds them all.
LISTED = 5


class OutOfDomainWarning(UserWarning):
    """Predictions for structures unlike any in the model's training set.

    ``problems`` maps the index of each such structure (in the list predicted) to the reason,
    ``labels`` the same index to a name for it ("structure 3 (NaCl)"); callers that know
    better names (the CLI: file names) use their own.
    """

    def __init__(self, model: str, problems: dict[int, str], labels: dict[int, str], n_structures: int) -> None:
        self.model = model
        self.problems = problems
        self.labels = labels
        shown = " | ".join(f"{labels[i]}: {problems[i]}" for i in list(problems)[:LISTED])
        more = f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        super().__init__(
            f"{model}: {len(problems)} of {n_structures} structure(s) lie outside its training "
            f"domain, so their predictions are extrapolations: {shown}{more}"
        )


def training_domain(numbers: Iterable[np.ndarray], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The elements and cell sizes (atoms per cell) of a training set, given each structure's
    atomic numbers; ``base`` (the domain of a model fine-tuned from) is merged in."""
    elements: set[int] = set()
    sizes: list[int] = []
    for z in numbers:
        elements.update(int(v) for v in np.unique(z))
        sizes.append(len(z))
    if not sizes:
        raise ValueError("training_domain needs at least one structure")
    if base:
        elements.update(chemical_symbols.index(s) for s in base["elements"])
        sizes += list(base["n_atoms"])
    return {"elements": [chemical_symbols[z] for z in sorted(elements)], "n_atoms": [min(sizes), max(sizes)]}


def domain_problems(domain: dict[str, Any] | None, structures: Iterable[tuple[int, np.ndarray]]) -> dict[int, str]:
    """Index → reason for each structure outside ``domain``; ``structures`` gives each one's
    index and atomic numbers. Without a recorded domain nothing is outside."""
    if not domain:
        return {}
    known = {chemical_symbols.index(s) for s in domain["elements"]}
    low, high = domain["n_atoms"]
    problems: dict[int, str] = {}
    for index, numbers in structures:
        reasons = []
        unseen = sorted(set(numbers.tolist()) - known)
        if unseen:
            reasons.append(f"no {', '.join(chemical_symbols[z] for z in unseen)} in its training set")
        if low == high and len(numbers) != low:
            hint = " (primitive=True or --primitive reduces a supercell)" if len(numbers) > low else ""
            reasons.append(f"trained on {low}-atom cells only, this one has {len(numbers)}{hint}")
        if reasons:
            problems[index] = "; ".join(reasons)
    return problems


def warn_outside(
    model: str, domain: dict[str, Any] | None, structures: Iterable[tuple[int, np.ndarray]], n_structures: int
) -> None:
    """Warn with ``OutOfDomainWarning`` if any of ``structures`` (index, atomic numbers) of
    the ``n_structures`` predicted lies outside ``domain``."""
    structures = dict(structures)
    problems = domain_problems(domain, structures.items())
    if problems:
        labels = {i: describe(Atoms(numbers=structures[i]), i) for i in problems}
        warnings.warn(OutOfDomainWarning(model, problems, labels, n_structures), stacklevel=3)
