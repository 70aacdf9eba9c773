"""ASE optimizers drive the calculator: BFGS/FIRE on positions and FrechetCellFilter on the cell."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.calculator import CrystalformerCalculator


@pytest.fixture(scope="module")
def energy_model() -> Crystalformer:
    torch.manual_seed(3)
    config = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16, cutoff=7.0,
                         activation="silu", targets=(TargetSpec("energy", "eV/atom", kind="energy"),))
    model = Crystalformer(config).double().eval()
    model.target_std.fill_(20.0)  # a steeper landscape than a random init gives
    return model


@pytest.mark.parametrize("optimizer", [BFGS, FIRE])
def test_positions_relax_downhill(energy_model, optimizer):
    atoms = bulk("NaCl", "rocksalt", 5.6).repeat((2, 1, 1))
    atoms.rattle(0.3, seed=1)
    atoms.calc = CrystalformerCalculator(energy_model, dtype="float64")
    e0, f0 = atoms.get_potential_energy(), np.abs(atoms.get_forces()).max()
    optimizer(atoms, logfile=None).run(fmax=f0 / 20, steps=100)
    assert atoms.get_potential_energy() < e0
    assert np.abs(atoms.get_forces()).max() < f0 / 20


def test_cell_relaxes_with_frechet_filter(energy_model):
    atoms = bulk("Si", "diamond", 5.43)
    atoms.set_cell(atoms.cell * 1.04, scale_atoms=True)
    atoms.calc = CrystalformerCalculator(energy_model, dtype="float64")
    e0, s0 = atoms.get_potential_energy(), np.abs(atoms.get_stress()).max()
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-4, steps=80)
    assert atoms.get_potential_energy() < e0
    assert np.abs(atoms.get_stress()).max() < s0 / 10
