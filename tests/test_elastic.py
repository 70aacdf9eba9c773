"""Bulk moduli by isotropic strain (``elastic``) and the potential's modulus loss."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk, make_supercell

from ase_crystalformer.checkpoint import load_model, read_checkpoint
from ase_crystalformer.config import TrainConfig
from ase_crystalformer.elastic import STRAIN, bulk_modulus
from ase_crystalformer.errors import CheckpointError
from ase_crystalformer.geometry import build_window, collate
from ase_crystalformer.model import Crystalformer
from ase_crystalformer.potential import read_frames, train_potential

from test_potential import TINY, _frames_file

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _model() -> Crystalformer:
    torch.manual_seed(0)
    model = Crystalformer(TINY).double().eval()
    model.target_std.fill_(0.5)  # a random model's energy surface with curvature of order eV
    return model


def _rattled_nacl():
    atoms = bulk("NaCl", "rocksalt", a=5.6, cubic=True)
    atoms.rattle(0.05, seed=3)
    return atoms


def test_bulk_modulus_is_the_autograd_curvature_with_the_pressure_term():
    """B = V d²E/dV² = (E_ss − 2 E_s) / (9V) for E(s) the energy at cell × (1 + s): the
    central differences of ``bulk_modulus`` against autograd's exact derivatives (float64)."""
    model, atoms = _model(), _rattled_nacl()
    batch = collate([build_window(atoms, TINY.cutoff)], torch.float64)
    s = torch.zeros((), dtype=torch.float64, requires_grad=True)
    energy = model(replace(batch, positions=batch.positions * (1 + s), cells=batch.cells * (1 + s)))[0, 0]
    energy = model.targets(energy[None, None])[0, 0] * len(atoms)
    (first,) = torch.autograd.grad(energy, s, create_graph=True)
    (second,) = torch.autograd.grad(first, s)
    volume = atoms.get_volume()
    exact = (second - 2 * first).item() / (9 * volume)
    assert abs(2 * first.item() / (9 * volume)) > 1e-2 * abs(exact)  # the pressure term matters here
    assert bulk_modulus(model, batch).item() == pytest.approx(exact, rel=1e-3)
    assert bulk_modulus(model, batch, strain=STRAIN / 10).item() == pytest.approx(exact, rel=1e-5)


def test_bulk_modulus_is_intensive_and_rotation_invariant():
    model, atoms = _model(), _rattled_nacl()
    supercell = make_supercell(atoms, np.diag([2, 1, 1]))
    rotated = atoms.copy()
    rotated.rotate(37, (1, 2, 3), rotate_cell=True)
    b = bulk_modulus(model, collate([build_window(a, TINY.cutoff) for a in (atoms, supercell, rotated)], torch.float64))
    assert b[1].item() == pytest.approx(b[0].item(), rel=1e-9)
    assert b[2].item() == pytest.approx(b[0].item(), rel=1e-9)


def _frames(tmp_path):
    return read_frames(_frames_file(tmp_path / "mptrj.xyz", n_traj=12, per_traj=2))


def test_modulus_loss_trains_validates_and_is_kept_on_resume(tmp_path):
    frames = _frames(tmp_path)
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, swa_epochs=0, force_weight=1.0, stress_weight=1.0)
    out = tmp_path / "run"
    train_potential(FIXTURES, out, config=config, model_config=TINY, steps_per_epoch=2, frames=(frames, {}),
                    modulus_weight=1.0, modulus_batch=2)
    (row,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert row["val_rel_bulk_modulus"] > 0 and row["val_mae_bulk_modulus_gpa"] > 0
    without = row["val_loss"] - row["val_rel_bulk_modulus"]
    assert without == pytest.approx(row["val_mae_energy"] / float(load_model(out / "best.safetensors").target_std[0])
                                    + row["val_mae_forces"] + row["val_mae_stress"], rel=1e-6)
    metadata = load_model(out / "latest.safetensors").metadata
    assert metadata["moduli"] == {"train": 5, "val": 1}
    assert metadata["sampling"]["modulus_weight"] == 1.0
    config = TrainConfig(**{**config.to_dict(), "epochs": 2, "betas": tuple(config.betas)})
    with pytest.raises(ValueError, match="'modulus_weight': 1.0"):
        train_potential(FIXTURES, out, config=config, model_config=TINY, steps_per_epoch=2, frames=(frames, {}),
                        resume=True)


def test_init_from_copies_weights_and_references_and_refuses_other_architectures(tmp_path):
    frames = _frames(tmp_path)
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, swa_epochs=0, force_weight=1.0, stress_weight=1.0)
    train_potential(FIXTURES, tmp_path / "a", config=config, model_config=TINY, steps_per_epoch=1, frames=(frames, {}))
    base = tmp_path / "a" / "latest.safetensors"
    seen = []
    train_potential(FIXTURES, tmp_path / "b", config=config, model_config=TINY, steps_per_epoch=1, frames=(frames, {}),
                    init_from=base, on_epoch=seen.append)
    started = read_checkpoint(tmp_path / "b" / "latest.safetensors")[0]
    assert started.metadata["init_from"]["path"] == str(base)
    # One step of the same data from the copied weights: close to, not equal to, the base.
    a, b = read_checkpoint(base)[0].state_dict(), started.state_dict()
    delta = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert 0 < delta < 10 * config.lr
    with pytest.raises(CheckpointError, match="architecture differs"):
        train_potential(FIXTURES, tmp_path / "c", config=config, model_config=replace(TINY, d_model=8, d_head_mlp=8),
                        steps_per_epoch=1, frames=(frames, {}), init_from=base)
    # Data whose refit differs (as after a new mp-e_form) train on the base's references, so
    # the copied network's residual energies keep their meaning (other elements are refused:
    # tests/test_potential.py).
    shifted = [replace(f, energy=f.energy + 0.1 * len(f.atoms)) for f in frames]
    train_potential(FIXTURES, tmp_path / "d", config=config, model_config=TINY, steps_per_epoch=1,
                    frames=(shifted, {}), init_from=base)
    assert (tmp_path / "d" / "references.json").read_text() == (tmp_path / "a" / "references.json").read_text()
