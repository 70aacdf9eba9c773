"""Relax many structures together: one batched model call per optimizer step.

An ASE optimizer relaxes one structure and asks its calculator for forces one structure at a
time. Here every structure has its own optimizer (FIRE by default, on a ``FrechetCellFilter``
when the cell relaxes too), and the optimizers advance in lockstep: each step evaluates all
structures that have not converged in one ``CrystalformerCalculator.predict`` call, hands each
optimizer its forces through a ``SinglePointCalculator`` and lets it take one step. The
optimizers are ASE's own, so each structure follows the same path as when relaxed alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter
from ase.io import Trajectory
from ase.optimize import BFGS, FIRE, LBFGS

from .structures import as_atoms_list

logger = logging.getLogger(__name__)

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}


@dataclass
class RelaxResult:
    """One relaxed structure: a copy of the input with the final energy/forces/stress
    attached (``atoms.calc`` is a ``SinglePointCalculator``), and how the relaxation went.

    ``fmax`` is what the convergence test saw: the largest force (eV/Å) or, with the cell
    free, the largest of those and the filter's cell "forces" (stress × volume).
    """

    atoms: Atoms
    converged: bool
    steps: int
    energy: float
    fmax: float


def relax(
    structures: Any,
    calculator: BaseCalculator | None = None,
    fmax: float = 0.05,
    steps: int = 500,
    cell: bool = True,
    trajectory: str | Path | None = None,
    *,
    optimizer: str = "FIRE",
    batch_size: int | None = None,
) -> list[RelaxResult]:
    """Relax ``structures`` (ASE/pymatgen, one or many) to forces below ``fmax`` (eV/Å).

    ``calculator``: a ``CrystalformerCalculator`` (evaluated in batches; default: the shipped
    potential) or any ASE calculator (one structure at a time). ``cell=True`` relaxes the cell
    too (``FrechetCellFilter``, zero pressure). ``steps`` caps the optimizer steps per
    structure. ``trajectory``: an ASE ``.traj`` path; for several structures it must contain
    ``{index}``, which becomes each structure's position in the input. The inputs are not
    changed.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZERS)}")
    if fmax <= 0 or steps < 0:
        raise ValueError(f"fmax must be > 0 and steps >= 0, got fmax={fmax}, steps={steps}")
    atoms_list = [a.copy() for a in as_atoms_list(structures)]
    if trajectory is not None and len(atoms_list) > 1 and "{index}" not in str(trajectory):
        raise ValueError(
            f"trajectory={str(trajectory)!r} for {len(atoms_list)} structures: put '{{index}}' in "
            "the path (e.g. 'relax_{index}.traj') so that each structure gets its own file"
        )
    if calculator is None:
        from .calculator import CrystalformerCalculator
        from .potential import DEFAULT_POTENTIAL

        calculator = CrystalformerCalculator(DEFAULT_POTENTIAL)
    properties = ["energy", "forces"] + (["stress"] if cell else [])
    for atoms in atoms_list:
        atoms.calc = None
    targets = [FrechetCellFilter(a) if cell else a for a in atoms_list]
    optimizers = [OPTIMIZERS[optimizer](t, logfile=None) for t in targets]
    for opt in optimizers:
        opt.fmax = fmax  # what Optimizer.run would set; gradient_converged reads it
    writers = [
        Trajectory(str(trajectory).format(index=k), "w") if trajectory is not None else None
        for k in range(len(atoms_list))
    ]
    state: list[dict[str, Any]] = [{"converged": False, "fmax": np.inf} for _ in atoms_list]
    active = list(range(len(atoms_list)))
    try:
        while active:
            _evaluate(calculator, [atoms_list[k] for k in active], properties, batch_size)
            still = []
            for k in active:
                opt = optimizers[k]
                if writers[k] is not None:
                    writers[k].write(atoms_list[k])
                gradient = opt.optimizable.get_gradient()
                state[k]["fmax"] = float(opt.optimizable.gradient_norm(gradient))
                if opt.gradient_converged(gradient):
                    state[k]["converged"] = True
                elif opt.nsteps < steps:
                    opt.step()
                    opt.nsteps += 1
                    still.append(k)
            active = still
    finally:
        for writer in writers:
            if writer is not None:
                writer.close()
    results = []
    for k, atoms in enumerate(atoms_list):
        results.append(RelaxResult(atoms, state[k]["converged"], optimizers[k].nsteps,
                                   float(atoms.get_potential_energy()), state[k]["fmax"]))
    n_conv = sum(r.converged for r in results)
    logger.info("relax: %d of %d structures converged (fmax %g eV/Å)", n_conv, len(results), fmax)
    return results


def _evaluate(calculator: BaseCalculator, atoms_list: Sequence[Atoms], properties: list[str],
              batch_size: int | None) -> None:
    """Attach each structure's energy/forces(/stress) as a ``SinglePointCalculator``."""
    if hasattr(calculator, "predict"):  # CrystalformerCalculator: one batched call
        values = calculator.predict(atoms_list, properties=properties, batch_size=batch_size)
    else:
        values = []
        for atoms in atoms_list:
            probe = atoms.copy()
            probe.calc = calculator
            values.append({p: probe.calc.get_property(p, probe) for p in properties})
    for atoms, result in zip(atoms_list, values, strict=True):
        atoms.calc = SinglePointCalculator(atoms, **result)
