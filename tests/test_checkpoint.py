"""Checkpoint format: round trip, strictness, safety, and model lookup by name."""

import json
import struct
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from safetensors import safe_open
from safetensors.torch import save_file

from ase_crystalformer import CheckpointError, Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.checkpoint import (
    COMMITTEE_FILE,
    DIGEST_KEY,
    MODELS_ENV,
    expected_layout,
    list_models,
    load_model,
    model_path,
    read_checkpoint,
    save_checkpoint,
)
from ase_crystalformer.config import DOMAINS

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
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
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


# ------------------------------------------------------------------ integrity of the tensors
@pytest.mark.parametrize("config", [
    CONFIG,
    ModelConfig(n_blocks=2, d_model=24, n_heads=3, d_ff=40, d_head_mlp=16, n_rbf=0,
                targets=(TargetSpec("a"), TargetSpec("b", kind="energy"))),
    ModelConfig(),
    *(ModelConfig(n_blocks=2, d_model=32, n_heads=4, d_ff=48, domain=domain) for domain in DOMAINS),
])
def test_expected_layout_is_the_models_state_dict(config):
    """The layout checked before building must be exactly what the model builds."""
    state = Crystalformer(config).state_dict()
    assert expected_layout(config) == {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


def test_corrupted_tensor_bytes_are_refused(tmp_path):
    good = save_checkpoint(_trained_like(), tmp_path / "good.safetensors")
    data = bytearray(good.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + size])["embedding.weight"]["data_offsets"]
    for offset in range(8 + size + start, 8 + size + end, 4 * 97):
        data[offset] ^= 0x01  # the lowest mantissa bit of a float32: still a finite number
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(bytes(data))
    with safe_open(str(corrupted), framework="pt") as f:
        assert torch.isfinite(f.get_tensor("embedding.weight")).all()
    with pytest.raises(CheckpointError, match="corrupted.safetensors: the tensors do not match the header's integrity digest"):
        load_model(corrupted)


@pytest.mark.parametrize("key, tensor, message", [
    ("embedding.weight", torch.zeros(98, 32, dtype=torch.int8), "'embedding.weight' has dtype int8, the model needs float32"),
    ("head.2.bias", torch.zeros(1, dtype=torch.float16), "'head.2.bias' has dtype float16, the model needs float32"),
    ("head.2.bias", torch.zeros(1, dtype=torch.float64), "'head.2.bias' has dtype float64, the model needs float32"),
    ("blocks.0.attention.sigma_ready", torch.ones((), dtype=torch.float32), "'blocks.0.attention.sigma_ready' has dtype float32, the model needs bool"),
])
def test_tensors_of_the_wrong_dtype_are_refused(tmp_path, key, tensor, message):
    good = save_checkpoint(_trained_like(), tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "dtype.safetensors", tensor_change=lambda t: t.update({key: tensor}))
    with pytest.raises(CheckpointError, match=f"dtype.safetensors: tensor {message}"):
        load_model(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, value):
    model = _trained_like()
    with torch.no_grad():
        model.blocks[0].ffn[0].weight[3, 5] = value
    path = save_checkpoint(model, tmp_path / "nan.safetensors")  # a valid digest of bad weights
    with pytest.raises(CheckpointError, match="nan.safetensors: tensor 'blocks.0.ffn.0.weight' holds NaN or infinite"):
        load_model(path)


def test_a_checkpoint_without_digest_loads_with_a_warning(tmp_path):
    model = _trained_like()
    good = save_checkpoint(model, tmp_path / "good.safetensors", {"mae": 0.1})
    old = _rewrite(good, tmp_path / "old.safetensors", lambda h: h.pop(DIGEST_KEY))
    with pytest.warns(UserWarning, match="old.safetensors: no integrity digest .*re-save it with save_checkpoint"):
        loaded = load_model(old)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(save_checkpoint(loaded, old, loaded.metadata)).metadata["mae"] == 0.1  # re-saved: stamped


def test_shipped_models_carry_a_valid_digest():
    names = list_models()
    assert len(names) >= 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing digest would warn
        for name in names:
            path = model_path(name)
            files = ([path.parent / m for m in json.loads(path.read_text())["members"]]
                     if path.name == COMMITTEE_FILE else [path])  # a committee: each member
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    assert len(f.metadata()[DIGEST_KEY]) == 64, file
                read_checkpoint(file)


def test_header_digest_covers_the_config(tmp_path):
    good = save_checkpoint(_trained_like(), tmp_path / "good.safetensors")
    edited = _rewrite(good, tmp_path / "edited.safetensors",
                      lambda h: h.update(config=json.dumps({**json.loads(h["config"]), "cutoff": 12.0})))
    with pytest.raises(CheckpointError, match="edited.safetensors: the tensors do not match the header's integrity digest"):
        load_model(edited)


# ------------------------------------------------------- hostile headers, refused before building
def _header_only(tmp_path, config=None, metadata="{}", **changes):
    """A tiny file whose header claims ``CONFIG`` with ``changes``: no real weights at all."""
    path = tmp_path / "hostile.safetensors"
    if config is None:
        config = json.dumps({**CONFIG.to_dict(), **changes})
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format_version": "1", "config": config, "metadata": metadata})
    return path


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("changes, message", [
    ({"d_model": 8192}, r"d_model=8192 is outside the supported range \[1, 4096\]"),
    ({"n_blocks": 100_000}, r"n_blocks=100000 is outside the supported range \[1, 64\]"),
    ({"cutoff": 1e4}, "cutoff=10000.0 Å is above the supported maximum of 20.0 Å"),
    ({"n_heads": 0}, r"n_heads=0 is outside the supported range"),
    ({"n_heads": 5}, "d_model=32 is not divisible by n_heads=5"),
    ({"n_rbf": -1}, "n_rbf=-1 is outside"),
    ({"d_ff": "64"}, "d_ff must be an integer, got '64'"),
    ({"n_blocks": True}, "n_blocks must be an integer, got True"),
    ({"d_model": 32.0}, "d_model must be an integer, got 32.0"),
    ({"cutoff": float("nan")}, "cutoff must be a finite number, got nan"),
    ({"r0": 10**400}, "r0 must be a finite number"),
    ({"r0": -1.4}, "r0 must be positive, got -1.4"),
    ({"rbf_max": 0}, "rbf_max must be positive"),
    ({"rho_lower_bound": 1.5}, r"rho_lower_bound must lie in \(0, 1\)"),
    ({"activation": ["relu"]}, "unknown activation"),
    ({"activation_sharpness": 0.0}, r"activation_sharpness must lie in \(0, 1e4\], got 0.0"),
    ({"activation_sharpness": float("inf")}, "activation_sharpness must be a finite number"),
    ({"targets": []}, "a model needs 1 to 64 targets, got 0"),
    ({"targets": [{"name": f"t{i}"} for i in range(65)]}, "a model needs 1 to 64 targets, got 65"),
    ({"targets": "energy"}, "targets must be a list of objects"),
    ({"targets": [{"name": "e", "colour": "red"}]}, "targets must be a list of objects"),
    ({"targets": [{"name": 5}]}, "a target needs a non-empty name, got 5"),
    ({"targets": [{"name": "e", "unit": ["eV"]}]}, "unit must be a string"),
])
def test_hostile_config_values_are_refused_before_building(tmp_path, changes, message):
    path = _header_only(tmp_path, **changes)
    assert path.stat().st_size < 8192
    with pytest.raises(CheckpointError, match=f"hostile.safetensors: invalid model config in checkpoint header .*{message}"):
        read_checkpoint(path)


@pytest.mark.parametrize("config, metadata, message", [
    ("[1, 2]", "{}", "a model config is a JSON object, got list"),
    ("{", "{}", "'config' is not valid JSON"),
    (DEEP, "{}", "'config' is nested too deeply"),
    (None, DEEP, "'metadata' is nested too deeply"),
    (None, "[]", "checkpoint metadata is not a JSON object"),
], ids=["list", "truncated", "deep-config", "deep-metadata", "metadata-list"])
def test_malformed_header_json_is_refused(tmp_path, config, metadata, message):
    path = _header_only(tmp_path, config=config, metadata=metadata)
    with pytest.raises(CheckpointError, match=f"hostile.safetensors: .*{message}"):
        read_checkpoint(path)


def test_a_huge_valid_config_with_few_tensors_is_refused_without_allocating(tmp_path):
    """A legal but 13-billion-parameter config: refused on the tensor list, not built."""
    big = dict(n_blocks=64, d_model=4096, n_heads=8, d_ff=16384, d_head_mlp=4096, n_rbf=1024)
    with pytest.raises(CheckpointError, match="hostile.safetensors: weights do not match the model config"):
        read_checkpoint(_header_only(tmp_path, **big))
    model = _trained_like()  # the right names but the shapes of a smaller model
    path = tmp_path / "shapes.safetensors"
    header = {"format_version": "1", "config": json.dumps(replace(CONFIG, d_model=4096, n_heads=8).to_dict())}
    save_file(model.state_dict(), str(path), metadata=header)
    with pytest.raises(CheckpointError, match=r"shapes.safetensors: tensor '.*' has shape .*, the config needs"):
        read_checkpoint(path)


def test_an_oversized_header_is_refused(tmp_path):
    path = tmp_path / "big-header.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format_version": "1", "pad": "x" * (1 << 20)})
    with pytest.raises(CheckpointError, match="big-header.safetensors: not a readable .*over the 1048576-byte limit"):
        read_checkpoint(path)


def test_model_config_names_the_bad_field():
    """The CLI and training get the same checks as a checkpoint header, as ValueError."""
    with pytest.raises(ValueError, match="n_heads=0 is outside"):
        ModelConfig(n_heads=0)
    with pytest.raises(ValueError, match="cutoff=50.0 Å is above"):
        ModelConfig(cutoff=50.0)


def test_cli_train_reports_a_bad_config_as_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from ase_crystalformer.cli import main

    args = ["train", "--cutoff", "1e4", "--data", str(tmp_path / "none.csv"), "--target", "y", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "cutoff=10000.0 Å is above the supported maximum of 20.0 Å" in result.output
    assert not (tmp_path / "run").exists()


def test_every_shipped_model_lists_the_test_mae_of_its_card():
    """Single checkpoints carry ``test_mae`` in their header, committees in committee.json."""
    from click.testing import CliRunner

    from ase_crystalformer.checkpoint import list_models
    from ase_crystalformer.cli import main

    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    rows: dict[str, list[str]] = {}
    for line in result.output.splitlines()[1:]:  # a multi-task model: its first target's row
        if line.strip():
            rows.setdefault(line.split()[0], line.split())
    for name in list_models():
        mae = float(rows[name][4])
        card = (Path(__file__).parent.parent / "checkpoints" / name / "README.md").read_text()
        assert "| test | " in card and f" {rows[name][4]} " in card, name
        assert mae > 0
