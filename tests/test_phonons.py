"""Phonons through phonopy: force-constant sum rules and symmetry, files, other calculators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

pytest.importorskip("phonopy")
from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.phonons import run_phonons


def tiny_energy_model() -> Crystalformer:
    torch.manual_seed(0)
    config = ModelConfig(
        n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16, activation="silu",
        cutoff=7.0, targets=(TargetSpec("energy", "eV/atom", kind="energy"),),
    )
    model = Crystalformer(config)
    with torch.no_grad():
        model.target_std.fill_(20.0)
    return model.eval()


@pytest.fixture(scope="module")
def calc() -> CrystalformerCalculator:
    return CrystalformerCalculator(tiny_energy_model(), dtype="float64", device="cpu")


def test_force_constants_obey_sum_rule_and_symmetry(calc, tmp_path) -> None:
    atoms = bulk("NaCl", "rocksalt", a=5.0)  # 2 atoms
    result = run_phonons(
        atoms, calc, supercell=(2, 2, 2), mesh=(6, 6, 6), npoints=11, symmetrize=False,
        out_dir=tmp_path,
    )
    fc = result.force_constants  # (16, 16, 3, 3), straight from the model's forces
    assert fc.shape == (16, 16, 3, 3)
    scale = np.abs(fc).max()
    assert scale > 1e-3
    # Acoustic sum rule: a rigid translation costs no energy, so every row sums to zero.
    np.testing.assert_allclose(fc.sum(axis=1), 0.0, atol=1e-10 * scale)
    np.testing.assert_allclose(fc.sum(axis=0), 0.0, atol=1e-4 * scale)
    # Φ_ij^ab = Φ_ji^ba: second derivatives of one energy (finite differences: O(h²)).
    np.testing.assert_allclose(fc, fc.transpose(1, 0, 3, 2), atol=1e-4 * scale)
    mesh = result.phonopy.mesh  # Γ-centred, so Γ is one of its q-points
    at_gamma = np.flatnonzero(np.abs(np.asarray(mesh.qpoints)).max(axis=1) < 1e-12)[0]
    gamma = np.asarray(mesh.frequencies)[at_gamma]
    assert np.sort(np.abs(gamma))[:3].max() < 1e-3  # three acoustic modes at Γ
    assert set(result.files) == {"phonopy", "plot", "thermal"}
    assert all(p.stat().st_size > 0 for p in result.files.values())
    assert result.files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.thermal["temperatures"][0] == 0.0 and len(result.band["labels"]) > 2


def test_other_ase_calculators_give_physical_phonons() -> None:
    from ase.calculators.emt import EMT

    result = run_phonons(bulk("Cu", "fcc", a=3.6), EMT(), supercell=(2, 2, 2), mesh=(6, 6, 6), npoints=11)
    top = max(np.max(f) for f in result.band["frequencies"])
    assert 6.0 < top < 9.5  # EMT copper: about 8 THz at X
    assert not result.has_imaginary_modes


def test_input_errors(calc) -> None:
    atoms = bulk("Cu", "fcc", a=3.6)
    with pytest.raises(ValueError, match="displacement"):
        run_phonons(atoms, calc, displacement=0.0)
    with pytest.raises(ValueError, match="supercell"):
        run_phonons(atoms, calc, supercell=(2, 2))
    atoms.pbc = (True, True, False)
    with pytest.raises(ValueError, match="fully periodic"):
        run_phonons(atoms, calc)


def test_cli_phonons(tmp_path) -> None:
    from ase.io import write
    from click.testing import CliRunner

    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.cli import main

    save_checkpoint(tiny_energy_model(), tmp_path / "tiny" / "model.safetensors")
    write(tmp_path / "nacl.cif", bulk("NaCl", "rocksalt", a=5.0))
    result = CliRunner().invoke(main, [
        "phonons", str(tmp_path / "nacl.cif"), "--model", str(tmp_path / "tiny"), "--device", "cpu",
        "--mesh", "4", "4", "4", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    assert "lowest frequency" in result.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"phonopy_params.yaml", "band_dos.png", "thermal.csv"}


def test_cli_phonons_default_uses_the_shipped_potential(tmp_path, monkeypatch) -> None:
    from ase.io import write
    from click.testing import CliRunner

    from ase_crystalformer import potential
    from ase_crystalformer.checkpoint import MODELS_ENV, save_checkpoint
    from ase_crystalformer.cli import main

    save_checkpoint(tiny_energy_model(), tmp_path / "my-pes" / "model.safetensors", {"kind": "potential"})
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    monkeypatch.setattr(potential, "DEFAULT_POTENTIAL", "my-pes")
    write(tmp_path / "nacl.cif", bulk("NaCl", "rocksalt", a=5.0))
    args = ["phonons", str(tmp_path / "nacl.cif"), "--device", "cpu", "--supercell", "1", "1", "1",
            "--mesh", "2", "2", "2", "--out", str(tmp_path / "ph")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "lowest frequency" in result.output
    monkeypatch.setattr(potential, "DEFAULT_POTENTIAL", "no-such-potential")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "no model named or at 'no-such-potential'" in result.output
