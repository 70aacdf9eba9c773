"""A shipped backbone: loaded by name and as the featurizer's default embedding, never as a
property model when none is named (its heads would shadow the property models' names)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from click.testing import CliRunner

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec, inference
from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.checkpoint import BACKBONE_ROLE, MODELS_ENV, is_backbone, list_models, save_checkpoint
from ase_crystalformer.cli import main
from ase_crystalformer.errors import CheckpointError


def tiny(seed: int, *targets: TargetSpec) -> Crystalformer:
    torch.manual_seed(seed)
    config = ModelConfig(n_blocks=1, d_model=16, n_heads=4, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=7.0,
                         targets=targets)
    return Crystalformer(config).eval()


@pytest.fixture()
def shipped(tmp_path, monkeypatch) -> dict[str, Crystalformer]:
    """A folder of named models: a backbone with two tasks and a band-gap model."""
    models = {
        "a-backbone": tiny(0, TargetSpec("band_gap@megnet", "eV"), TargetSpec("heat_all", "eV")),
        "gap-model": tiny(1, TargetSpec("band_gap", "eV")),
    }
    save_checkpoint(models["a-backbone"], tmp_path / "a-backbone" / "model.safetensors", {"role": BACKBONE_ROLE})
    save_checkpoint(models["gap-model"], tmp_path / "gap-model" / "model.safetensors", {})
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    names = ["a-backbone", "gap-model"]
    monkeypatch.setattr(inference, "list_models", lambda: names)
    return models


def test_role_is_read_from_the_header(shipped) -> None:
    assert is_backbone("a-backbone") and not is_backbone("gap-model")
    assert not is_backbone("no-such-model")
    assert inference.property_models() == ["gap-model"]
    assert inference.embedding_model() == "a-backbone"


def test_calculator_and_predict_leave_the_backbone_out(shipped) -> None:
    calc = CrystalformerCalculator(device="cpu")
    assert [label for label, _ in calc.models] == ["gap-model"]
    assert "heat_all" not in calc.implemented_properties
    assert [label for label, _ in inference.load_models(None, torch.device("cpu"), torch.float32)] == ["gap-model"]
    named = CrystalformerCalculator("a-backbone", device="cpu")  # by name it is a model like any other
    assert {"band_gap_megnet", "heat_all"} <= set(named.implemented_properties)


def test_featurizer_default_is_the_backbone_embedding(shipped) -> None:
    pytest.importorskip("matminer")
    from ase_crystalformer.featurizer import CrystalformerFeaturizer

    si = bulk("Si", "diamond", 5.43)
    backbone = shipped["a-backbone"]
    with torch.no_grad():
        expected = backbone.embed(backbone.make_batch([si])).numpy()[0]
    row = CrystalformerFeaturizer(device="cpu", pooling="mean").featurize(si)
    np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-6)
    other = shipped["gap-model"]
    with torch.no_grad():
        assert not np.allclose(other.embed(other.make_batch([si])).numpy()[0], expected, atol=1e-3)


def test_default_featurizer_is_for_embeddings_only(shipped, tmp_path) -> None:
    pytest.importorskip("matminer")
    from ase_crystalformer.featurizer import CrystalformerFeaturizer

    with pytest.raises(ValueError, match=r"mode='predictions' needs a model.*\['gap-model'\]"):
        CrystalformerFeaturizer(mode="predictions", device="cpu").featurize(bulk("Si", "diamond", 5.43))
    featurizer = CrystalformerFeaturizer(device="cpu", pooling="mean")
    featurizer.feature_labels()  # loads the backbone
    featurizer.set_params(mode="both")  # a loaded default does not slip through a mode change
    with pytest.raises(ValueError, match="mode='both' needs a model"):
        featurizer.feature_labels()
    (tmp_path / "si.cif").write_text("")  # never read: the option is refused first
    result = CliRunner().invoke(main, ["featurize", str(tmp_path / "si.cif"), "--out", str(tmp_path / "f.csv"),
                                       "--mode", "predictions"])
    assert result.exit_code != 0 and "--mode predictions needs --model" in result.output


def test_an_unreadable_model_is_never_silently_replaced(shipped, tmp_path) -> None:
    """A corrupt backbone must not make the featurizer fall back to another model's
    embedding under the same column names."""
    (tmp_path / "a-backbone" / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    assert not is_backbone("a-backbone")
    with pytest.raises(CheckpointError, match="a-backbone.*header cannot be read"):
        inference.embedding_model()


def test_only_backbones_shipped(shipped, monkeypatch) -> None:
    monkeypatch.setattr(inference, "list_models", lambda: ["a-backbone"])
    with pytest.raises(CheckpointError, match=r"only the backbone\(s\) \['a-backbone'\], which serve when named"):
        CrystalformerCalculator(device="cpu")


def test_models_command_marks_the_backbone(shipped, monkeypatch) -> None:
    import ase_crystalformer.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "list_models", lambda: ["a-backbone", "gap-model"])
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    assert "a-backbone: a backbone, used only when named" in result.output
    assert "gap-model:" not in result.output


def test_the_shipped_backbone_is_the_default_embedding() -> None:
    if "multitask-backbone" not in list_models():
        pytest.skip("no shipped backbone in this installation")
    assert is_backbone("multitask-backbone")
    assert inference.embedding_model() == "multitask-backbone"
    assert "multitask-backbone" not in inference.property_models()
