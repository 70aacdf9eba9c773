"""``ModelConfig.readout="atoms"``: the head on every atom, then the mean (a potential's
sum of per-atom energies), against the paper's head on the mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.checkpoint import load_model, save_checkpoint
from ase_crystalformer.geometry import collate, windows_for

ENERGY = TargetSpec("energy", "eV/atom", kind="energy")


def tiny(readout: str, seed: int = 0) -> Crystalformer:
    torch.manual_seed(seed)
    config = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16,
                         activation="silu", cutoff=7.0, readout=readout, targets=(ENERGY,))
    model = Crystalformer(config).double()
    with torch.no_grad():
        model.target_std.fill_(20.0)
        model.blocks[0].attention.sigma_weight.mul_(4.0)  # atom-dependent widths
    return model.eval()


def rattled_nacl(seed: int = 2):
    atoms = bulk("NaCl", "rocksalt", a=5.4) * (1, 1, 2)
    atoms.rattle(0.1, seed=seed)
    return atoms


def test_atoms_readout_is_the_mean_of_the_head_over_each_crystals_atoms() -> None:
    model = tiny("atoms")
    structures = [rattled_nacl(), bulk("Si", "diamond", a=5.43)]
    batch = collate(windows_for(structures, model.config.cutoff), torch.float64)
    with torch.no_grad():
        x = model.atom_features(batch)
        per_atom = model.head(x)[:, 0]
        expected = torch.stack([per_atom[batch.crystal == b].mean() for b in range(2)])
        torch.testing.assert_close(model(batch)[:, 0], expected, rtol=1e-12, atol=0)
        mean_readout = tiny("mean")  # the same weights (same seed), the paper's readout
        assert not torch.allclose(mean_readout(batch), model(batch), rtol=1e-6)  # the head is nonlinear
        outputs, embedding = model.readout(x, batch)
        torch.testing.assert_close(embedding, model.embed(batch), rtol=1e-12, atol=0)


def test_atoms_readout_keeps_the_invariances() -> None:
    model = tiny("atoms")
    atoms = rattled_nacl()
    base = model.predict(atoms)
    shuffled = atoms[np.random.default_rng(0).permutation(len(atoms))]
    supercell = atoms * (2, 1, 1)
    rotated = atoms.copy()
    rotated.rotate(37, "x", rotate_cell=True)
    for other in (shuffled, supercell, rotated):
        np.testing.assert_allclose(model.predict(other), base, rtol=1e-10)


def test_atoms_readout_forces_and_stress_are_energy_derivatives() -> None:
    atoms = rattled_nacl()
    atoms.calc = CrystalformerCalculator(tiny("atoms"), dtype="float64", device="cpu")
    forces, stress = atoms.get_forces(), atoms.get_stress()
    numeric = calculate_numerical_forces(atoms, eps=1e-4)
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(forces, numeric, atol=1e-6 * np.abs(numeric).max())
    numeric_stress = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(stress, numeric_stress, atol=1e-5 * np.abs(numeric_stress).max())


def test_calculator_embedding_and_energy_agree_with_the_model_on_both_paths() -> None:
    model = tiny("atoms")
    atoms = rattled_nacl()
    calc = CrystalformerCalculator(model, dtype="float64", device="cpu")
    with_forces = calc.predict([atoms], properties=["energy", "forces", "embedding"])[0]
    without = calc.predict([atoms], properties=["energy", "embedding"])[0]
    batch = collate(windows_for([atoms], 7.0), torch.float64)
    with torch.no_grad():
        embedding = model.embed(batch)[0].numpy()
    for result in (with_forces, without):
        np.testing.assert_allclose(result["embedding"], embedding, rtol=1e-12)
        np.testing.assert_allclose(result["energy"], len(atoms) * model.predict(atoms)[0], rtol=1e-12)


def test_readout_round_trips_through_a_checkpoint_and_old_configs_mean_the_paper(tmp_path) -> None:
    model = tiny("atoms").float()  # checkpoints hold float32 weights
    save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config.readout == "atoms"
    atoms = rattled_nacl()
    np.testing.assert_array_equal(loaded.predict(atoms), model.predict(atoms))
    old = model.config.to_dict()
    del old["readout"]  # a checkpoint written before the option existed
    assert ModelConfig.from_dict(old).readout == "mean"
    with pytest.raises(ValueError, match="unknown readout 'sum'"):
        ModelConfig(readout="sum")
