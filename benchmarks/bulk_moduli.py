"""Bulk moduli of potentials: diamond Si and rock-salt NaCl against DFT, side by side.

    python benchmarks/bulk_moduli.py --model runs/potential-aligned/best.safetensors \
        --model runs/potential-modulus/best.safetensors

Per model and crystal, float64: B at the DFT cell by ``elastic.bulk_modulus`` (central
differences, pressure term included) and B from ASE's equation-of-state fit (Birch-Murnaghan
over 7 volumes within ±3 % of the DFT cell, windows rebuilt per volume) with its V₀/V_DFT.
DFT for scale: mp-elastic's K_VRH of mp-149 (Si, 83 GPa) and mp-22862 (NaCl, 24 GPa). NaCl is one of the
modulus term's training structures (a fitted value there), Si is not (held out by the split).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from ase.build import bulk
from ase.eos import EquationOfState
from ase.units import GPa

from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.elastic import bulk_modulus
from ase_crystalformer.geometry import build_window, collate

CRYSTALS = {"Si": (bulk("Si", "diamond", 5.469), 83), "NaCl": (bulk("NaCl", "rocksalt", 5.69), 24)}


def eos_fit(atoms, calc) -> tuple[float, float]:
    """(B in GPa, V₀/V) of a Birch-Murnaghan fit over ±3 % volume."""
    volumes, energies = [], []
    for scale in np.linspace(0.97, 1.03, 7):
        strained = atoms.copy()
        strained.set_cell(atoms.cell * scale ** (1 / 3), scale_atoms=True)
        strained.calc = calc
        volumes.append(strained.get_volume())
        energies.append(strained.get_potential_energy())
    v0, _, b = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    return b / GPa, v0 / atoms.get_volume()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="Potential name or checkpoint (repeatable).")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="ase_crystalformer")
    print("| model | crystal | B at DFT cell (GPa) | B, EOS fit (GPa) | V0 / V_DFT | DFT B (GPa) |")
    print("|---|---|---|---|---|---|")
    for name in args.model:
        calc = CrystalformerCalculator(name, dtype="float64")
        model = calc.models[0][1]
        for crystal, (atoms, dft) in CRYSTALS.items():
            at_cell = bulk_modulus(model, collate([build_window(atoms, model.config.cutoff)], torch.float64))
            b, ratio = eos_fit(atoms, calc)
            print(f"| {name} | {crystal} | {at_cell.item() / GPa:.1f} | {b:.1f} | {ratio:.3f} | {dft} |")


if __name__ == "__main__":
    main()
