"""The training domain: recorded by training, checked by every prediction entry point."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from click.testing import CliRunner

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.checkpoint import load_model, save_checkpoint
from ase_crystalformer.cli import main
from ase_crystalformer.config import TrainConfig
from ase_crystalformer.data import load_dataset
from ase_crystalformer.domain import OutOfDomainWarning, domain_problems, training_domain
from ase_crystalformer.featurizer import CrystalformerFeaturizer
from ase_crystalformer.structures import describe
from ase_crystalformer.training import train

FIXTURE = Path(__file__).parent / "fixtures" / "mp_megnet_40.extxyz"
TINY = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16, cutoff=7.0,
                   targets=(TargetSpec("heat_all", "eV"),))
PEROVSKITE = {"elements": ["O", "Ti", "Sr", "Ba"], "n_atoms": [5, 5]}


def _perovskite(a: float = 3.9) -> Atoms:
    return Atoms("SrTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                 cell=np.eye(3) * a, pbc=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("perov") / "perov" / "model.safetensors"
    save_checkpoint(Crystalformer(TINY), path, {"domain": PEROVSKITE})
    return path


def test_training_domain_collects_elements_in_order_and_the_size_range():
    domain = training_domain([np.array([8, 8, 22, 38, 8]), np.array([14, 14])])
    assert domain == {"elements": ["O", "Si", "Ti", "Sr"], "n_atoms": [2, 5]}
    merged = training_domain([np.array([3])], base=domain)
    assert merged == {"elements": ["Li", "O", "Si", "Ti", "Sr"], "n_atoms": [1, 5]}
    with pytest.raises(ValueError, match="at least one"):
        training_domain([])


def test_problems_name_unseen_elements_and_a_foreign_cell_size():
    sto, nacl, big = _perovskite(), bulk("NaCl", "rocksalt", 5.64), _perovskite().repeat(2)
    structures = list(enumerate(a.numbers for a in (sto, nacl, big)))
    problems = domain_problems(PEROVSKITE, structures)
    assert sorted(problems) == [1, 2]
    assert problems[1] == "no Na, Cl in its training set; trained on 5-atom cells only, this one has 2"
    assert "has 40 (primitive=True or --primitive reduces a supercell)" in problems[2]
    assert domain_problems(None, structures) == {}
    # A model trained on many cell sizes accepts any size: the model is cell-invariant.
    assert domain_problems({"elements": ["O", "Ti", "Sr"], "n_atoms": [2, 60]}, structures[2:]) == {}


def test_describe_names_the_formula():
    assert describe(bulk("NaCl", "rocksalt", 5.64), 3) == "structure 3 (ClNa)"
    assert describe(Atoms()) == "structure (empty)"


def test_predict_warns_with_the_indices_and_still_returns_every_value(checkpoint):
    model = load_model(checkpoint)
    assert model.metadata["name"] == "perov"
    structures = [_perovskite(), bulk("Si"), _perovskite(4.0)]
    with pytest.warns(OutOfDomainWarning, match=r"perov: 1 of 3 structure\(s\).*structure 1 \(Si2\)") as caught:
        values = model.predict(structures)
    assert list(caught[0].message.problems) == [1]
    assert values.shape == (3,) and np.isfinite(values).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict([_perovskite()])  # inside: no warning
        model.predict([_perovskite().repeat(2)], primitive=True)  # reduced to 5 atoms first
    model.metadata.pop("domain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict([bulk("Si")])


def test_calculator_and_featurizer_warn_too(checkpoint):
    calc = CrystalformerCalculator(checkpoint, device="cpu")
    with pytest.warns(OutOfDomainWarning, match="structure 0 \\(Si2\\)"):
        calc.predict([bulk("Si"), _perovskite()])
    featurizer = CrystalformerFeaturizer(checkpoint, mode="predictions", device="cpu")
    with pytest.warns(OutOfDomainWarning, match="structure 1 \\(Cu\\)") as caught:
        rows = featurizer.featurize_many([_perovskite(), bulk("Cu")], pbar=False)
    assert list(caught[0].message.problems) == [1]
    assert np.isfinite(rows).all()


def test_cli_leaves_out_of_domain_cells_empty_unless_asked(checkpoint, tmp_path):
    from ase.io import write

    write(tmp_path / "frames.extxyz", [_perovskite(), bulk("Si")])
    args = ["predict", str(tmp_path / "frames.extxyz"), "--model", str(checkpoint), "--format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["heat_all (eV)"] is not None and rows[1]["heat_all (eV)"] is None
    assert f"{tmp_path / 'frames.extxyz'}@1 (Si2): no Si in its training set" in result.stderr
    assert "1 of 2 structure(s) lie outside its training domain, left empty; --extrapolate prints them" in result.stderr
    result = CliRunner().invoke(main, [*args, "--extrapolate"])
    rows = json.loads(result.stdout)
    with pytest.warns(OutOfDomainWarning):
        expected = load_model(checkpoint).predict([_perovskite(), bulk("Si")])
    np.testing.assert_allclose([r["heat_all (eV)"] for r in rows], expected, rtol=1e-6)


def test_training_records_the_domain_and_fine_tuning_merges_it(tmp_path):
    dataset = load_dataset(str(FIXTURE), ["e_form", "band_gap"])
    train_records = [dataset.records[i] for i in dataset.splits["train"]]
    config = TrainConfig(epochs=1, batch_size=8, swa_epochs=0)
    tiny = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16, cutoff=7.0)
    train(dataset, [TargetSpec("e_form", "eV/atom")], tmp_path / "a", config=config, model_config=tiny, progress=False)
    domain = load_model(tmp_path / "a" / "best.safetensors").metadata["domain"]
    assert domain == training_domain(r.atoms.numbers for r in train_records)
    base = load_model(tmp_path / "a" / "best.safetensors")
    base.metadata["domain"] = {"elements": ["Og"], "n_atoms": [500, 500]}
    train(dataset, [TargetSpec("band_gap", "eV")], tmp_path / "b", init_from=base, config=config, progress=False)
    tuned = load_model(tmp_path / "b" / "best.safetensors").metadata["domain"]
    assert tuned["elements"] == domain["elements"] + ["Og"]
    assert tuned["n_atoms"] == [domain["n_atoms"][0], 500]
