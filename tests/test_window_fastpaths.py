"""The shortcuts of window building give what the general path gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.geometry.minkowski_reduction import is_minkowski_reduced

from ase_crystalformer.errors import StructureError
from ase_crystalformer.geometry import _is_reduced, build_window, windows_for


def test_is_reduced_agrees_with_ase() -> None:
    rng = np.random.default_rng(0)
    cells = [np.eye(3) * 4.0, np.array(bulk("Cu", "fcc", a=3.6).cell), np.array(bulk("Mg", "hcp").cell)]
    cells += [rng.normal(size=(3, 3)) for _ in range(300)]
    cells += [np.diag(rng.uniform(1, 5, 3)) + np.triu(rng.integers(-2, 3, (3, 3)), 1) for _ in range(300)]
    verdicts = [(_is_reduced(c), bool(is_minkowski_reduced(c))) for c in cells]
    assert all(ours == theirs for ours, theirs in verdicts)
    assert 0 < sum(ours for ours, _ in verdicts) < len(cells)  # both kinds were tried


def test_a_tie_broken_by_rounding_counts_as_reduced_and_changes_no_window() -> None:
    """The fcc primitive basis has |b1 - b2| = |b2|; typed with a few decimals, rounding breaks
    that tie. ase then reduces the cell again (to another basis of the same lattice); we keep
    it, and the window, a sphere, holds the same images in either basis."""
    from ase.geometry import minkowski_reduce

    atoms = bulk("NaCl", "rocksalt", a=5.6)
    atoms.rattle(0.05, seed=3)
    cell = np.array(atoms.cell)
    cell[1] *= 1 + 1e-8  # |b1 - b2| now falls short of |b2| by ~5e-9 of a length
    atoms.set_cell(cell, scale_atoms=False)
    assert _is_reduced(cell) and not is_minkowski_reduced(cell)
    ase_cell = minkowski_reduce(cell)[0]
    assert not np.allclose(ase_cell, cell)
    other = atoms.copy()
    other.set_cell(ase_cell, scale_atoms=False)  # the same lattice in ase's basis

    def images(w):  # (i, j, |r|) of every image, sorted
        r = w.positions[w.neighbor] + w.shift @ w.cell - w.positions[w.center]
        rows = np.column_stack([w.center, w.neighbor, np.round(np.linalg.norm(r, axis=1), 9)])
        return rows[np.lexsort(rows.T[::-1])]

    ours, theirs = build_window(atoms, 6.0), build_window(other, 6.0)
    assert np.array_equal(ours.cell, cell)  # kept as given, not reduced again
    assert np.array_equal(images(ours), images(theirs))


def _dilute_gas() -> Atoms:
    """200 atoms ~6 Å apart in a large box: few pairs per atom, so build_window numbers the
    pairs with np.unique rather than its n² table."""
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)[:200]
    atoms = Atoms("Ar200", positions=6.0 * grid + 0.3, cell=[40.0, 40.0, 40.0], pbc=True)
    atoms.rattle(0.2, seed=3)
    return atoms


def _rattled_nacl() -> Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.6).repeat((1, 1, 2))
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.mark.parametrize("make, table", [(_rattled_nacl, True), (_dilute_gas, False)])
def test_window_order_and_pairs(make, table, monkeypatch) -> None:
    atoms = make()
    calls = []
    unique = np.unique
    monkeypatch.setattr(np, "unique", lambda *a, **k: calls.append(1) or unique(*a, **k))
    w = build_window(atoms, 6.0)
    monkeypatch.undo()
    assert bool(calls) != table  # both ways of numbering pairs are covered
    assert (np.diff(w.center) >= 0).all()  # atom by atom, each atom's images nearest first
    d = np.linalg.norm(w.positions[w.neighbor] + w.shift @ w.cell - w.positions[w.center], axis=1)
    same_row = w.center[1:] == w.center[:-1]
    assert (d[1:][same_row] >= d[:-1][same_row] - 1e-12).all()
    assert (w.shift[w.center == w.neighbor] == 0).all(axis=1).sum() == len(atoms)  # one self image each
    keys, inverse = np.unique(w.center.astype(np.int64) * len(atoms) + w.neighbor, return_inverse=True)
    assert np.array_equal(w.pair, inverse.reshape(-1))
    assert np.array_equal(w.pair_i, keys // len(atoms)) and np.array_equal(w.pair_j, keys % len(atoms))
    starts = np.searchsorted(w.center, np.arange(len(atoms)))
    assert np.array_equal(w.slot, np.arange(w.n_images) - starts[w.center])


def test_neighbour_lists_in_any_order_give_the_same_window(monkeypatch) -> None:
    """The window does not depend on the order vesin lists its entries in (here reversed):
    the same images, in the same slots, pairs and pair numbers."""
    import vesin

    atoms = bulk("NaCl", "rocksalt", a=5.6).repeat((1, 1, 2))
    atoms.rattle(0.05, seed=1)
    usual = build_window(atoms, 6.0)
    compute = vesin.NeighborList.compute

    def reversed_compute(self, *args, **kwargs):
        return [x[::-1].copy() for x in compute(self, *args, **kwargs)]

    monkeypatch.setattr(vesin.NeighborList, "compute", reversed_compute)
    other = build_window(atoms, 6.0)

    def images(w):
        rows = np.column_stack([w.center, w.neighbor, w.shift])
        return rows[np.lexsort(rows.T[::-1])]

    assert np.array_equal(images(usual), images(other))
    for name in ("center", "neighbor", "pair", "pair_i", "pair_j", "slot"):
        assert np.array_equal(getattr(usual, name), getattr(other, name)), name
    first = other.slot == 0  # each atom's nearest image is its self image
    assert (other.neighbor[first] == other.center[first]).all() and (other.shift[first] == 0).all()


def test_images_at_equal_distances_keep_one_order_whatever_vesin_lists(monkeypatch) -> None:
    """An unrattled supercell has many images at exactly equal distances; they are ordered by
    neighbour, then shift, so the whole window, shifts included, is the same either way."""
    import vesin

    atoms = bulk("Al", "fcc", a=4.05).repeat((2, 1, 1))
    usual = build_window(atoms, 7.0)
    compute = vesin.NeighborList.compute
    monkeypatch.setattr(vesin.NeighborList, "compute",
                        lambda self, *a, **k: [x[::-1].copy() for x in compute(self, *a, **k)])
    other = build_window(atoms, 7.0)
    d = np.linalg.norm(usual.positions[usual.neighbor] - usual.positions[usual.center] + usual.shift @ usual.cell, axis=1)
    assert len(np.unique(d.round(9))) < usual.n_images / 4  # ties are the rule here
    for f in dataclasses.fields(usual):
        assert np.array_equal(getattr(usual, f.name), getattr(other, f.name)), f.name


def test_windows_on_threads_are_the_serial_windows_in_input_order() -> None:
    bases = [bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1)),
             bulk("NaCl", "rocksalt", a=5.6), bulk("Mg", "hcp")]
    crystals = []
    for k in range(12):  # twelve distinct structures: a window out of order cannot match
        atoms = bases[k % 4].copy()
        atoms.rattle(0.02, seed=k)
        crystals.append(atoms)
    serial, threaded = windows_for(crystals, 6.0, threads=1), windows_for(crystals, 6.0, threads=3)
    for a, b in zip(serial, threaded, strict=True):
        for f in dataclasses.fields(a):
            assert np.array_equal(getattr(a, f.name), getattr(b, f.name)), f.name
    # Two bad structures: the error names the first in input order, whatever thread fails first.
    overlapping = Atoms("Cu2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=np.eye(3) * 4.0, pbc=True)
    empty = Atoms(cell=np.eye(3) * 4.0, pbc=True)
    bad = crystals[:5] + [overlapping] + crystals[5:] + [empty]
    with pytest.raises(StructureError, match=r"structure 5 \(Cu2\).*overlapping"):
        windows_for(bad, 6.0, threads=3)
