"""Relax a crystal with a Crystalformer energy model, then predict its properties.

What the forces are: ``CrystalformerCalculator`` differentiates the model's predicted energy
(forces = -dE/dpositions, stress = (1/V) dE/dstrain). For a model trained only on relaxed
structures (formation energies of the Materials Project, say) these are gradients of a
regression model, not a force field: they point towards structures the model scores lower,
which need not be the DFT minimum, and the "relaxed" result is only as good as the model is
away from equilibrium. Only a model trained on energies and forces of non-equilibrium
structures (an energy-type target with force/stress loss) makes this a physical relaxation.

The shipped ``mp-e_form`` is such an energy-type model: its energy is the formation energy of
the cell (e_form × number of atoms, relative to the elemental references), whose forces and
stress equal those of the total energy. Its FFN uses ReLU, so the energy surface has kinks;
BFGS copes, but the forces are only piecewise smooth.

Usage:
    python examples/relax_and_predict.py --model mp-e_form --model mp-band_gap   # rattled NaCl
    python examples/relax_and_predict.py STRUCTURE.cif --model mp-e_form [--model OTHER ...]

Every ``--model`` is a shipped model name or a checkpoint path; one of them needs an energy
target (``TargetSpec(kind="energy")``). The others add their predictions at the end.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.optimize import BFGS

from ase_crystalformer.calculator import CrystalformerCalculator

logger = logging.getLogger("relax_and_predict")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structure", nargs="?", help="CIF, POSCAR, extxyz ... (default: rattled NaCl)")
    parser.add_argument("--model", action="append", help="model name or checkpoint path (repeatable)")
    parser.add_argument("--fmax", type=float, default=0.02, help="force criterion, eV/Å")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="relaxed.extxyz")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.structure:
        atoms = read(args.structure)
    else:
        atoms = bulk("NaCl", "rocksalt", a=5.7)
        atoms.rattle(0.05, seed=0)
    calc = CrystalformerCalculator(args.model, device=args.device, dtype="float64")
    atoms.calc = calc
    if "energy" not in calc.implemented_properties:
        parser.error(
            "relaxation needs an energy-type model; loaded: "
            + ", ".join(label for label, _ in calc.models)
        )

    volume0, energy0 = atoms.get_volume(), atoms.get_potential_energy()
    # FrechetCellFilter relaxes positions and cell together, with the cell degrees of freedom
    # in log-strain so that large volume changes converge well.
    optimizer = BFGS(FrechetCellFilter(atoms), logfile=None)
    converged = optimizer.run(fmax=args.fmax, steps=args.steps)
    logger.info(
        "%s: %s after %d steps; E %.4f -> %.4f eV, V %.2f -> %.2f Å^3, max |F| %.3g eV/Å",
        atoms.get_chemical_formula(), "converged" if converged else "NOT converged",
        optimizer.nsteps, energy0, atoms.get_potential_energy(), volume0, atoms.get_volume(),
        np.abs(atoms.get_forces()).max(),
    )

    # The calculator computed every target of every model with the last energy, at the
    # relaxed geometry, and mirrored them into atoms.info (crystalformer_<name>).
    for target in calc.targets:
        value = calc.get_property(target.name, atoms)
        logger.info("  %-28s %12.4f %s", target.name, value, target.unit)
    write(args.out, atoms)
    logger.info("wrote %s (predictions in atoms.info as crystalformer_*)", args.out)


if __name__ == "__main__":
    main()
