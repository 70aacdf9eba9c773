"""Exact symmetries of the model in every domain: the real window and the reciprocal window
are spheres, so the cell choice cannot matter."""

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import make_supercell
from ase.io import read
from conftest import spread_sigma
from scipy.spatial.transform import Rotation
from structures_for_tests import random_crystal

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.config import DOMAINS


@pytest.fixture(scope="module", params=DOMAINS)
def model(request) -> Crystalformer:
    """A tiny float64 model per domain (real-space, reciprocal-space and mixed heads)."""
    torch.manual_seed(1)
    m = Crystalformer(ModelConfig(n_blocks=2, d_model=64, n_heads=4, d_ff=128, domain=request.param)).double()
    spread_sigma(m)
    with torch.no_grad():  # routed: gates that differ per head and atom
        for block in m.blocks:
            if hasattr(block.attention, "gate_weight"):
                block.attention.gate_weight.normal_(0, 1.0)
                block.attention.gate_bias.normal_(0, 1.0)
    return m.eval()


def crystals(n: int = 3, seed: int = 7) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    return [random_crystal(rng, int(rng.integers(1, 5))) for _ in range(n)]


def _close(a, b, rtol=1e-10):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("atoms", crystals())
def test_rotation_and_reflection(model, atoms):
    base = model.predict(atoms)
    for seed in range(2):
        q = Rotation.random(random_state=seed).as_matrix()
        for sign in (1, -1):  # proper rotation, then rotoinversion
            moved = atoms.copy()
            moved.set_cell(atoms.cell @ (sign * q).T)
            moved.positions = atoms.positions @ (sign * q).T
            _close(model.predict(moved), base)


@pytest.mark.parametrize("atoms", crystals())
def test_translation_and_rewrap(model, atoms):
    moved = atoms.copy()
    moved.translate([0.7, -1.3, 2.9])
    _close(model.predict(moved), model.predict(atoms))
    moved.wrap()
    _close(model.predict(moved), model.predict(atoms))


def test_atom_permutation(model):
    atoms = crystals(1, seed=3)[0].repeat((1, 1, 2))
    perm = np.random.default_rng(0).permutation(len(atoms))
    _close(model.predict(atoms[perm]), model.predict(atoms))


def test_lattice_translation_of_one_atom(model):
    atoms = crystals(1, seed=4)[0]
    moved = atoms.copy()
    moved.positions[0] += atoms.cell[0] - 2 * atoms.cell[2]
    _close(model.predict(moved), model.predict(atoms))


@pytest.mark.parametrize(
    "matrix",
    [
        np.diag([2, 1, 1]),
        np.diag([2, 2, 1]),
        np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 1]]),  # non-diagonal, det 2
        np.array([[2, 1, 0], [0, 1, 1], [1, 0, 2]]),  # non-diagonal, det 5
    ],
)
def test_supercells(model, matrix):
    for atoms in crystals(2, seed=11):
        _close(model.predict(make_supercell(atoms, matrix)), model.predict(atoms))


@pytest.mark.parametrize(
    "unimodular",
    [np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]), np.array([[0, 1, 0], [1, 0, 0], [2, 3, -1]])],
)
def test_unimodular_basis_change(model, unimodular):
    assert abs(round(np.linalg.det(unimodular))) == 1
    for atoms in crystals(2, seed=13):
        other = atoms.copy()
        other.set_cell(unimodular @ np.asarray(atoms.cell), scale_atoms=False)
        other.wrap()
        _close(model.predict(other), model.predict(atoms))


def test_batch_independence(model):
    structures = crystals(5, seed=21)
    alone = np.array([model.predict(s)[0] for s in structures])
    together = model.predict(structures)
    reversed_ = model.predict(structures[::-1])[::-1]
    in_pairs = model.predict(structures, batch_size=2)
    for values in (together, reversed_, in_pairs):
        _close(values, alone, rtol=1e-12)


def test_batch_independence_float32():
    torch.manual_seed(2)
    m = Crystalformer(ModelConfig(n_blocks=2, d_model=64, n_heads=4, d_ff=128)).eval()
    spread_sigma(m)
    structures = crystals(4, seed=22)
    alone = np.array([m.predict(s)[0] for s in structures])
    np.testing.assert_allclose(m.predict(structures), alone, rtol=1e-5, atol=1e-6)
    assert m.predict(structures).dtype == np.float32


def test_primitive_option_gives_the_same_answer(model):
    from ase_crystalformer.structures import primitive_cell

    for atoms in crystals(2, seed=31):
        big = make_supercell(atoms, np.array([[1, 1, 0], [-1, 1, 0], [0, 0, 2]]))
        assert len(primitive_cell(big)) == len(atoms)
        _close(model.predict(big, primitive=True), model.predict(atoms))
        _close(model.predict(big, primitive=True), model.predict(big))


NACL = Path(__file__).resolve().parent.parent / "examples" / "structures" / "NaCl_mp-22862.cif"
FAR = 40_000  # lattice vectors: shifts beyond int16 if the window used the cell as given


def far_and_skewed(atoms: Atoms) -> dict[str, Atoms]:
    """The same crystal with an atom unwrapped by FAR lattice vectors, with the basis
    b' = b + FAR·a (valid, extremely skewed), and with both (an atom 5·b' away: 1e6 Å, as
    far as float64 positions keep 1e-10 Å)."""
    far = atoms.copy()
    far.positions[0] += FAR * atoms.cell[0] - 3 * atoms.cell[2]
    skewed = atoms.copy()
    cell = np.array(atoms.cell)
    cell[1] += FAR * cell[0]
    skewed.set_cell(cell, scale_atoms=False)
    both = skewed.copy()
    both.positions[-1] -= 5 * cell[1]
    return {"far": far, "skewed": skewed, "both": both}


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_far_unwrapped_atoms_and_skewed_bases_give_the_clean_prediction(dtype, rtol):
    from ase_crystalformer import load_model

    model = load_model("mp-e_form").to(dtype)
    clean = read(NACL)
    want = model.predict(clean)
    assert want[0] == pytest.approx(-2.105, abs=0.01)  # the trained model: NaCl's MEGNet label is -2.105 eV/atom
    for name, atoms in far_and_skewed(clean).items():
        np.testing.assert_allclose(model.predict(atoms), want, rtol=rtol, err_msg=name)


def test_forces_and_stress_of_far_and_skewed_inputs_are_those_of_the_clean_cell():
    from ase_crystalformer.calculator import CrystalformerCalculator

    torch.manual_seed(3)
    energy = TargetSpec("energy", "eV/atom", kind="energy")
    model = Crystalformer(ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32,
                                      activation="silu", targets=(energy,)))
    spread_sigma(model)
    calc = CrystalformerCalculator(model.eval(), dtype="float64", device="cpu")
    clean = crystals(1, seed=41)[0]
    clean.rattle(0.05, seed=1)
    clean.calc = calc
    forces, stress, total = clean.get_forces(), clean.get_stress(), clean.get_potential_energy()
    assert np.abs(forces).max() > 1e-3  # a rattled cell has forces worth comparing
    for name, atoms in far_and_skewed(clean).items():
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(total, rel=1e-10), name
        np.testing.assert_allclose(atoms.get_forces(), forces, rtol=1e-7, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(atoms.get_stress(), stress, rtol=1e-7, atol=1e-9, err_msg=name)


def test_far_and_skewed_slabs_and_wires(model):
    """Only periodic axes are reduced and wrapped; an open axis may hold a zero vector."""
    from ase.build import fcc111

    if model.config.domain != "real":
        pytest.skip("reciprocal-space heads refuse partial pbc (test_reciprocal.py)")

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    slab.rattle(0.05, seed=0)
    flat = slab.copy()
    flat.cell[2] = 0.0
    wire = Atoms("CN", positions=[[0, 0, 0], [0.2, 0, 1.3]], cell=[0, 0, 2.6], pbc=[False, False, True])
    for atoms in (slab, flat, wire):
        moved = atoms.copy()
        moved.positions[-1] += FAR * atoms.cell[2 if atoms is wire else 0]
        _close(model.predict(moved), model.predict(atoms))
    for atoms in (slab, flat):
        _close(model.predict(far_and_skewed(atoms)["both"]), model.predict(atoms))
