"""Phonon band structure, DOS and thermal properties from a Crystalformer energy model.

``run_phonons`` displaces atoms in a supercell (phonopy), evaluates all displaced supercells
in batches with ``CrystalformerCalculator.predict``, builds force constants and writes
``band_dos.png``, ``thermal.csv`` and ``phonopy_params.yaml``.

The model must have an energy-type target. Its forces are gradients of the predicted energy:
phonons are only as good as the model's curvature around the structure, which a model trained
on relaxed structures alone does not constrain; expect qualitative results at best unless
the model saw displaced structures (energies and forces) in training. Relax the structure
with the same model first (``examples/relax_and_predict.py``), or the harmonic expansion is
taken around a point that is not a minimum and imaginary modes appear.

Usage:
    python examples/phonons.py --model ENERGY_MODEL [STRUCTURE] [--supercell 3 3 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from ase.build import bulk
from ase.io import read

from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.phonons import run_phonons

logger = logging.getLogger("phonons")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structure", nargs="?", help="structure file (default: diamond Si)")
    parser.add_argument("--model", action="append", help="model name or checkpoint path")
    parser.add_argument("--supercell", type=int, nargs=3, default=(2, 2, 2))
    parser.add_argument("--displacement", type=float, default=0.01, help="Å")
    parser.add_argument("--mesh", type=int, nargs=3, default=(20, 20, 20))
    parser.add_argument("--out", default="phonons_out")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    atoms = read(args.structure) if args.structure else bulk("Si", "diamond", a=5.43)
    # float64: force constants are differences of forces 0.01 Å apart.
    calc = CrystalformerCalculator(args.model, device=args.device, dtype="float64")
    result = run_phonons(
        atoms, calc, supercell=args.supercell, displacement=args.displacement,
        mesh=args.mesh, out_dir=args.out,
    )
    top = max(float(np.max(f)) for f in result.band["frequencies"])
    logger.info(
        "%s: frequencies %.3f .. %.3f THz%s", atoms.get_chemical_formula(),
        result.min_frequency, top, " (imaginary modes)" if result.has_imaginary_modes else "",
    )
    t = result.thermal
    for temperature in (100.0, 300.0, 1000.0):
        i = int(np.abs(t["temperatures"] - temperature).argmin())
        logger.info(
            "  T = %4.0f K: F = %8.3f kJ/mol  S = %7.2f J/K/mol  Cv = %6.2f J/K/mol",
            t["temperatures"][i], t["free_energy"][i], t["entropy"][i], t["heat_capacity"][i],
        )
    logger.info("wrote %s", ", ".join(str(p) for p in result.files.values()))


if __name__ == "__main__":
    main()
