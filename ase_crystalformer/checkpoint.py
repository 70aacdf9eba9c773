"""One checkpoint format: a safetensors file holding the weights and JSON metadata.

safetensors stores plain tensors and a string→string header, so opening a checkpoint never
runs code from it (unlike ``torch.load`` of a pickle). The header holds:

* ``format_version``: bumped on any incompatible change; other versions are refused;
* ``config``: ``ModelConfig.to_dict()``, which fixes the architecture and the targets;
* ``metadata``: free JSON (data provenance, split, training ids hash, metrics, command).

Shipped models live in ``checkpoints/<name>/model.safetensors`` beside a ``README.md``
model card, and load by name offline.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError
from .model import Crystalformer

FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
#: A shipped model directory holding this file is a committee (``committee.py``).
COMMITTEE_FILE = "committee.json"
#: Extra directories searched for named models, separated by os.pathsep.
MODELS_ENV = "CRYSTALFORMER_MODELS"


def save_checkpoint(model: Crystalformer, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (weights, config) and ``metadata`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "metadata": json.dumps(metadata or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)  # a crash mid-write never leaves a half-written checkpoint
    return path


def read_checkpoint(path: str | Path) -> tuple[Crystalformer, dict[str, Any]]:
    """Load a checkpoint file strictly; return the model (CPU, float32) and its metadata
    (also attached as ``model.metadata``)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this version of ase-crystalformer reads {FORMAT_VERSION!r})"
        )
    try:
        config = ModelConfig.from_dict(json.loads(header["config"]))
        metadata = json.loads(header.get("metadata", "{}"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid model config in checkpoint header ({err})") from err
    model = Crystalformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model config "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"the config needs {tuple(expected[key].shape)}"
            )
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


def energy_models() -> list[str]:
    """Names of the findable models with an energy-type target (read from headers only):
    the ones that give energy, forces and stress."""
    found = []
    for name in list_models():
        try:
            path = model_path(name)
            if path.name == COMMITTEE_FILE:  # its members share one config: read the first's
                path = path.parent / json.loads(path.read_text())["members"][0]
            with safe_open(str(path), framework="pt") as handle:
                config = json.loads((handle.metadata() or {}).get("config", "{}"))
        except (SafetensorError, OSError, ValueError, KeyError, IndexError, TypeError):  # reported when loaded
            continue
        if any(t.get("kind") == "energy" for t in config.get("targets", [])):
            found.append(name)
    return found


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
