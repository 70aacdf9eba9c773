"""ASE optimizers drive the calculator (BFGS/FIRE on positions, FrechetCellFilter on the cell), and
``relax`` relaxes many structures in lockstep batches with the same result as one by one."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.io import read
from ase.optimize import BFGS, FIRE

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.relax import relax


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


def _structures():
    si = bulk("Si", "diamond", 5.43)
    si.set_cell(si.cell * 1.03, scale_atoms=True)
    nacl = bulk("NaCl", "rocksalt", 5.6)
    nacl.rattle(0.05, seed=2)
    al = bulk("Al", "fcc", 4.05, cubic=True)
    al.rattle(0.05, seed=3)
    return [si, nacl, al]


def test_batched_relaxation_equals_relaxing_each_alone(energy_model):
    calc = CrystalformerCalculator(energy_model, dtype="float64")
    together = relax(_structures(), calc, fmax=1e-3, steps=60)
    for structure, batched in zip(_structures(), together):
        alone = relax(structure, calc, fmax=1e-3, steps=60)[0]
        assert (alone.steps, alone.converged) == (batched.steps, batched.converged)
        np.testing.assert_allclose(batched.atoms.positions, alone.atoms.positions, atol=1e-8)
        np.testing.assert_allclose(batched.atoms.cell, alone.atoms.cell, atol=1e-8)
        assert batched.energy == pytest.approx(alone.energy, abs=1e-9)


def test_relax_follows_ase_fire_on_a_frechet_filter(energy_model):
    calc = CrystalformerCalculator(energy_model, dtype="float64")
    atoms = _structures()[0]
    result = relax(atoms, calc, fmax=1e-3, steps=60)[0]
    reference = atoms.copy()
    reference.calc = calc
    opt = FIRE(FrechetCellFilter(reference), logfile=None)
    converged = opt.run(fmax=1e-3, steps=60)
    assert (result.converged, result.steps) == (converged, opt.nsteps)
    np.testing.assert_allclose(result.atoms.cell, reference.cell, atol=1e-8)
    assert np.allclose(atoms.cell, _structures()[0].cell)  # the input is not changed


def test_converged_flags_steps_and_trajectories(energy_model, tmp_path):
    calc = CrystalformerCalculator(energy_model, dtype="float64")
    results = relax(_structures(), calc, fmax=1e-3, steps=2, trajectory=tmp_path / "relax_{index}.traj")
    assert [r.converged for r in results] == [False, False, False]
    assert [r.steps for r in results] == [2, 2, 2]
    assert all(r.fmax > 1e-3 for r in results)
    frames = read(tmp_path / "relax_1.traj", ":")
    assert len(frames) == 3  # the start and one frame per step
    np.testing.assert_allclose(frames[-1].positions, results[1].atoms.positions)
    assert frames[-1].get_potential_energy() == pytest.approx(results[1].energy)
    done = relax(results[0].atoms, calc, fmax=10.0, steps=5)[0]
    assert done.converged and done.steps == 0
    assert done.fmax == pytest.approx(results[0].fmax)


def test_fixed_cell_relaxation_keeps_the_cell(energy_model):
    calc = CrystalformerCalculator(energy_model, dtype="float64")
    atoms = bulk("NaCl", "rocksalt", 5.6).repeat((2, 1, 1))
    atoms.rattle(0.3, seed=1)
    result = relax(atoms, calc, fmax=1e-3, steps=30, cell=False)[0]
    np.testing.assert_allclose(result.atoms.cell, atoms.cell)
    assert result.energy < calc.get_potential_energy(atoms)


def test_many_structures_need_an_index_in_the_trajectory_name(energy_model, tmp_path):
    calc = CrystalformerCalculator(energy_model, dtype="float64")
    with pytest.raises(ValueError, match=r"put '\{index\}' in the path"):
        relax(_structures(), calc, trajectory=tmp_path / "relax.traj")


def test_relax_is_exported_by_the_package():
    import ase_crystalformer

    assert ase_crystalformer.relax is relax


def test_cli_relax_writes_structures_and_summary(energy_model, tmp_path):
    import pandas as pd
    from ase.io import write
    from click.testing import CliRunner

    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.cli import main

    save_checkpoint(energy_model.float(), tmp_path / "pes" / "model.safetensors", {"kind": "potential"})
    energy_model.double()
    structures = _structures()
    write(tmp_path / "in.extxyz", structures[:2], format="extxyz")
    write(tmp_path / "al.cif", structures[2])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["relax", str(tmp_path / "in.extxyz"), str(tmp_path / "al.cif"), "--out", str(out),
                                       "--model", str(tmp_path / "pes"), "--steps", "3", "--fmax", "1e-4", "--trajectory", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "summary.csv")
    assert list(table["structure"]) == [f"{tmp_path / 'in.extxyz'}@0", f"{tmp_path / 'in.extxyz'}@1", str(tmp_path / "al.cif")]
    assert list(table["steps"]) == [3, 3, 3] and not table["converged"].any()
    relaxed = read(out / "relaxed.extxyz", ":")
    assert len(relaxed) == 3 and relaxed[0].info["relax_steps"] == 3
    assert table["energy_eV"][1] == pytest.approx(relaxed[1].get_potential_energy(), rel=1e-6)
    assert len(read(out / "traj" / "2.traj", ":")) == 4
    assert "0 of 3 converged (fmax 0.0001 eV/Å)" in result.output
