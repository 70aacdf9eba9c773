"""Model construction, parameter count, predict() and the refusal of bad structures."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from pymatgen.core import Lattice, Structure

from ase_crystalformer import Crystalformer, ModelConfig, StructureError, TargetSpec


def test_default_is_the_paper_architecture():
    model = Crystalformer()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 853_505  # the paper's 853,517 minus 4 × 3 frozen/unused scalars
    blocks = sum(p.numel() for p in model.blocks[0].parameters())
    assert blocks == 206_080
    simplified = Crystalformer(ModelConfig(n_rbf=0))
    assert sum(p.numel() for p in simplified.parameters()) == 853_505 - 4 * 8192


def test_tfixup_initialisation_scales():
    torch.manual_seed(0)
    model = Crystalformer()
    assert model.embedding.weight.std().item() == pytest.approx(128**-0.5 * 36**-0.25, rel=0.02)
    attn = model.blocks[0].attention
    bound = 0.67 * 4**-0.25 * (6 / 256) ** 0.5  # scaled Xavier-uniform bound
    assert attn.v_proj.weight.abs().max().item() <= bound + 1e-7
    assert attn.v_proj.weight.abs().max().item() > 0.95 * bound
    assert attn.q_proj.weight.abs().max().item() > 1.5 * bound  # W_Q is not scaled
    assert attn.rbf_proj.abs().max().item() <= 64**-0.5 * (6 / 192) ** 0.5 + 1e-7
    assert float(attn.q_proj.bias.detach().abs().sum()) == 0.0


def test_sigma_statistics_freeze_on_first_training_batch():
    model = Crystalformer(ModelConfig(n_blocks=1))
    attn = model.blocks[0].attention
    assert not bool(attn.sigma_ready)
    batch = model.make_batch([bulk("Si"), bulk("NaCl", "rocksalt", 5.6)])
    model.train()
    model(batch)
    shift, scale = attn.sigma_shift.item(), attn.sigma_scale.item()
    assert bool(attn.sigma_ready) and scale != 1.0
    model(model.make_batch([bulk("Cu")]))
    assert (attn.sigma_shift.item(), attn.sigma_scale.item()) == (shift, scale)
    assert not attn.sigma_scale.requires_grad


def test_sigma_is_bounded():
    attn = Crystalformer(ModelConfig(n_blocks=1)).blocks[0].attention
    q = torch.randn(50, 8, 16) * 1e3
    sigma = (-1 / (2 * attn.gamma(q))).sqrt()
    assert (sigma < 1.4 / 0.5**0.5).all() and (sigma > 0).all()


def test_predict_accepts_ase_pymatgen_and_mixes():
    model = Crystalformer(ModelConfig(n_blocks=1))
    atoms = bulk("NaCl", "rocksalt", 5.64)
    structure = Structure(Lattice(atoms.cell[:]), ["Na", "Cl"], atoms.positions, coords_are_cartesian=True)
    a = model.predict(atoms)
    b = model.predict(structure)
    mixed = model.predict([atoms, structure, atoms])
    assert a.shape == (1,) and mixed.shape == (3,)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    np.testing.assert_allclose(mixed, [a[0]] * 3, rtol=1e-6)


def test_multi_target_shape_units_and_log10_transform():
    targets = (TargetSpec("e_form", "eV/atom"), TargetSpec("k_vrh", "GPa", transform="log10"))
    model = Crystalformer(ModelConfig(n_blocks=1, targets=targets))
    model.target_mean.copy_(torch.tensor([-1.0, 2.0]))
    model.target_std.copy_(torch.tensor([0.5, 0.25]))
    batch = model.make_batch([bulk("Cu"), bulk("Al")])
    with torch.no_grad():
        raw = model(batch)
    out = model.predict([bulk("Cu"), bulk("Al")])
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out[:, 0], (raw[:, 0] * 0.5 - 1.0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], 10 ** (raw[:, 1] * 0.25 + 2.0).numpy(), rtol=1e-5)


def test_double_predicts_in_float64():
    model = Crystalformer(ModelConfig(n_blocks=1)).double()
    out = model.predict(bulk("Si"))
    assert out.dtype == np.float64


def test_predict_restores_training_mode():
    model = Crystalformer(ModelConfig(n_blocks=1)).train()
    model.predict(bulk("Si"))
    assert model.training


def test_positions_gradient_is_finite_at_the_self_image():
    model = Crystalformer(ModelConfig(n_blocks=1)).double()
    batch = model.make_batch([bulk("Fe")])  # one atom: only self pairs
    pos = batch.positions.clone().requires_grad_(True)
    from dataclasses import replace

    out = model(replace(batch, positions=pos)).sum()
    (grad,) = torch.autograd.grad(out, pos)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "atoms, message",
    [
        (Atoms(cell=np.eye(3) * 3, pbc=True), "empty structure"),
        (Atoms("H", cell=np.eye(3) * 3, pbc=True, positions=[[np.nan, 0, 0]]), "NaN or inf"),
        (Atoms("H", cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True), "singular cell"),
        (Atoms("H", cell=[[3, 0, 0], [0, 0, 0], [0, 0, 3]], pbc=True), "singular cell"),
        (Atoms("H2", positions=[[0, 0, 0], [0.05, 0, 0]], cell=np.eye(3) * 3, pbc=True), "overlapping"),
        (Atoms("H", cell=np.eye(3) * 3, pbc=False), "no periodic axis"),
        (Atoms(numbers=[99], cell=np.eye(3) * 3, pbc=True), "atomic number 99"),
        (Atoms(numbers=[0], cell=np.eye(3) * 3, pbc=True), "atomic number 0"),
    ],
)
def test_bad_structures_are_refused_with_a_named_error(atoms, message):
    model = Crystalformer(ModelConfig(n_blocks=1))
    good = bulk("Si")
    with pytest.raises(StructureError, match=message) as info:
        model.predict([good, atoms])
    assert "structure 1" in str(info.value)
    assert isinstance(info.value, ValueError)


DISORDERED_CIF = """data_x
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Li1 Li 0 0 0 0.5
Na1 Na 0 0 0 0.5
Cl1 Cl 0.5 0.5 0.5 1.0
"""


def test_disordered_structures_are_refused_from_ase_and_pymatgen():
    import io

    from ase.io import read
    from pymatgen.core import Lattice, Structure

    model = Crystalformer(ModelConfig(n_blocks=1))
    from_cif = read(io.StringIO(DISORDERED_CIF), format="cif")  # ASE keeps one species per site
    assert len(from_cif) == 2
    with pytest.raises(StructureError, match="structure 1 .*partial occupancies"):
        model.predict([bulk("Si"), from_cif])
    alloy = Structure(Lattice.cubic(4.0), [{"Li": 0.5, "Na": 0.5}, "Cl"], [[0, 0, 0], [0.5] * 3])
    with pytest.raises(StructureError, match="partial occupancies"):
        model.predict(alloy)


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=100, n_heads=8)
    with pytest.raises(ValueError, match="cutoff"):
        ModelConfig(cutoff=5.0)
    with pytest.raises(ValueError, match="duplicate"):
        ModelConfig(targets=(TargetSpec("a"), TargetSpec("a")))
    with pytest.raises(ValueError, match="batch_size"):
        Crystalformer(ModelConfig(n_blocks=1)).predict(bulk("Si"), batch_size=0)
    with pytest.raises(TypeError, match="ase.Atoms or pymatgen"):
        Crystalformer(ModelConfig(n_blocks=1)).predict(["not a structure"])
