"""Reciprocal-space heads: the Fourier lattice sum against a real-space brute force, the
domains' layers against the float64 reference, invariances, derivatives, slabs, end to end."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms
from conftest import spread_sigma
from reference import lattice_gaussian_sum, reference_forward
from structures_for_tests import random_cell, random_crystal

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.checkpoint import read_checkpoint, save_checkpoint
from ase_crystalformer.config import DOMAINS
from ase_crystalformer.errors import CheckpointError
from ase_crystalformer.errors import StructureError
from ase_crystalformer.forces import energy_forces_stress
from ase_crystalformer.geometry import collate, windows_for
from ase_crystalformer.reciprocal import (
    KAPPA,
    MixedSpaceAttention,
    log_lattice_sum,
    reciprocal_geometry,
    reciprocal_window,
)

MIXED = [d for d in DOMAINS if d != "real"]
SIGMA_MIN = ModelConfig().reciprocal_sigma_min  # 2.2·√0.5 = 1.5556 Å
SIGMAS = [SIGMA_MIN, 1.56, 2.0, 3.0, 4.5, 6.0]
TINY = ModelConfig(n_blocks=2, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16, cutoff=7.0)


def _batch(structures, dtype=torch.float64):
    return collate(windows_for(structures, 7.0), dtype)


def _skewed_cells():
    rng = np.random.default_rng(5)
    plain = random_cell(rng)
    sheared = np.array([[1, 0, 0], [5, 1, 0], [-3, 4, 1]]) @ plain  # same lattice, skewed basis
    flat = np.array([[5.0, 0, 0], [4.7, 1.1, 0], [2.0, 0.4, 2.3]])  # a genuinely flat, acute cell
    left = plain[[1, 0, 2]]  # det < 0
    return {"random": plain, "sheared": sheared, "flat": flat, "left-handed": left}


@pytest.mark.parametrize("name", list(_skewed_cells()))
def test_fourier_sum_equals_real_space_sum(name):
    cell = _skewed_cells()[name]
    # The sheared basis spans the random cell's lattice: the same real-space sum, and a
    # compact box for the brute force.
    brute_cell = _skewed_cells()["random"] if name == "sheared" else cell
    rng = np.random.default_rng(1)
    atoms = Atoms("H3", scaled_positions=rng.uniform(0, 1, (3, 3)), cell=cell, pbc=True)
    atoms.positions += rng.normal(0, 3.0, (3, 3))  # unwrapped positions
    config = ModelConfig()
    geom = reciprocal_geometry(_batch([atoms]), config)
    n = len(atoms)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64).expand(n, -1)  # (n, H)
    alpha = log_lattice_sum(sigma[None] ** 2, geom.blocks[0], geom.floor)[0]  # (n, H, n)
    assert torch.isfinite(alpha).all()
    p = torch.tensor(atoms.positions)
    r = p[None, :, :] - p[:, None, :]  # (i, j, 3) = p_j − p_i
    for h, s in enumerate(SIGMAS):
        brute = lattice_gaussian_sum(r, brute_cell, torch.tensor(s, dtype=torch.float64), radius=9 * s)
        np.testing.assert_allclose(alpha[:, h, :].exp().numpy(), brute.numpy(), rtol=1e-9, atol=0)


def test_far_pairs_are_clamped_not_nan():
    """A 16 Å cell at σ_min: the corner-to-centre sum is ~1e-13 of the self sum, below what
    float64 cosines resolve; it is clamped at floor·self, within floor·self of the truth."""
    cell = np.eye(3) * 16.0
    atoms = Atoms("H2", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=cell, pbc=True)
    geom = reciprocal_geometry(_batch([atoms]), ModelConfig())
    sigma = torch.tensor([[SIGMA_MIN, 3.0]] * 2, dtype=torch.float64)
    kernel = log_lattice_sum(sigma[None] ** 2, geom.blocks[0], geom.floor)[0].exp()  # (2, 2, 2)
    p = torch.tensor(atoms.positions)
    r = p[None, :, :] - p[:, None, :]
    for h in range(2):
        brute = lattice_gaussian_sum(r, cell, sigma[0, h], radius=9 * float(sigma[0, h]))
        self_sum = brute[0, 0]
        assert (kernel[:, h, :] >= geom.floor * self_sum * (1 - 1e-9)).all()
        np.testing.assert_allclose(kernel[:, h, :].numpy(), brute.numpy(), rtol=1e-9, atol=float(geom.floor * self_sum))
    assert float(lattice_gaussian_sum(r[0, 1], cell, sigma[0, 0], 15.0)) < 1e-12  # the case is real


@pytest.mark.parametrize("name", ["random", "sheared", "flat"])
def test_window_is_the_half_sphere(name):
    cell = _skewed_cells()[name]
    k_max = KAPPA / SIGMA_MIN
    m = reciprocal_window(cell, k_max)
    grid = np.stack(np.meshgrid(*[np.arange(-60, 61)] * 3, indexing="ij"), -1).reshape(-1, 3)
    k = grid @ (2 * np.pi * np.linalg.inv(cell).T)
    inside = grid[((k * k).sum(1) <= k_max**2) & (np.abs(grid).sum(1) > 0)]
    assert 2 * len(m) == len(inside)
    both = {tuple(x) for x in m} | {tuple(-x) for x in m}
    assert both == {tuple(x) for x in inside}


def test_window_depends_on_the_lattice_not_the_basis():
    cells = _skewed_cells()
    k_max = KAPPA / SIGMA_MIN
    kvec = [np.sort(np.linalg.norm(reciprocal_window(c, k_max) @ (2 * np.pi * np.linalg.inv(c).T), axis=1))
            for c in (cells["random"], cells["sheared"], cells["left-handed"])]
    np.testing.assert_allclose(kvec[0], kvec[1], rtol=1e-9)
    np.testing.assert_allclose(kvec[0], kvec[2], rtol=1e-9)


# ----------------------------------------------------------------------------- config
def test_a_routed_checkpoint_of_the_output_mixture_form_is_refused_by_name(tmp_path, monkeypatch):
    """Routed weights of the earlier form (gates named route_*, mixing head outputs) would
    load into the α mixture and compute something else: refused, with what to do."""
    model = Crystalformer(replace(TINY, domain="routed"))
    old = {k.replace(".gate_", ".route_"): v for k, v in model.state_dict().items()}
    monkeypatch.setattr(Crystalformer, "state_dict", lambda self: old)
    save_checkpoint(model, tmp_path / "old.safetensors")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="earlier form.*retrain it with --domain routed"):
        read_checkpoint(tmp_path / "old.safetensors")
    save_checkpoint(model, tmp_path / "new.safetensors")
    assert read_checkpoint(tmp_path / "new.safetensors")[0].config.domain == "routed"


def test_config_domain_round_trip_and_default():
    for domain in DOMAINS:
        config = ModelConfig(n_blocks=2, domain=domain)
        assert ModelConfig.from_dict(config.to_dict()) == config
    old = ModelConfig().to_dict()
    del old["domain"], old["reciprocal_scale"]  # a checkpoint written before domains existed
    assert ModelConfig.from_dict(old).domain == "real"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"domain": "fourier"}, "unknown domain 'fourier'"),
        ({"domain": "dual", "n_heads": 3, "d_model": 48}, "n_heads=3 is odd"),
        ({"domain": "alternating", "n_blocks": 1}, "needs n_blocks >= 2"),
        ({"reciprocal_scale": 0.0}, "reciprocal_scale must be positive"),
    ],
)
def test_config_refuses_bad_domains(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_layer_layout_per_domain():
    kinds = {d: [getattr(b.attention, "kind", "plain") for b in Crystalformer(replace(TINY, domain=d)).blocks]
             for d in DOMAINS}
    assert kinds == {"real": ["plain", "plain"], "reciprocal": ["reciprocal"] * 2,
                     "alternating": ["real", "reciprocal"], "dual": ["dual"] * 2, "routed": ["routed"] * 2}
    dual = Crystalformer(replace(TINY, domain="dual")).blocks[0].attention
    assert dual.rbf_proj.shape == (2, 8, 16)  # W_E for the real half only
    assert Crystalformer(replace(TINY, domain="reciprocal")).blocks[0].attention.rbf_proj is None


# ----------------------------------------------------------------------------- models
def _model(domain: str, seed: int = 1, config: ModelConfig = TINY) -> Crystalformer:
    torch.manual_seed(seed)
    model = Crystalformer(replace(config, domain=domain)).double()
    spread_sigma(model)
    with torch.no_grad():
        for block in model.blocks:
            if getattr(block.attention, "kind", None) == "routed":  # gates that vary per atom
                block.attention.gate_weight.normal_(0, 1.0)
                block.attention.gate_bias.normal_(0, 1.0)
    return model.eval()


def _crystals(n=3, seed=7):
    rng = np.random.default_rng(seed)
    return [random_crystal(rng, int(rng.integers(1, 4))) for _ in range(n)]


@pytest.mark.parametrize("domain", MIXED)
def test_model_matches_the_real_space_reference(domain):
    """Whole model against tests/reference.py, where reciprocal heads are brute-force
    real-space sums over every image within 60 Å (σ up to ~6.5 Å here). The real heads get
    a 14 Å window, beyond which an image weighs < e^{-14²/(2·1.98²)} = 1.4e-11."""
    model = _model(domain, config=replace(TINY, cutoff=14.0))
    for atoms in _crystals(2, seed=3):
        fast = model(collate(windows_for([atoms], 14.0), torch.float64))[0]
        slow = reference_forward(model, atoms, radius=22.0, wide_radius=60.0)
        torch.testing.assert_close(fast, slow, rtol=1e-8, atol=1e-10)


def test_routed_pairs_without_an_image_in_the_window_match_the_reference():
    """A cell longer than the 7 Å window: the pairs (i, j) between the two layers have no
    image in it, so only the wide (reciprocal) component of their weight reaches them; the
    fast path agrees with the brute-force one, and the gates matter."""
    atoms = Atoms("LiF", positions=[(0.3, 0.2, 0.1), (1.1, 0.9, 10.0)], cell=[3.1, 3.3, 20.0], pbc=True)
    windows = windows_for([atoms], TINY.cutoff)
    assert len(windows[0].pair_i) < 4  # not every pair is in the window
    model = _model("routed")
    fast = model(collate(windows, torch.float64))[0]
    slow = reference_forward(model, atoms, radius=22.0, wide_radius=60.0)
    torch.testing.assert_close(fast, slow, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        model.blocks[0].attention.gate_bias.add_(0.5)
    assert not torch.allclose(model(collate(windows, torch.float64))[0], fast, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- derivatives
ENERGY = TargetSpec("energy", "eV/atom", kind="energy")


def _energy_model(domain: str) -> Crystalformer:
    model = _model(domain, config=replace(TINY, activation="silu", targets=(ENERGY,)))
    with torch.no_grad():
        model.target_std.fill_(20.0)  # forces well above rounding noise
    return model


def _energy(model, atoms) -> float:
    return float(energy_forces_stress(model, _batch([atoms]), forces=False, stress=False)["energy"][0].detach())


@pytest.mark.parametrize("domain", DOMAINS)
def test_forces_and_stress_match_finite_differences(domain):
    model = _energy_model(domain)
    atoms = _crystals(1, seed=5)[0].repeat((1, 1, 2))
    atoms.rattle(0.05, seed=1)
    got = energy_forces_stress(model, _batch([atoms]))
    # central differences: truncation ~h², rounding ~50 ulp of the reciprocal sums / h, so
    # h = 1e-4 (at 1e-5 the rounding term alone is ~1e-5 relative on the smallest forces)
    h = 1e-4
    numeric = np.zeros((len(atoms), 3))
    for a in range(len(atoms)):
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, c] += h
            minus.positions[a, c] -= h
            numeric[a, c] = -(_energy(model, plus) - _energy(model, minus)) / (2 * h)
    np.testing.assert_allclose(got["forces"].detach().numpy(), numeric, rtol=1e-6, atol=1e-7 * np.abs(numeric).max())
    assert np.abs(numeric).max() > 1e-3  # forces that can fail the test
    stress = np.zeros((3, 3))
    for c, d in [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]:
        e = np.zeros((3, 3))
        e[c, d] = e[d, c] = h / 2 if c != d else h
        values = []
        for sign in (1, -1):
            strained = atoms.copy()
            strained.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + sign * e).T, scale_atoms=True)
            values.append(_energy(model, strained))
        stress[c, d] = stress[d, c] = (values[0] - values[1]) / (2 * h) / atoms.get_volume()
    np.testing.assert_allclose(got["stress"][0].detach().numpy(), stress, rtol=1e-6, atol=1e-7 * np.abs(stress).max())


def test_force_training_gradients_are_finite_for_reciprocal_heads():
    model = _energy_model("dual").train()
    out = energy_forces_stress(model, _batch(_crystals(2)), create_graph=True)
    loss = out["forces"].abs().sum() + out["stress"].abs().sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert float(model.blocks[0].attention.sigma_weight.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- slabs
def _slab() -> Atoms:
    atoms = Atoms("MgO", scaled_positions=[[0, 0, 0.5], [0.5, 0.5, 0.55]], cell=[3.0, 3.0, 12.0])
    atoms.pbc = (True, True, False)
    return atoms


@pytest.mark.parametrize("domain", MIXED)
def test_slabs_are_refused_by_reciprocal_heads(domain):
    model = _model(domain)
    message = r"structure 1 \(MgO\): pbc=\[True, True, False\]; reciprocal-space attention"
    with pytest.raises(StructureError, match=message):
        model.predict([_crystals(1)[0], _slab()])
    with pytest.raises(StructureError, match=r"structure 0 of the batch \(MgO\).*different formula"):
        model(_batch([_slab()]))
    assert np.isfinite(_model("real").predict(_slab())).all()  # the real-space sum is right for slabs


def test_training_a_reciprocal_model_skips_slabs_with_their_reason(tmp_path):
    """A slab in the training data is skipped and reported, as a bad cell is; the rest trains."""
    import json
    from pathlib import Path

    import ase.io
    from click.testing import CliRunner

    from ase_crystalformer.cli import main

    structures = ase.io.read(Path(__file__).parent / "fixtures" / "mp_megnet_40.extxyz", index=":")
    slab = _slab()
    slab.info.update(id="slab-1", split="train", e_form=-1.0, band_gap=0.0)
    data = tmp_path / "with_slab.extxyz"
    ase.io.write(data, [*structures, slab])
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--data", str(data), "--target", "e_form", "--epochs", "1", "--swa-epochs", "0",
        "--batch-size", "8", "--blocks", "1", "--cutoff", "7", "--domain", "reciprocal",
        "--out", str(out), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    skipped = dict(json.loads((out / "report.json").read_text())["skipped"])
    assert list(skipped) == ["slab-1"] and "pbc=[True, True, False]" in skipped["slab-1"]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("domain", ["dual", "routed"])
def test_cli_train_checkpoint_predict_and_calculator(tmp_path, domain):
    from pathlib import Path

    import ase.io
    from click.testing import CliRunner

    from ase_crystalformer.calculator import CrystalformerCalculator
    from ase_crystalformer.checkpoint import load_model, save_checkpoint
    from ase_crystalformer.cli import main

    fixture = Path(__file__).parent / "fixtures" / "mp_megnet_40.extxyz"
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--data", str(fixture), "--target", "e_form", "--as-energy", "e_form", "--epochs", "2",
        "--swa-epochs", "1", "--batch-size", "8", "--blocks", "2", "--cutoff", "7", "--domain", domain,
        "--out", str(out), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "swa_test: e_form MAE" in result.output
    model = load_model(out / "best.safetensors")
    assert model.config.domain == domain
    assert [b.attention.kind for b in model.blocks] == [domain, domain]
    again = load_model(save_checkpoint(model, tmp_path / "copy.safetensors"))
    structures = ase.io.read(fixture, index=":3")  # in the training domain
    np.testing.assert_array_equal(again.predict(structures), model.predict(structures))
    atoms = structures[0].copy()
    atoms.calc = CrystalformerCalculator(str(out / "best.safetensors"))
    assert atoms.get_potential_energy() == pytest.approx(float(model.predict(atoms)[0]) * len(atoms), rel=1e-5)
    assert np.isfinite(atoms.get_forces()).all() and np.isfinite(atoms.get_stress()).all()


def test_cli_predict_reports_a_slab_for_reciprocal_heads_as_that_entrys_error(tmp_path):
    """A slab is one structure's error (with --ignore-errors, one row), never the whole run's."""
    import ase.io
    from click.testing import CliRunner

    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.cli import main

    path = save_checkpoint(_model("dual").float(), tmp_path / "dual.safetensors")
    ase.io.write(tmp_path / "a_bulk.cif", _crystals(1)[0])
    ase.io.write(tmp_path / "b_slab.extxyz", _slab())
    files = [str(tmp_path / "a_bulk.cif"), str(tmp_path / "b_slab.extxyz")]
    args = ["predict", *files, "--model", str(path), "--batch-size", "2", "--format", "json"]
    result = CliRunner().invoke(main, [*args, "--ignore-errors"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["error"] is None and np.isfinite(rows[0]["target"])
    assert rows[1]["target"] is None
    assert "b_slab.extxyz" in rows[1]["error"] and "pbc=[True, True, False]; reciprocal-space" in rows[1]["error"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "b_slab.extxyz" in result.output and "pbc=[True, True, False]" in result.output


def test_routed_gates_start_even_and_learn():
    model = Crystalformer(replace(TINY, domain="routed"))
    attention = model.blocks[0].attention
    assert isinstance(attention, MixedSpaceAttention)
    q = torch.randn(5, 4, 8)
    assert torch.equal(attention.route(q), torch.full((5, 4), 0.5))
    with torch.no_grad():
        attention.gate_bias.fill_(0.1)  # the logit is τ·0.1 = 1 at the default τ = 10
    assert torch.allclose(attention.route(q), torch.sigmoid(torch.ones(5, 4)))
    loss = model(_batch(_crystals(2), torch.float32)).sum()
    loss.backward()
    assert float(attention.gate_bias.grad.abs().sum()) > 0 and float(attention.gate_weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("domain", ["reciprocal", "routed"])
def test_row_chunks_of_a_crystal_give_the_same_layer_and_gradients(monkeypatch, domain):
    import ase_crystalformer.reciprocal as reciprocal

    model = _energy_model(domain)
    atoms = _crystals(1, seed=5)[0].repeat((2, 1, 1))
    batch = _batch([atoms])
    whole = energy_forces_stress(model, batch, create_graph=True)
    loss = whole["forces"].square().sum()
    (reference_grad,) = torch.autograd.grad(loss, model.blocks[0].attention.sigma_weight)
    monkeypatch.setattr(reciprocal, "MAX_SLOTS", 1)  # one query atom per chunk
    chunked = energy_forces_stress(model, batch, create_graph=True)
    (grad,) = torch.autograd.grad(chunked["forces"].square().sum(), model.blocks[0].attention.sigma_weight)
    torch.testing.assert_close(chunked["energy"], whole["energy"], rtol=1e-13, atol=0)
    torch.testing.assert_close(chunked["forces"], whole["forces"], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-13)


def test_wave_weights_first_and_second_derivatives():
    """The hand-written backward of the Gaussian wave weights, and the recomputing one that
    force training differentiates again, against numerical derivatives (float64)."""
    from ase_crystalformer.reciprocal import _WaveWeights

    g = torch.Generator().manual_seed(0)
    sigma2 = (2.5 + 3 * torch.rand(2, 3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    half_k2 = (-0.5 * 4 * torch.rand(2, 5, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(_WaveWeights.apply, (sigma2, half_k2))
    assert torch.autograd.gradgradcheck(_WaveWeights.apply, (sigma2, half_k2))
