"""One checkpoint format: a safetensors file holding the weights and JSON metadata.

safetensors stores plain tensors and a string→string header, so opening a checkpoint never
runs code from it (unlike ``torch.load`` of a pickle). The header holds:

* ``format_version``: bumped on any incompatible change; other versions are refused;
* ``config``: ``ModelConfig.to_dict()``, which fixes the architecture and the targets;
* ``metadata``: free JSON (data provenance, split, training ids hash, metrics, command);
* ``sha256``: ``tensors_digest`` of the config and the tensors, written by ``save_checkpoint``.

``read_checkpoint`` trusts nothing in the file. Before it builds a model it bounds the
header (size, JSON nesting), validates the config (``ModelConfig`` types and ranges) and
compares every tensor's name, shape and dtype with what that config implies, so a few
kilobytes of header can never make it allocate gigabytes. It then checks the digest and
that every value is finite. Each failure is a ``CheckpointError`` naming the file.

A file without ``sha256`` (written before the digest existed) still loads, with a
``UserWarning``: its dtypes, shapes and values pass the same checks, only byte-level
corruption that leaves finite numbers cannot be detected. Re-save it to add the digest
(``save_checkpoint(model, path, model.metadata)``). Every shipped model carries one.

Shipped models live in ``checkpoints/<name>/model.safetensors`` beside a ``README.md``
model card, and load by name offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import MAX_ATOMIC_NUMBER, ModelConfig
from .errors import CheckpointError
from .model import Crystalformer
from .reciprocal import layer_kind, real_space_heads

FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
#: A shipped model directory holding this file is a committee (``committee.py``).
COMMITTEE_FILE = "committee.json"
#: Extra directories searched for named models, separated by os.pathsep.
MODELS_ENV = "CRYSTALFORMER_MODELS"
#: Largest header (tensor index and metadata JSON) read; shipped ones are about 10 KB.
MAX_HEADER_BYTES = 1 << 20
DIGEST_KEY = "sha256"

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def tensors_digest(config_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the config JSON and of each tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256(config_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def expected_layout(config: ModelConfig) -> Layout:
    """Name → (dtype, shape) of every tensor in the state dict of ``Crystalformer(config)``.

    Computed from the config alone, so a checkpoint is checked before a model of the size
    its header claims is allocated. (Building on the ``meta`` device would need no copy of
    the layout, but its initialisers import torch._dynamo: seconds per process.)
    ``tests/test_checkpoint.py`` holds this equal to the real model's state dict.
    """
    d, h, dh, t = config.d_model, config.n_heads, config.d_head, len(config.targets)
    f32 = torch.float32
    layout: Layout = {
        "target_mean": (f32, (t,)),
        "target_std": (f32, (t,)),
        "embedding.weight": (f32, (MAX_ATOMIC_NUMBER, d)),
    }
    for b in range(config.n_blocks):
        attn, ffn = f"blocks.{b}.attention.", f"blocks.{b}.ffn."
        layout[attn + "sigma_weight"] = (f32, (h, dh))
        real_heads = real_space_heads(config, b)  # W_E exists for the real-space heads only
        if config.n_rbf and real_heads:
            layout[attn + "rbf_proj"] = (f32, (real_heads, dh, config.n_rbf))
        if layer_kind(config, b) == "routed":
            layout[attn + "gate_weight"], layout[attn + "gate_bias"] = (f32, (h, dh)), (f32, (h,))
        layout[attn + "sigma_shift"] = (f32, ())
        layout[attn + "sigma_scale"] = (f32, ())
        layout[attn + "sigma_ready"] = (torch.bool, ())
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layout[f"{attn}{proj}.weight"] = (f32, (d, d))
            layout[f"{attn}{proj}.bias"] = (f32, (d,))
        layout[ffn + "0.weight"], layout[ffn + "0.bias"] = (f32, (config.d_ff, d)), (f32, (config.d_ff,))
        layout[ffn + "2.weight"], layout[ffn + "2.bias"] = (f32, (d, config.d_ff)), (f32, (d,))
    m = config.d_head_mlp
    layout["head.0.weight"], layout["head.0.bias"] = (f32, (m, d)), (f32, (m,))
    layout["head.2.weight"], layout["head.2.bias"] = (f32, (t, m)), (f32, (t,))
    return layout


def save_checkpoint(model: Crystalformer, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (weights, config, digest) and ``metadata`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = json.dumps(model.config.to_dict())
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "metadata": json.dumps(metadata or {}),
        DIGEST_KEY: tensors_digest(config, tensors),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)  # a crash mid-write never leaves a half-written checkpoint
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The string→string header and the tensors of a safetensors file, header size bounded.

    The tensors take at most the file's own size, whatever its header claims.
    """
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
        if size <= MAX_HEADER_BYTES:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                return header, {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    raise CheckpointError(
        f"{path}: not a readable safetensors checkpoint (a header of {size} bytes, "
        f"over the {MAX_HEADER_BYTES}-byte limit)"
    )


def _json(path: Path, header: dict[str, str], key: str, default: str | None = None) -> Any:
    """``header[key]`` parsed as JSON; CheckpointError if missing, malformed or too deep."""
    try:
        text = header[key] if default is None else header.get(key, default)
        return json.loads(text)
    except KeyError as err:
        raise CheckpointError(f"{path}: checkpoint header has no {key!r}") from err
    except RecursionError as err:
        raise CheckpointError(f"{path}: checkpoint header {key!r} is nested too deeply") from err
    except ValueError as err:
        raise CheckpointError(f"{path}: checkpoint header {key!r} is not valid JSON ({err})") from err


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], layout: Layout) -> None:
    """Names, shapes, dtypes and finite values of ``tensors`` against ``layout``."""
    missing = sorted(set(layout) - set(tensors))
    unexpected = sorted(set(tensors) - set(layout))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model config "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for key, value in tensors.items():
        dtype, shape = layout[key]
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)}, the config needs {shape}"
            )
        if value.dtype != dtype:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {str(value.dtype).removeprefix('torch.')}, "
                f"the model needs {str(dtype).removeprefix('torch.')}"
            )


def read_checkpoint(path: str | Path) -> tuple[Crystalformer, dict[str, Any]]:
    """Load a checkpoint file strictly; return the model (CPU, float32) and its metadata
    (also attached as ``model.metadata``). See the module docstring for what is checked."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    header, tensors = _read(path)
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this version of ase-crystalformer reads {FORMAT_VERSION!r})"
        )
    raw_config = _json(path, header, "config")
    try:
        config = ModelConfig.from_dict(raw_config)
    except ValueError as err:
        raise CheckpointError(f"{path}: invalid model config in checkpoint header ({err})") from err
    metadata = _json(path, header, "metadata", "{}")
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    if config.domain == "routed" and any(key.endswith(".route_weight") for key in tensors):
        raise CheckpointError(
            f"{path}: a routed model of the earlier form, which mixed the heads' real- and "
            "reciprocal-space outputs; routed heads now mix the two α terms inside one softmax, "
            "so these weights compute something else: retrain it with --domain routed"
        )
    layout = expected_layout(config)
    _check_tensors(path, tensors, layout)
    digest = header.get(DIGEST_KEY)
    if digest is None:
        warnings.warn(
            f"{path}: no integrity digest ({DIGEST_KEY!r}) in the header, so corrupted bytes "
            "cannot be detected; re-save it with save_checkpoint(model, path, model.metadata) "
            "to add one",
            UserWarning,
            stacklevel=2,
        )
    elif digest != tensors_digest(header["config"], tensors):
        raise CheckpointError(
            f"{path}: the tensors do not match the header's integrity digest "
            "(the file is corrupted or was edited)"
        )
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: tensor {key!r} holds NaN or infinite values")
    model = Crystalformer(config)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    model.metadata = metadata
    return model, metadata


def _model_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(str(resources.files("ase_crystalformer") / "checkpoints")))
    dirs.append(Path(__file__).resolve().parent.parent / "checkpoints")  # a source checkout
    return [d for d in dirs if d.is_dir()]


def list_models() -> list[str]:
    """Names of the models that ``load_model`` finds without a path (shipped ones first)."""
    names: list[str] = []
    for directory in _model_dirs():
        for sub in sorted(directory.iterdir()):
            if _is_model_dir(sub) and sub.name not in names:
                names.append(sub.name)
    return names


#: Metadata ``role`` of a shipped model that is a starting point (fine-tuning, embeddings),
#: not a property model: loaded by name, but not by ``CrystalformerCalculator()`` or
#: ``crystalformer predict`` without a model, whose property names its heads would shadow.
BACKBONE_ROLE = "backbone"


def _header(name: str) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and metadata of a findable model, read from its header alone (a committee's
    config from its first member, its metadata from ``committee.json``); a
    ``CheckpointError`` naming the file when they cannot be read."""
    path = model_path(name)
    try:
        committee = json.loads(path.read_text()) if path.name == COMMITTEE_FILE else None
        if committee is not None:  # its members share one config: read the first's
            path = path.parent / committee["members"][0]
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        config = ModelConfig.from_dict(json.loads(header.get("config", "")))
        metadata = committee.get("metadata", {}) if committee else json.loads(header.get("metadata", "{}"))
    except (SafetensorError, OSError, ValueError, KeyError, IndexError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{path}: its header cannot be read ({type(err).__name__}: {err})") from err
    return config, metadata if isinstance(metadata, dict) else {}


def energy_models() -> list[str]:
    """Names of the findable models with an energy-type target (read from headers only):
    the ones that give energy, forces and stress. An unreadable one is skipped here and
    reported when loaded."""
    found = []
    for name in list_models():
        try:
            if any(t.kind == "energy" for t in _header(name)[0].targets):
                found.append(name)
        except CheckpointError:
            continue
    return found


def model_role(name: str) -> str:
    """The metadata ``role`` of a findable model ("" for a property model); a
    ``CheckpointError`` when its header cannot be read."""
    return str(_header(name)[1].get("role", ""))


def is_backbone(name: str) -> bool:
    """Whether ``name`` is a backbone (``BACKBONE_ROLE``); False when its header cannot be
    read, so that loading it reports why."""
    try:
        return model_role(name) == BACKBONE_ROLE
    except CheckpointError:
        return False


def _is_model_dir(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() or (path / COMMITTEE_FILE).is_file()


def _model_file(directory: Path) -> Path:
    return directory / WEIGHTS_NAME if (directory / WEIGHTS_NAME).is_file() else directory / COMMITTEE_FILE


def model_path(name_or_path: str | Path) -> Path:
    """Resolve a model name or a file/directory path to a checkpoint file (a committee's
    ``committee.json``)."""
    path = Path(name_or_path)
    if path.is_file() or (path.is_dir() and _is_model_dir(path)):
        return path if path.is_file() else _model_file(path)
    for directory in _model_dirs():
        if _is_model_dir(directory / str(name_or_path)):
            return _model_file(directory / str(name_or_path))
    if path.is_dir():  # e.g. a training run folder: best, swa and latest.safetensors
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f"pass one of its files: {found}" if found else "it holds no .safetensors file"
        raise CheckpointError(f"{path}: a folder without {WEIGHTS_NAME}; {hint}")
    raise CheckpointError(
        f"no model named or at {str(name_or_path)!r}; shipped models: {list_models() or 'none'}"
    )


def load_model(name_or_path: str | Path, device: str | torch.device | None = None) -> Crystalformer:
    """Load a shipped model by name, or any checkpoint by path, in eval mode on ``device``.

    The model's checkpoint metadata is attached as ``model.metadata``, with its ``name``
    (the shipped name or checkpoint folder) added. A committee directory gives a
    ``committee.Committee`` (the same predict API, plus ``return_std``).
    """
    path = model_path(name_or_path)
    if path.name == COMMITTEE_FILE:  # several member checkpoints: ``committee.Committee``
        from .committee import read_committee

        model = read_committee(path.parent)
        model.metadata.setdefault("name", path.parent.name)
        return model.to(device) if device is not None else model
    model, metadata = read_checkpoint(path)
    metadata.setdefault("name", path.parent.name if path.name == WEIGHTS_NAME else path.stem)
    return model.to(device) if device is not None else model
