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
