"""The torch path's row layout: atoms regrouped by window size, every real slot kept once."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk
from structures_for_tests import random_crystal

from ase_crystalformer import Crystalformer, ModelConfig, attention
from ase_crystalformer.attention import row_layout
from ase_crystalformer.geometry import collate, windows_for


def _batch(rng):
    structures = [random_crystal(rng, n) for n in (1, 5, 2, 3)] + [bulk("Si", "diamond", a=5.43)]
    return collate(windows_for(structures, 7.0), torch.float64)


@pytest.mark.parametrize("group_rows", [1, 32])  # 1: small groups, sorted rows
@pytest.mark.parametrize("max_slots", [None, 40, 1])
def test_every_real_slot_once_with_its_pair_and_distance(rng, monkeypatch, max_slots, group_rows):
    monkeypatch.setattr(attention, "GROUP_ROWS", group_rows)
    batch = _batch(rng)
    d2 = torch.rand(batch.mask.shape, dtype=torch.float64)
    layout = row_layout(d2, batch.mask, batch.pair, batch.pair_i, batch.pair_j, max_slots)
    n, m = batch.mask.shape
    seen = torch.zeros(n, m, dtype=torch.long)
    rows_seen = []
    for chunk in layout.chunks:
        rows_seen.append(chunk.rows)
        # The chunk's pairs are exactly its rows' pairs, with their atoms.
        own = torch.isin(batch.pair_i, chunk.rows)
        assert sorted(zip(chunk.pair_i.tolist(), chunk.pair_j.tolist())) == sorted(
            zip(batch.pair_i[own].tolist(), batch.pair_j[own].tolist())
        )
        assert torch.equal(chunk.rows[chunk.pair_row], chunk.pair_i)
        if max_slots is not None and len(chunk.rows) > 1:
            widths = [g.d2.shape[1] for g in chunk.groups]
            assert len(chunk.rows) * max(widths) <= max_slots
        for g in chunk.groups:
            rows = chunk.rows[g.start : g.stop]
            width = g.d2.shape[1]
            real = batch.mask[rows, :width]
            assert int(real.sum()) == int(batch.mask[rows].sum())  # nothing cut off
            assert torch.equal(g.d2, d2[rows, :width])
            padding = g.pair == len(chunk.pair_i)  # the −inf sentinel pair
            assert torch.equal(padding, ~real)
            local = g.pair[real]
            assert torch.equal(chunk.pair_i[local], rows[:, None].expand(-1, width)[real])
            assert torch.equal(chunk.pair_j[local], batch.neighbor[rows, :width][real])
            seen[rows, :width] += real.long()
    assert torch.equal(seen, batch.mask.long())
    order = torch.cat(rows_seen)
    assert sorted(order.tolist()) == list(range(n))
    if layout.inverse is None:
        assert torch.equal(order, torch.arange(n))
    else:
        assert torch.equal(order[layout.inverse], torch.arange(n))


def test_groups_cut_the_padding_and_keep_the_outputs(rng, monkeypatch):
    batch = _batch(rng)
    model = Crystalformer(ModelConfig(n_blocks=2, d_model=16, n_heads=2, d_ff=16, d_head_mlp=8, cutoff=7.0))
    model = model.double().eval()
    with torch.no_grad():
        one_group = model(batch)
        monkeypatch.setattr(attention, "GROUP_ROWS", 1)
        geom = model.geometry(batch)
        grouped = model(batch)
    assert geom.layout.inverse is not None and len(geom.layout.chunks[0].groups) > 1
    padded = sum(g.d2.numel() for c in geom.layout.chunks for g in c.groups)
    assert int(batch.mask.sum()) <= padded < batch.mask.numel()
    torch.testing.assert_close(grouped, one_group, rtol=1e-12, atol=1e-14)


def test_building_and_running_a_model_changes_no_process_state():
    """No flushed denormals, same thread count: a user's other code sees nothing."""
    threads = torch.get_num_threads()
    model = Crystalformer(ModelConfig(n_blocks=1, d_model=16, n_heads=2, d_ff=16, d_head_mlp=8))
    model(collate(windows_for([bulk("Si", "diamond", a=5.43)], model.config.cutoff)))
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 denormal
    assert float(tiny * 0.5) > 0.0
    assert torch.get_num_threads() == threads


def _energy_model() -> Crystalformer:
    from ase_crystalformer import TargetSpec

    config = ModelConfig(n_blocks=2, d_model=16, n_heads=2, d_ff=16, d_head_mlp=8, cutoff=7.0,
                         activation="silu", targets=(TargetSpec("energy", "eV/atom", kind="energy"),))
    torch.manual_seed(0)
    return Crystalformer(config).double()


@pytest.mark.parametrize("group_rows", [1, 32])
def test_crystal_blocks_give_the_pair_lists_outputs_forces_stress_and_training_gradients(rng, monkeypatch, group_rows):
    """The dense per-crystal scores are the pair lists' computation, to round-off: outputs,
    forces and stress, and the gradients of a force loss (double backward)."""
    from ase_crystalformer import forces

    monkeypatch.setattr(attention, "GROUP_ROWS", group_rows)
    structures = [random_crystal(rng, n) for n in (3, 1, 5, 2, 7, 7)] + [bulk("Si", "diamond", a=5.43)]
    batch = collate(windows_for(structures, 7.0), torch.float64)
    model = _energy_model()

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = forces.energy_forces_stress(model, batch, create_graph=True)
        loss = out["energy"].sum() + out["forces"].square().sum() + out["stress"].square().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return [out["energy"], out["forces"], out["stress"]], list(grads)

    assert model.geometry(batch).layout.chunks[0].blocks is not None
    with_blocks = run()
    monkeypatch.setattr(attention, "BLOCK_ENTRIES_PER_PAIR", -(10**9))  # pair lists only
    assert model.geometry(batch).layout.chunks[0].blocks is None
    with_pairs = run()
    for a, b in zip(with_blocks[0] + with_blocks[1], with_pairs[0] + with_pairs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_crystal_blocks_lay_out_every_atom_once_and_skip_sparse_cells():
    """Blocks hold each atom in one slot of its crystal's block; a cell much larger than the
    window (few of its pairs within reach) keeps the pair lists."""
    from ase_crystalformer.attention import _crystal_blocks

    crystal = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3])  # sizes 3, 5, 1, 3
    blocks = _crystal_blocks(crystal, n_pairs=9 + 25 + 1 + 9, rows=None)
    assert blocks.sizes == [5, 3, 1] and blocks.counts == [1, 2, 1]
    slots = blocks.slot.tolist()
    assert slots == [5, 6, 7, 0, 1, 2, 3, 4, 11, 8, 9, 10] and torch.equal(blocks.row_slot, blocks.slot)
    assert blocks.entries == 25 + 9 + 9 + 1
    one = _crystal_blocks(torch.zeros(4, dtype=torch.long), n_pairs=16, rows=None)
    assert one.slot is None and one.row_slot is None  # the atoms are already the slots
    big = bulk("Cu", "fcc", a=3.6, cubic=True) * (8, 8, 8)  # 2,048 atoms, 14.4 Å cube
    batch = collate(windows_for([big], 7.0))
    model = Crystalformer(ModelConfig(n_blocks=1, d_model=16, n_heads=2, d_ff=16, d_head_mlp=8, cutoff=7.0))
    layout = model.geometry(batch).layout
    assert all(chunk.blocks is None for chunk in layout.chunks)
