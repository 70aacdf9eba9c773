"""The matminer featurizer: values, labels, and matminer's error semantics with batching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from ase import Atoms
from ase.build import bulk

pytest.importorskip("matminer")
from matminer.featurizers.base import BaseFeaturizer
from pymatgen.io.ase import AseAtomsAdaptor
from sklearn.base import clone

from ase_crystalformer import (
    Crystalformer,
    ModelConfig,
    StructureError,
    TargetSpec,
    inference,
)
from ase_crystalformer.featurizer import CrystalformerFeaturizer


def tiny_model() -> Crystalformer:
    torch.manual_seed(0)
    config = ModelConfig(
        n_blocks=1, d_model=16, n_heads=4, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=7.0,
        targets=(TargetSpec("e_form", "eV/atom"), TargetSpec("bandgap", "eV")),
    )
    return Crystalformer(config).eval()


@pytest.fixture(scope="module")
def model() -> Crystalformer:
    return tiny_model()


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """Three good structures (pymatgen and ASE) and one with overlapping atoms in row 2."""
    nacl = AseAtomsAdaptor.get_structure(bulk("NaCl", "rocksalt", 5.64))
    si = bulk("Si", "diamond", 5.43)
    broken = Atoms("Na2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=np.eye(3) * 4, pbc=True)
    mgo = AseAtomsAdaptor.get_structure(bulk("MgO", "rocksalt", 4.21))
    return pd.DataFrame({"structure": [nacl, si, broken, mgo], "y": [1.0, 2.0, 3.0, 4.0]})


def test_features_are_the_model_embedding_and_predictions(model, frame) -> None:
    feat = CrystalformerFeaturizer(model, mode="both", device="cpu")
    good = [frame.structure[i] for i in (0, 1, 3)]
    with torch.no_grad():
        emb = model.embed(model.make_batch(good)).numpy()
    pred = model.predict(good)
    for k, s in enumerate(good):
        row = np.array(feat.featurize(s))
        np.testing.assert_allclose(row[:16], emb[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row[16:], pred[k], rtol=1e-5, atol=1e-6)
    labels = feat.feature_labels()
    assert labels[0] == "crystalformer emb 0" and len(labels) == 18
    assert labels[16:] == ["crystalformer formation_energy_per_atom", "crystalformer band_gap"]
    assert len(CrystalformerFeaturizer(model, mode="predictions").feature_labels()) == 2


def test_batched_equals_matminers_one_by_one_path(model, frame) -> None:
    feat = CrystalformerFeaturizer(model, device="cpu", batch_size=2)
    ours = feat.featurize_many(frame.structure, ignore_errors=True, return_errors=True, pbar=False)
    reference = BaseFeaturizer.featurize_many(
        feat, frame.structure, ignore_errors=True, return_errors=True, pbar=False
    )
    assert len(ours) == len(reference) == 4
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(np.array(a[:-1], float), np.array(b[:-1], float), rtol=1e-5, atol=1e-6)
        if isinstance(b[-1], str):
            assert isinstance(a[-1], str) and "overlapping" in a[-1] and "StructureError" in a[-1]
        else:
            assert np.isnan(a[-1])


def test_featurize_dataframe_error_semantics(model, frame) -> None:
    feat = CrystalformerFeaturizer(model, device="cpu")
    with pytest.raises(StructureError, match="overlapping") as info:
        feat.featurize_dataframe(frame, "structure", pbar=False)
    assert "TO SKIP THESE ERRORS" in str(info.value)

    out = feat.featurize_dataframe(frame, "structure", ignore_errors=True, pbar=False)
    emb = out[feat.feature_labels()].to_numpy(float)
    assert np.isnan(emb[2]).all() and np.isfinite(emb[[0, 1, 3]]).all()
    assert list(out.columns[:2]) == ["structure", "y"]

    out = feat.featurize_dataframe(frame, "structure", ignore_errors=True, return_errors=True, pbar=False)
    errors = out["CrystalformerFeaturizer Exceptions"]
    assert "overlapping" in errors[2] and errors[[0, 1, 3]].isna().all()

    with pytest.raises(ValueError, match="ignore_errors"):
        feat.featurize_dataframe(frame, "structure", return_errors=True, pbar=False)
    assert feat.featurize_many([], pbar=False) == []


def test_single_structure_errors_are_raised_unchanged(model) -> None:
    feat = CrystalformerFeaturizer(model, device="cpu")
    molecule = Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])
    assert not feat.precheck(molecule) and feat.precheck(bulk("Cu"))
    with pytest.raises(StructureError, match="no periodic axis") as info:
        feat.featurize(molecule)
    assert "TO SKIP" not in str(info.value)
    with pytest.raises(TypeError, match="expected ase.Atoms"):
        feat.featurize("not a structure")


def test_matminer_and_sklearn_contract(model, monkeypatch) -> None:
    feat = CrystalformerFeaturizer(model, mode="embedding", device="cpu", batch_size=8)
    assert feat.get_params() == {"model": model, "mode": "embedding", "device": "cpu", "batch_size": 8}
    assert clone(feat).batch_size == 8
    feat.set_n_jobs(4)
    assert feat.n_jobs == 1
    (bibtex,) = feat.citations()
    assert "Taniai" in bibtex and "Kanta Ono" in bibtex and "ICLR 2024" in bibtex
    assert feat.implementors()
    with pytest.raises(ValueError, match="mode"):
        CrystalformerFeaturizer(model, mode="logits")
    monkeypatch.setattr(inference, "list_models", list)
    with pytest.raises(ValueError, match="no shipped model"):
        CrystalformerFeaturizer().feature_labels()


def test_cli_featurize_table(model, frame, tmp_path) -> None:
    from click.testing import CliRunner
    from pymatgen.io.cif import CifWriter

    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.cli import main

    save_checkpoint(model, tmp_path / "tiny" / "model.safetensors")
    cifs = [str(CifWriter(frame.structure[i])) for i in (0, 3)]
    pd.DataFrame({"cif": [cifs[0], "not a structure", cifs[1]], "y": [1, 2, 3]}).to_csv(tmp_path / "in.csv", index=False)
    args = ["featurize", str(tmp_path / "in.csv"), "--column", "cif", "--model", str(tmp_path / "tiny"), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out.csv")])
    assert result.exit_code != 0 and "row 1" in result.output

    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out.json"), "--ignore-errors", "--mode", "both"])
    assert result.exit_code == 0, result.output
    out = pd.read_json(tmp_path / "out.json")
    assert list(out.columns[:2]) == ["y", "crystalformer emb 0"] and "cif" not in out.columns
    assert np.isnan(out["crystalformer band_gap"][1]) and np.isfinite(out["crystalformer band_gap"][[0, 2]]).all()
    assert out["crystalformer_error"][1].startswith("cannot read the structure")
    with torch.no_grad():
        expected = model.embed(model.make_batch([frame.structure[3]]))[0, 0].item()
    assert out["crystalformer emb 0"][2] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_cli_featurize_parquet_round_trip(model, frame, tmp_path) -> None:
    pytest.importorskip("pyarrow")
    from click.testing import CliRunner
    from pymatgen.io.cif import CifWriter

    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.cli import main

    save_checkpoint(model, tmp_path / "tiny" / "model.safetensors")
    cifs = [str(CifWriter(frame.structure[i])) for i in (0, 3)]
    pd.DataFrame({"cif": cifs, "y": [1.0, 2.0]}).to_parquet(tmp_path / "in.parquet", index=False)
    args = ["featurize", str(tmp_path / "in.parquet"), "--column", "cif", "--model", str(tmp_path / "tiny"),
            "--device", "cpu", "--out", str(tmp_path / "out.parquet")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out["y"]) == [1.0, 2.0]
    with torch.no_grad():
        expected = model.embed(model.make_batch([frame.structure[3]]))[0, 0].item()
    assert out["crystalformer emb 0"][1] == pytest.approx(expected, rel=1e-5, abs=1e-6)
