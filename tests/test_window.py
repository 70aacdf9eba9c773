"""The periodic window: completeness, partial pbc, tiny and large cells, its truncation bound."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from conftest import spread_sigma
from reference import box_images
from structures_for_tests import random_crystal

from ase_crystalformer import Crystalformer, ModelConfig, StructureError
from ase_crystalformer.geometry import build_window, collate, image_vectors


def brute_force_images(atoms: Atoms, cutoff: float) -> set[tuple[int, int, int, int, int]]:
    """Every (i, j, n) with |p_j + n·L - p_i| ≤ cutoff, from a box much larger than needed."""
    images = box_images(atoms, cutoff + 3.0).numpy().astype(int)
    cell, pos = np.asarray(atoms.cell), atoms.positions
    found = set()
    for i in range(len(atoms)):
        for j in range(len(atoms)):
            d = np.linalg.norm(pos[j] + images @ cell - pos[i], axis=1)
            for n in images[d <= cutoff]:
                found.add((i, j, *n))
    return found


def window_set(window, atoms: Atoms) -> set[tuple[int, int, int, int, int]]:
    """The window's images as (i, j, n) with n in the lattice basis of ``atoms``.

    The window works on wrapped positions in a reduced cell; each of its image vectors must
    be an image vector of the input, p_j + n·L - p_i with integer n along periodic axes.
    """
    i, j = window.center.astype(int), window.neighbor.astype(int)
    r = window.positions[j] + window.shift @ window.cell - window.positions[i]
    offset = r - (atoms.positions[j] - atoms.positions[i])
    pbc, cell = atoms.pbc, np.asarray(atoms.cell)
    n = np.zeros((len(i), 3))
    n[:, pbc] = np.linalg.lstsq(cell[pbc].T, offset.T, rcond=None)[0].T
    whole = np.rint(n)
    np.testing.assert_allclose(n, whole, atol=1e-6)
    np.testing.assert_allclose(whole @ cell, offset, atol=1e-6)
    return {(int(a), int(b), *map(int, m)) for a, b, m in zip(i, j, whole)}


def _skip_boundary(atoms, cutoff, found):
    """Drop images within 1e-9 Å of the sphere, where rounding decides membership."""
    cell, pos = np.asarray(atoms.cell), atoms.positions
    return {t for t in found if abs(np.linalg.norm(pos[t[1]] + np.array(t[2:]) @ cell - pos[t[0]]) - cutoff) > 1e-9}


@pytest.mark.parametrize("seed", range(4))
def test_window_is_complete_and_exact(seed):
    rng = np.random.default_rng(seed)
    atoms = random_crystal(rng, int(rng.integers(1, 4)), scale=float(rng.uniform(2.0, 5.0)), min_dist=0.5)
    atoms.positions += rng.uniform(-8, 8, 3)  # unwrapped coordinates must work too
    cutoff = 6.0
    got, want = window_set(build_window(atoms, cutoff), atoms), brute_force_images(atoms, cutoff)
    assert _skip_boundary(atoms, cutoff, got) == _skip_boundary(atoms, cutoff, want)
    assert all((t[0], t[0], 0, 0, 0) in got for t in got)  # the self image is included


def test_tiny_one_atom_cell():
    atoms = Atoms("H", cell=[[1.5, 0, 0], [0.7, 1.4, 0], [0.3, 0.2, 1.6]], pbc=True)
    window = build_window(atoms, 5.0)
    assert window_set(window, atoms) == brute_force_images(atoms, 5.0)
    assert window.n_images > 100


def test_partial_pbc_slab_has_images_only_along_periodic_axes():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    assert slab.pbc.tolist() == [True, True, False]
    window = build_window(slab, 7.0)
    assert (window.shift[:, 2] == 0).all()
    assert window_set(window, slab) == brute_force_images(slab, 7.0)
    wire = Atoms("C2", positions=[[0, 0, 0], [0, 0, 1.3]], cell=[0, 0, 2.6], pbc=[False, False, True])
    window = build_window(wire, 6.0)
    assert (window.shift[:, :2] == 0).all() and window_set(window, wire) == brute_force_images(wire, 6.0)


def test_no_periodic_axis_is_refused():
    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    with pytest.raises(ValueError, match="no periodic axis"):
        build_window(molecule, 6.0)


def test_window_memory_is_linear_in_cell_size():
    small = bulk("Si", "diamond", 5.43, cubic=True)
    large = small.repeat((4, 4, 4))  # 512 atoms
    w_small, w_large = build_window(small, 6.0), build_window(large, 6.0)
    assert w_large.n_images == 64 * w_small.n_images
    batch = collate([w_large])
    assert batch.neighbor.shape[1] == w_small.n_images // len(small)  # same images per atom


def test_image_vectors_match_window_distances():
    atoms = random_crystal(np.random.default_rng(5), 3)
    window = build_window(atoms, 6.0)
    batch = collate([window], torch.float64)
    r = image_vectors(batch)
    d = r.norm(dim=-1)[batch.mask]
    assert d.max() <= 6.0 + 1e-9
    assert d.min() == 0.0  # the self image


def gaussian_tail_fraction(cutoff: float, sigma: float) -> float:
    """Fraction of a 3-D Gaussian's mass beyond ``cutoff`` (χ₃ tail; docs/ARCHITECTURE.md)."""
    u = cutoff / sigma
    return math.erfc(u / math.sqrt(2)) + math.sqrt(2 / math.pi) * u * math.exp(-u * u / 2)


def test_documented_tail_numbers():
    assert gaussian_tail_fraction(10.0, 1.98) == pytest.approx(1.2e-5, rel=0.05)
    assert gaussian_tail_fraction(10.0, 1.4) < 1e-10


@pytest.mark.parametrize("seed", range(3))
def test_truncation_against_a_much_larger_window(seed):
    """Worst case σ → 1.98 Å: the 10 Å window differs from a 16 Å one by < the tail fraction."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = ModelConfig(n_blocks=2, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32)
    small = Crystalformer(config).double()
    spread_sigma(small, scale=1e4)  # pushes the heads to σ → 1.98 Å or σ → 0
    large = Crystalformer(replace(config, cutoff=16.0)).double()
    large.load_state_dict(small.state_dict())
    bound = gaussian_tail_fraction(10.0, small.config.sigma_max)
    for scale in (3.0, 4.5):  # dense and open cells
        atoms = random_crystal(rng, 4, scale=scale, min_dist=1.5)
        a, b = small.predict(atoms), large.predict(atoms)
        np.testing.assert_allclose(a, b, rtol=bound, atol=1e-9)
        assert not np.array_equal(a, b)  # the larger window does see more images


def test_overlapping_atoms_are_refused():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [0.05, 0, 0]], cell=np.eye(3) * 3, pbc=True)
    with pytest.raises(StructureError, match="overlapping"):
        build_window(atoms, 6.0)


def test_shifts_that_do_not_fit_their_dtype_are_refused(monkeypatch):
    """Never a wrapped-around shift. Reduced cells keep real shifts far below int16's range,
    so the guard is exercised with int8: a 0.2 Å wire needs shifts up to 150 at 30.1 Å."""
    import ase_crystalformer.geometry as geometry

    wire = Atoms("H", positions=[[0, 0, 0]], cell=[0, 0, 0.2], pbc=[False, False, True])
    assert np.abs(build_window(wire, 30.1).shift).max() == 150
    monkeypatch.setattr(geometry, "SHIFT_DTYPE", np.int8, raising=False)
    with pytest.raises(StructureError, match=r"structure \(H\): a 30.1 Å window needs images 150 cells away, more than 127"):
        build_window(wire, 30.1)
