"""Checkpoint format: round trip, strictness, safety, and model lookup by name."""

import json

import numpy as np
import pytest
import torch
from ase.build import bulk
from safetensors.torch import save_file

from ase_crystalformer import CheckpointError, Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.checkpoint import (
    MODELS_ENV,
    list_models,
    load_model,
    read_checkpoint,
    save_checkpoint,
)

CONFIG = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32,
                     targets=(TargetSpec("band_gap", "eV"),))


def _trained_like() -> Crystalformer:
    model = Crystalformer(CONFIG)
    model.train()
    model(model.make_batch([bulk("Si"), bulk("NaCl", "rocksalt", 5.6)]))  # sets σ statistics
    model.target_mean.fill_(1.5)
    model.target_std.fill_(0.7)
    return model.eval()


def test_round_trip_keeps_weights_buffers_config_and_metadata(tmp_path):
    model = _trained_like()
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"data": "unit test", "mae": 0.1})
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.metadata == {"data": "unit test", "mae": 0.1, "name": "m"}  # load_model adds the name
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    structures = [bulk("Cu"), bulk("Si")]
    np.testing.assert_array_equal(loaded.predict(structures), model.predict(structures))


def test_load_by_name_and_list_models(tmp_path, monkeypatch):
    save_checkpoint(_trained_like(), tmp_path / "my-model" / "model.safetensors")
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    assert "my-model" in list_models()
    assert load_model("my-model").config == CONFIG
    with pytest.raises(CheckpointError, match="no model named or at 'nope'"):
        load_model("nope")


def test_a_run_folder_without_model_file_names_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(_trained_like(), run / "best.safetensors")
    save_checkpoint(_trained_like(), run / "swa.safetensors")
    with pytest.raises(CheckpointError, match=r"folder without model.safetensors.*\['best.safetensors', 'swa.safetensors'\]"):
        load_model(run)
    assert load_model(run / "swa.safetensors").config == CONFIG


def test_device_argument(tmp_path):
    path = save_checkpoint(_trained_like(), tmp_path / "m.safetensors")
    assert load_model(path, device="cpu").device.type == "cpu"


def test_corrupted_file_names_file_and_problem(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="broken.safetensors.*not a readable"):
        load_model(path)
    good = save_checkpoint(_trained_like(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_model(truncated)


def _rewrite(path, out, header_change=None, tensor_change=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    if header_change:
        header_change(header)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(out), metadata=header)
    return out


def test_incompatible_files_are_refused(tmp_path):
    good = save_checkpoint(_trained_like(), tmp_path / "good.safetensors")
    newer = _rewrite(good, tmp_path / "v99.safetensors", lambda h: h.update(format_version="99"))
    with pytest.raises(CheckpointError, match="v99.safetensors: checkpoint format version '99'"):
        load_model(newer)
    missing = _rewrite(good, tmp_path / "missing.safetensors", tensor_change=lambda t: t.pop("head.2.bias"))
    with pytest.raises(CheckpointError, match="missing.*head.2.bias"):
        load_model(missing)
    shaped = _rewrite(good, tmp_path / "shape.safetensors",
                      tensor_change=lambda t: t.update({"head.2.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="head.2.bias.*shape"):
        load_model(shaped)
    bad_config = _rewrite(good, tmp_path / "config.safetensors",
                          lambda h: h.update(config=json.dumps({"n_blocks": 1, "colour": "red"})))
    with pytest.raises(CheckpointError, match="config.safetensors: invalid model config.*colour"):
        load_model(bad_config)


def test_loading_never_unpickles(tmp_path):
    """A pickle disguised as a checkpoint is refused as unreadable, not executed."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="not a readable"):
        read_checkpoint(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_trained_like(), path)
    before = path.read_bytes()
    import ase_crystalformer.checkpoint as ckpt

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(_trained_like(), path)
    assert path.read_bytes() == before


def test_cli_models_lists_targets_units_and_test_mae(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ase_crystalformer.cli import main

    save_checkpoint(_trained_like(), tmp_path / "gap-model" / "model.safetensors", {"test_mae": {"band_gap": 0.25}})
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    assert result.output.splitlines()[0].split() == ["model", "property", "unit", "trained", "on", "test", "MAE"]
    line = next(l for l in result.output.splitlines() if l.startswith("gap-model"))
    assert line.split() == ["gap-model", "band_gap", "eV", "band_gap", "0.25", "eV"]
