"""The fast path against the brute-force float64 reference (tests/reference.py)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import spread_sigma
from reference import box_images, reference_attention, reference_forward
from structures_for_tests import random_crystal

from ase_crystalformer import Crystalformer, ModelConfig
from ase_crystalformer.geometry import build_window, collate

SMALL = ModelConfig(n_blocks=2, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32)


def _model(config=SMALL, spread=True) -> Crystalformer:
    model = Crystalformer(config).double()
    if spread:
        spread_sigma(model)
    return model.eval()


def _layer_inputs(model, atoms):
    batch = collate([build_window(atoms, model.config.cutoff)], torch.float64)
    x = torch.randn(len(atoms), model.config.d_model, dtype=torch.float64)
    return batch, x


def _masked_reference(attn, x, atoms, cutoff, positions=None, cell=None):
    """Reference restricted to images within ``cutoff``: checks the implementation exactly."""
    positions = torch.tensor(atoms.positions) if positions is None else positions
    cell = torch.tensor(np.asarray(atoms.cell)) if cell is None else cell
    images = box_images(atoms, cutoff + 2.0)
    r = positions[None, :, None] - positions[:, None, None] + (images @ cell)[None, None]
    keep = (r * r).sum(-1).detach() <= cutoff**2  # (N, N, W)
    # Push excluded images infinitely far: exp(γ·inf) = 0, the same as leaving them out.
    far = torch.where(keep, torch.zeros((), dtype=r.dtype), torch.full((), 1e6, dtype=r.dtype))
    return reference_attention(attn, x, positions, cell, images, extra_distance=far)


@pytest.mark.parametrize("n_atoms", [1, 2, 4])
def test_alpha_beta_match_reference_on_window(rng, n_atoms):
    model = _model()
    attn = model.blocks[0].attention
    for _ in range(2):
        atoms = random_crystal(rng, n_atoms)
        batch, x = _layer_inputs(model, atoms)
        geom = model.geometry(batch)
        alpha, beta = attn.encodings(x, geom)
        _, ref_alpha, ref_beta = _masked_reference(attn, x, atoms, model.config.cutoff)
        i, j = batch.pair_i, batch.pair_j
        torch.testing.assert_close(alpha, ref_alpha[i, j], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(beta, ref_beta[i, j], rtol=1e-9, atol=1e-12)


def test_layer_output_and_gradients_match_reference(rng):
    model = _model()
    attn = model.blocks[0].attention
    atoms = random_crystal(rng, 3)
    batch, x = _layer_inputs(model, atoms)
    positions = batch.positions.clone().requires_grad_(True)
    cell = batch.cells.clone().requires_grad_(True)
    x = x.requires_grad_(True)

    geom = model.geometry(replace(batch, positions=positions, cells=cell))
    out = attn(x, geom)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, positions, cell, attn.sigma_weight, attn.rbf_proj, attn.q_proj.weight])

    pos_ref = torch.tensor(atoms.positions).requires_grad_(True)
    cell_ref = torch.tensor(np.asarray(atoms.cell)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref, _, _ = _masked_reference(attn, x_ref, atoms, model.config.cutoff, pos_ref, cell_ref)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [x_ref, pos_ref, cell_ref, attn.sigma_weight, attn.rbf_proj, attn.q_proj.weight])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.reshape(rg.shape), rg, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_matches_infinite_sum(seed):
    """The 10 Å window against every image up to 22 Å: agreement to 1e-6 relative.

    σ here is the model's own (1.4 ± 0.07 Å at initialisation, as during most of training);
    the worst case σ → 1.98 Å is bounded in ``test_window.py``.
    """
    rng = np.random.default_rng(seed)
    model = _model(ModelConfig(n_blocks=2), spread=False)
    model.train()
    atoms = random_crystal(rng, 3)
    model(collate([build_window(atoms, model.config.cutoff)], torch.float64))  # freezes σ stats
    model.eval()
    fast = model(collate([build_window(atoms, model.config.cutoff)], torch.float64))[0]
    slow = reference_forward(model, atoms, radius=22.0)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9)


def test_gradients_wrt_positions_match_infinite_sum(rng):
    model = _model(ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32), spread=False)
    atoms = random_crystal(rng, 2)
    batch = collate([build_window(atoms, model.config.cutoff)], torch.float64)

    pos = batch.positions.clone().requires_grad_(True)
    fast = model(replace(batch, positions=pos)).sum()
    (g_fast,) = torch.autograd.grad(fast, pos)
    pos_ref = torch.tensor(atoms.positions).requires_grad_(True)
    slow = reference_forward(model, atoms, radius=22.0, positions=pos_ref).sum()
    (g_slow,) = torch.autograd.grad(slow, pos_ref)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-6, atol=1e-9)
    assert torch.isfinite(g_fast).all()


def test_row_chunks_give_the_same_layer(rng):
    """Large cells run in chunks of query atoms; the result must not depend on the chunking."""
    from ase_crystalformer.attention import torch_window_attention

    model = _model()
    attn = model.blocks[0].attention
    structures = [random_crystal(rng, n) for n in (1, 3, 2)]
    batch = collate([build_window(a, model.config.cutoff) for a in structures], torch.float64)
    geom = model.geometry(batch)
    x = torch.randn(len(batch.numbers), model.config.d_model, dtype=torch.float64)
    q, k, v = attn._project(x)
    gamma = attn.gamma(q)
    whole = torch_window_attention(q, k, v, gamma, geom)
    slots = geom.d2.shape[1]
    full = replace(geom, basis=model.basis(geom.d2), layout=None)  # (N, M, K) bases given
    assert geom.basis is None and geom.rbf is not None  # bases made per chunk from d2
    for rows in (1, 2, 5):
        for g in (geom, full):
            chunked = torch_window_attention(q, k, v, gamma, g, max_slots=rows * slots)
            torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(chunked[1], whole[1], rtol=1e-12, atol=1e-14)


def test_large_windows_make_bases_per_chunk(rng, monkeypatch):
    """Above MAX_SLOTS slots the model precomputes no bases; outputs and forces are unchanged."""
    import ase_crystalformer.model as model_module

    model = _model()
    atoms = random_crystal(rng, 4)
    batch = collate([build_window(atoms, model.config.cutoff)], torch.float64)

    def outputs_and_grad():
        pos = batch.positions.clone().requires_grad_(True)
        out = model(replace(batch, positions=pos)).sum()
        return out, torch.autograd.grad(out, pos)[0]

    def precomputed_bases(geom) -> bool:
        return all(g.basis is not None for c in geom.layout.chunks for g in c.groups)

    whole = outputs_and_grad()
    assert precomputed_bases(model.geometry(batch))
    monkeypatch.setattr(model_module, "MAX_SLOTS", 8)
    assert not any(g.basis is not None for c in model.geometry(batch).layout.chunks for g in c.groups)
    lazy = outputs_and_grad()
    torch.testing.assert_close(lazy[0], whole[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lazy[1], whole[1], rtol=1e-12, atol=1e-14)


def test_checkpointed_chunks_give_the_same_force_training_gradients(rng, monkeypatch):
    """Chunks are recomputed in backward (activation checkpointing): the energy, the forces and
    the parameter gradients of a force loss (a double backward) must not change."""
    from torch.utils.checkpoint import checkpoint

    import ase_crystalformer.attention as attention_module
    import ase_crystalformer.model as model_module

    model = _model()
    batch = collate([build_window(random_crystal(rng, 4), model.config.cutoff)], torch.float64)

    def energy_forces_and_parameter_grads():
        pos = batch.positions.clone().requires_grad_(True)
        energy = model(replace(batch, positions=pos)).sum()
        (forces,) = torch.autograd.grad(-energy, pos, create_graph=True)
        loss = energy + (forces**2).sum()
        return [energy, forces, *torch.autograd.grad(loss, list(model.parameters()))]

    whole = energy_forces_and_parameter_grads()
    monkeypatch.setattr(attention_module, "MAX_SLOTS", 2 * batch.neighbor.shape[1])  # two atoms a chunk
    monkeypatch.setattr(model_module, "MAX_SLOTS", 8)  # and bases made per chunk
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(attention_module, "checkpoint", counted)
    chunked = energy_forces_and_parameter_grads()
    assert len(calls) == 2 * len(model.blocks)  # 4 atoms in two chunks, in every block
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def _graph_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose gradients ``tensor``'s autograd graph would accumulate."""
    leaves, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def test_inference_forces_leave_the_parameters_out_of_the_graph(rng, monkeypatch):
    """Without ``create_graph`` the model runs on detached parameters (so backward over a large
    cell's checkpointed chunks visits only what leads to positions and strain): the results
    equal those of the training path, the parameters are untouched, and none is in the graph."""
    import ase_crystalformer.attention as attention_module

    from ase_crystalformer.forces import energy_forces_stress

    from ase_crystalformer import TargetSpec

    model = _model(replace(SMALL, targets=(TargetSpec("energy", "eV/atom", kind="energy"),)))
    batch = collate([build_window(random_crystal(rng, 4), model.config.cutoff)], torch.float64)
    monkeypatch.setattr(attention_module, "MAX_SLOTS", 2 * batch.neighbor.shape[1])  # checkpointed chunks
    training = energy_forces_stress(model, batch, create_graph=True)
    inference = energy_forces_stress(model, batch)
    for key in ("energy", "forces", "stress", "outputs"):
        torch.testing.assert_close(inference[key], training[key].detach(), rtol=1e-12, atol=1e-14)
    parameters = {id(p) for p in model.parameters()}
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert parameters & {id(t) for t in _graph_leaves(training["outputs"])}  # the check can see them
    assert not parameters & {id(t) for t in _graph_leaves(inference["outputs"])}
