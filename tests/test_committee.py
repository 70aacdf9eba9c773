"""Committees: mean and std of the members, on disk, in the calculator, featurizer and CLI,
and their calibration report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ase.build import bulk
from click.testing import CliRunner
from scipy.stats import rankdata

from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.checkpoint import MODELS_ENV, list_models, load_model
from ase_crystalformer.cli import main
from ase_crystalformer.committee import Committee, calibration, fit_std_scale, read_committee, save_committee
from ase_crystalformer.config import ModelConfig, TargetSpec
from ase_crystalformer.errors import CheckpointError
from ase_crystalformer.featurizer import CrystalformerFeaturizer, pool_atoms
from ase_crystalformer.model import Crystalformer

FIXTURE = Path(__file__).parent / "fixtures" / "mp_megnet_40.extxyz"
TARGETS = (TargetSpec("e_form", "eV/atom", kind="energy"), TargetSpec("k_vrh", "GPa", transform="log10"))
CONFIG = ModelConfig(n_blocks=1, d_model=16, n_heads=4, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=7.0, targets=TARGETS)


def members(n: int = 5) -> list[Crystalformer]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = Crystalformer(CONFIG).eval()
        m.target_mean.copy_(torch.tensor([-1.0, 2.0]))
        m.target_std.copy_(torch.tensor([0.5, 0.3]))
        out.append(m)
    return out


@pytest.fixture(scope="module")
def committee() -> Committee:
    return Committee(members(), {"name": "tiny-committee"})


@pytest.fixture(scope="module")
def crystals():
    return [bulk("NaCl", "rocksalt", 5.64), bulk("Si", "diamond", 5.43), bulk("Cu", "fcc", 3.6, cubic=True)]


def member_space(committee, crystals) -> np.ndarray:
    """(K, n, T) each member's prediction in training space: log10 for k_vrh."""
    values = np.stack([m.predict(crystals) for m in committee.members])
    values[..., 1] = np.log10(values[..., 1])
    return values


def test_mean_and_std_are_the_members_mean_and_sample_std(committee, crystals):
    mean, std = committee.predict(crystals, return_std=True)
    values = member_space(committee, crystals)
    np.testing.assert_allclose(mean[:, 0], values[..., 0].mean(0), rtol=1e-5)  # arithmetic mean
    np.testing.assert_allclose(mean[:, 1], 10 ** values[..., 1].mean(0), rtol=1e-5)  # geometric mean
    np.testing.assert_allclose(std, values.std(0, ddof=1), rtol=1e-4)  # ddof=1, log10 units for k_vrh
    np.testing.assert_allclose(committee.predict(crystals), mean)  # without std: the same mean
    assert (std > 0).all()


def test_a_committee_needs_members_of_one_config():
    other = Crystalformer(ModelConfig(n_blocks=1, d_model=16, n_heads=4, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=8.0,
                                      targets=TARGETS))
    with pytest.raises(ValueError, match="member 1 has another architecture"):
        Committee([members(1)[0], other])
    with pytest.raises(ValueError, match="at least 2 members"):
        Committee(members(1))


def test_round_trip_through_a_shipped_committee_directory(committee, crystals, tmp_path, monkeypatch):
    save_committee(list(committee.members), tmp_path / "tiny-committee", {"note": "test"})
    header = json.loads((tmp_path / "tiny-committee" / "committee.json").read_text())
    assert header["members"] == [f"member-{k}.safetensors" for k in range(5)]
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    assert "tiny-committee" in list_models()
    from ase_crystalformer.checkpoint import energy_models

    assert "tiny-committee" in energy_models()  # its members have an energy target
    loaded = load_model("tiny-committee")
    assert isinstance(loaded, Committee) and loaded.metadata["note"] == "test"
    assert loaded.metadata["name"] == "tiny-committee"
    for a, b in zip(committee.predict(crystals, return_std=True), loaded.predict(crystals, return_std=True)):
        np.testing.assert_array_equal(a, b)


def test_a_committee_file_may_not_point_outside_its_folder(committee, tmp_path):
    folder = save_committee(list(committee.members)[:2], tmp_path / "c")
    header = json.loads((folder / "committee.json").read_text())
    header["members"][1] = "../elsewhere.safetensors"
    (folder / "committee.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="member names must be files in the committee's folder"):
        read_committee(folder)
    (folder / "committee.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a crystalformer-committee file"):
        read_committee(folder)


def test_calculator_gives_std_and_the_mean_forces(committee, crystals):
    calc = CrystalformerCalculator(committee, device="cpu")
    assert {"formation_energy_per_atom_std", "bulk_modulus_vrh_std"} <= set(calc.implemented_properties)
    assert calc.units["bulk_modulus_vrh_std"] == "log10(GPa)"
    atoms = crystals[2].copy()
    atoms.rattle(0.05, seed=1)
    atoms.calc = calc
    forces = atoms.get_forces()
    mean, std = committee.predict([atoms], return_std=True)
    assert atoms.calc.results["formation_energy_per_atom_std"] == pytest.approx(std[0, 0], rel=1e-5)
    assert atoms.calc.results["bulk_modulus_vrh"] == pytest.approx(mean[0, 1], rel=1e-5)
    member_forces = []
    for m in committee.members:
        copy = atoms.copy()
        copy.calc = CrystalformerCalculator(m, device="cpu")
        member_forces.append(copy.get_forces())
    np.testing.assert_allclose(forces, np.mean(member_forces, axis=0), atol=1e-6)
    assert atoms.get_potential_energy() == pytest.approx(mean[0, 0] * len(atoms), rel=1e-5)
    batch = calc.predict(crystals, properties=["bulk_modulus_vrh_std"], output="dict")
    np.testing.assert_allclose(batch["bulk_modulus_vrh_std"], committee.predict(crystals, return_std=True)[1][:, 1],
                               rtol=1e-5)


def test_featurizer_has_std_columns_for_a_committee(committee, crystals):
    feat = CrystalformerFeaturizer(committee, mode="predictions", device="cpu")
    assert feat.feature_labels() == ["crystalformer formation_energy_per_atom", "crystalformer formation_energy_per_atom_std",
                                     "crystalformer bulk_modulus_vrh", "crystalformer bulk_modulus_vrh_std"]
    rows = np.array(feat.featurize_many(crystals, pbar=False))
    mean, std = committee.predict(crystals, return_std=True)
    np.testing.assert_allclose(rows, np.stack([mean[:, 0], std[:, 0], mean[:, 1], std[:, 1]], axis=1), rtol=1e-5)


def test_pooling_keeps_max_min_and_std_over_atoms(crystals):
    model = members(1)[0]
    feat = CrystalformerFeaturizer(model, mode="embedding", device="cpu", pooling=("mean", "max", "min", "std"))
    labels = feat.feature_labels()
    assert len(labels) == 64 and labels[16] == "crystalformer emb max 0" and labels[63] == "crystalformer emb std 15"
    rows = np.array(feat.featurize_many(crystals, pbar=False))
    batch = model.make_batch(crystals)
    with torch.no_grad():
        atoms = model.atom_features(batch).numpy()
        emb = model.embed(batch).numpy()
    owner = batch.crystal.numpy()
    for b in range(len(crystals)):
        x = atoms[owner == b]
        expected = np.concatenate([x.mean(0), x.max(0), x.min(0), x.std(0)])
        np.testing.assert_allclose(rows[b], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows[:, :16], emb, rtol=1e-5, atol=1e-6)  # the default column set
    with pytest.raises(ValueError, match="pooling="):
        CrystalformerFeaturizer(model, pooling=("mean", "median"))
    one = pool_atoms(torch.ones(1, 3), torch.zeros(1, dtype=torch.long), 1, ["std"])[0]
    assert one.tolist() == [[0.0, 0.0, 0.0]]  # a single atom has no spread


def test_calibration_numbers():
    errors = np.array([0.1, -0.5, 0.2, 2.0, np.nan])
    std = np.array([0.2, 0.4, 0.1, 1.5, 1.0])
    c = calibration(errors, std)
    a, s = np.abs(errors[:4]), std[:4]
    ra, rs = rankdata(a), rankdata(s)
    assert c["spearman"] == pytest.approx(np.corrcoef(ra, rs)[0, 1])
    assert (c["n"], c["within_1sigma"], c["within_2sigma"]) == (4, 0.25, 1.0)


def test_cli_predict_and_evaluate_report_the_committee_spread(committee, tmp_path):
    folder = save_committee(list(committee.members), tmp_path / "tiny-committee")
    cif = tmp_path / "si.cif"
    bulk("Si", "diamond", 5.43).write(cif)
    result = CliRunner().invoke(main, ["predict", str(cif), "--model", str(folder), "--format", "csv", "--extrapolate"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    mean, std = committee.predict([bulk("Si", "diamond", 5.43)], return_std=True)
    assert table["bulk_modulus_vrh_std (log10(GPa))"].iloc[0] == pytest.approx(std[0, 1], rel=1e-4)
    assert table["formation_energy_per_atom_std (eV/atom)"].iloc[0] == pytest.approx(std[0, 0], rel=1e-4)
    single = [Crystalformer(ModelConfig(**{**CONFIG.__dict__, "targets": TARGETS[:1]})) for _ in range(3)]
    for k, m in enumerate(single):
        torch.manual_seed(k)
        m.reset_parameters()
    one = save_committee(single, tmp_path / "e_form-committee")
    result = CliRunner().invoke(main, ["evaluate", "--model", str(one), "--data", str(FIXTURE),
                                       "--out-dir", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["e_form"]
    rows = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    expected = calibration(rows["e_form_pred"] - rows["e_form_true"], rows["e_form_std"])
    assert metrics["calibration"] == pytest.approx(expected)
    assert f"within 1 std {expected['within_1sigma']:.3f}" in result.output


def test_cli_trains_a_committee_of_seeded_members(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(FIXTURE), "--target", "e_form", "--epochs", "1",
                                       "--swa-epochs", "0", "--batch-size", "8", "--blocks", "1", "--cutoff", "7",
                                       "--committee", "2", "--seed", "7", "--out", str(out), "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    committee = load_model(out / "committee")
    assert isinstance(committee, Committee) and len(committee.members) == 2
    seeds = [m.metadata["train_config"]["seed"] for m in committee.members]
    assert seeds == [7, 8]
    first = committee.members[0].state_dict()["embedding.weight"]
    assert not torch.equal(first, committee.members[1].state_dict()["embedding.weight"])
    report = json.loads((out / "report.json").read_text())
    assert "calibration" in report["metrics"]["committee_test"]["e_form"]
    # std_scale was fitted on the validation split: there, the median |error| / std is 0.6745.
    from ase_crystalformer.data import load_dataset
    from ase_crystalformer.evaluation import evaluate

    assert committee.std_scale[0] != 1.0
    _, rows, _ = evaluate(committee, load_dataset(str(FIXTURE), ["e_form"]), "val")
    ratio = np.abs(rows["e_form_pred"] - rows["e_form_true"]) / rows["e_form_std"]
    assert np.median(ratio) == pytest.approx(0.6745, rel=1e-3)


def test_std_scale_scales_the_std_round_trips_and_is_checked(committee, crystals, tmp_path):
    mean, std = committee.predict(crystals, return_std=True)
    folder = save_committee(list(committee.members), tmp_path / "scaled", std_scale=[2.0, 0.5])
    scaled = read_committee(folder)
    assert scaled.std_scale == [2.0, 0.5]
    mean2, std2 = scaled.predict(crystals, return_std=True)
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_allclose(std2, std * [2.0, 0.5], rtol=1e-6)
    for bad in ([1.0], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="std_scale must hold one positive finite factor per target"):
            Committee(list(committee.members), std_scale=bad)
    header = json.loads((folder / "committee.json").read_text())
    header["std_scale"] = [1.0, -1.0]
    (folder / "committee.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="std_scale"):
        read_committee(folder)


def test_fit_std_scale_matches_a_gaussian_median():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.1, 1.0, 20000)
    errors = rng.normal(0.0, 3.0 * std)  # the spread is 3× too small
    assert fit_std_scale(errors, std) == pytest.approx(3.0, rel=0.03)
    assert fit_std_scale(np.array([np.nan]), np.array([0.0])) == 1.0


def test_cli_featurize_pooling(tmp_path):
    model = members(1)[0]
    from ase_crystalformer.checkpoint import save_checkpoint

    path = save_checkpoint(model, tmp_path / "m.safetensors")
    cif = tmp_path / "nacl.cif"
    bulk("NaCl", "rocksalt", 5.64).write(cif)
    out = tmp_path / "f.csv"
    result = CliRunner().invoke(main, ["featurize", str(cif), "--model", str(path), "--pooling", "mean,max",
                                       "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert "crystalformer emb 15" in table and "crystalformer emb max 15" in table and len(table.columns) == 33
    bad = CliRunner().invoke(main, ["featurize", str(cif), "--model", str(path), "--pooling", "mean,mode",
                                    "--out", str(out), "--device", "cpu"])
    assert bad.exit_code != 0 and "pooling=" in bad.output
