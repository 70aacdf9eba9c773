"""The calculator's potential: the default for energy/forces/stress, its reference energies, a
regressor's energy only on request (with a warning), and models running only when needed."""

import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError

from ase_crystalformer import inference
from ase_crystalformer.calculator import CrystalformerCalculator, NotAPotentialWarning
from ase_crystalformer.checkpoint import MODELS_ENV, save_checkpoint
from ase_crystalformer.config import ModelConfig, TargetSpec
from ase_crystalformer.errors import StructureError
from ase_crystalformer.forces import energy_forces_stress
from ase_crystalformer.geometry import collate, windows_for
from ase_crystalformer.model import Crystalformer
from ase_crystalformer.potential import DEFAULT_POTENTIAL, References, default_model_config

SMALL = dict(n_blocks=1, d_model=16, n_heads=2, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=7.0)
MU = {"mptrj": {11: -1.3, 17: -1.8}, "alexandria": {11: -1.0}}
POOLED = {11: -1.2, 17: -1.7, 14: -5.4}


def _potential() -> Crystalformer:
    torch.manual_seed(1)
    model = Crystalformer(default_model_config(**SMALL))
    model.metadata = {"kind": "potential", "name": "pes",
                      "reference_energies": References(MU, POOLED).to_dict()}
    return model


def _regressor(kind: str = "energy") -> Crystalformer:
    torch.manual_seed(2)
    config = ModelConfig(**SMALL, activation="silu", targets=(TargetSpec("e_form", "eV/atom", kind=kind),))
    model = Crystalformer(config)
    model.metadata = {"name": "e_form-model"}
    return model


def _counting(model: Crystalformer) -> list[int]:
    calls = [0]
    model.head.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_energy_is_the_network_plus_the_default_sources_references():
    model = _potential()
    atoms = bulk("NaCl", "rocksalt", 5.6).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=1)
    calc = CrystalformerCalculator(model, dtype="float64")
    atoms.calc = calc
    reference = model.double().eval()
    batch = collate(windows_for([atoms], model.config.cutoff), torch.float64)
    direct = energy_forces_stress(reference, batch)
    shift = 2 * (-1.3) + 2 * (-1.8)  # MPtrj's μ for Na and Cl
    assert atoms.get_potential_energy() == pytest.approx(float(direct["energy"][0].detach()) + shift, abs=1e-10)
    assert calc.get_property("energy_per_atom", atoms) == pytest.approx(atoms.get_potential_energy() / 4, abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), direct["forces"].detach().numpy(), atol=1e-12)


def test_elements_missing_from_the_default_source_take_the_pooled_reference():
    calc = CrystalformerCalculator(_potential(), dtype="float64")
    si = bulk("Si", "diamond", 5.43)
    no_refs = _potential()
    no_refs.metadata = {"kind": "potential"}
    plain = CrystalformerCalculator(no_refs, dtype="float64")
    assert calc.get_potential_energy(si) - plain.get_potential_energy(si) == pytest.approx(2 * -5.4, abs=1e-10)
    with pytest.raises(StructureError, match=r"no reference energy for \['Au'\]"):
        calc.get_potential_energy(bulk("Au", "fcc", 4.08))


def test_only_the_models_that_provide_a_property_run():
    potential, regressor = _potential(), _regressor(kind="intensive")
    calls_p, calls_r = _counting(potential), _counting(regressor)
    calc = CrystalformerCalculator([regressor, potential])
    atoms = bulk("NaCl", "rocksalt", 5.6)
    atoms.calc = calc
    atoms.get_forces()
    atoms.get_stress()
    assert (calls_p[0], calls_r[0]) == (1, 0)
    assert np.isfinite(atoms.calc.get_property("formation_energy_per_atom"))
    assert (calls_p[0], calls_r[0]) == (1, 1)
    atoms.rattle(0.01, seed=3)
    atoms.get_potential_energy()
    assert (calls_p[0], calls_r[0]) == (2, 1)


def test_a_regressors_energy_only_when_named_and_with_a_warning():
    atoms = bulk("NaCl", "rocksalt", 5.6)
    calc = CrystalformerCalculator(_regressor())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calc.get_property("formation_energy_per_atom", atoms)  # a property alone: no warning
    with pytest.warns(NotAPotentialWarning, match=r"e_form-model: energy, forces and stress come from a property "
                      r"regressor.*not those of a potential.*" + DEFAULT_POTENTIAL):
        calc.get_forces(atoms)
    both = CrystalformerCalculator([_regressor(), _potential()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both.get_forces(atoms)  # the potential gives the energy
    assert both.energy_target.model == 1


def test_no_argument_calculator_uses_the_shipped_potential(tmp_path, monkeypatch):
    save_checkpoint(_potential(), tmp_path / DEFAULT_POTENTIAL / "model.safetensors", _potential().metadata)
    save_checkpoint(_regressor(), tmp_path / "e_form-model" / "model.safetensors", {})
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    monkeypatch.setattr(inference, "list_models", lambda: ["e_form-model", DEFAULT_POTENTIAL])
    calc = CrystalformerCalculator(dtype="float64")
    assert [label for label, _ in calc.models] == ["e_form-model", DEFAULT_POTENTIAL]
    atoms = bulk("NaCl", "rocksalt", 5.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        energy = calc.get_potential_energy(atoms)
    alone = CrystalformerCalculator(tmp_path / DEFAULT_POTENTIAL, dtype="float64")
    assert energy == pytest.approx(alone.get_potential_energy(atoms), abs=1e-10)
    assert "formation_energy_per_atom" in calc.implemented_properties


def test_no_argument_calculator_without_a_potential_gives_no_energy(tmp_path, monkeypatch):
    save_checkpoint(_regressor(), tmp_path / "e_form-model" / "model.safetensors", {})
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    monkeypatch.setattr(inference, "list_models", lambda: ["e_form-model"])
    calc = CrystalformerCalculator()
    assert calc.energy_target is None
    with pytest.raises(PropertyNotImplementedError, match="need a model with an energy-type target"):
        calc.get_potential_energy(bulk("NaCl", "rocksalt", 5.6))


def test_phonons_and_relax_default_to_the_shipped_potential(tmp_path, monkeypatch):
    from ase_crystalformer.phonons import run_phonons
    from ase_crystalformer.relax import relax

    model = _potential()
    model.target_std.fill_(20.0)  # a landscape with some curvature
    save_checkpoint(model, tmp_path / DEFAULT_POTENTIAL / "model.safetensors", model.metadata)
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    si = bulk("Si", "diamond", 5.43)
    by_default = run_phonons(si, None, supercell=(1, 1, 1), mesh=(2, 2, 2), npoints=3)
    named = run_phonons(si, tmp_path / DEFAULT_POTENTIAL, supercell=(1, 1, 1), mesh=(2, 2, 2), npoints=3)
    np.testing.assert_array_equal(by_default.force_constants, named.force_constants)
    assert np.abs(named.force_constants).max() > 0
    si.rattle(0.02, seed=1)
    a = relax(si, None, steps=3)[0]
    b = relax(si, CrystalformerCalculator(tmp_path / DEFAULT_POTENTIAL), steps=3)[0]
    np.testing.assert_array_equal(a.atoms.positions, b.atoms.positions)
    assert a.energy == b.energy


def test_cli_predict_reports_the_potentials_energy_per_atom(tmp_path):
    from ase.io import write
    from click.testing import CliRunner

    from ase_crystalformer.cli import main

    model = _potential()
    save_checkpoint(model, tmp_path / "pes" / "model.safetensors", model.metadata)
    atoms = bulk("NaCl", "rocksalt", 5.6)
    write(tmp_path / "nacl.cif", atoms)
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "nacl.cif"), "--model", str(tmp_path / "pes"),
                                       "--format", "csv", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    value = float(result.output.strip().splitlines()[-1].split(",")[-1])
    expected = CrystalformerCalculator(tmp_path / "pes").get_potential_energy(atoms) / 2
    assert value == pytest.approx(expected, abs=1e-4)


def test_without_a_shipped_potential_energy_says_so(monkeypatch):
    """Until the potential ships, CrystalformerCalculator() names it as missing for energy."""
    monkeypatch.setattr(inference, "list_models", list)
    model = Crystalformer(ModelConfig(n_blocks=1, d_model=16, n_heads=2, d_ff=16, d_head_mlp=8)).eval()
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.calc = CrystalformerCalculator(model)
    with pytest.raises(PropertyNotImplementedError, match="'dft-pes' that CrystalformerCalculator.. uses by default is not shipped"):
        atoms.get_potential_energy()
