"""Crystalformer (Taniai et al., ICLR 2024) for ASE, pymatgen and matminer workflows."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import Any

from .checkpoint import list_models, load_model
from .config import ModelConfig, TargetSpec, TrainConfig
from .errors import CheckpointError, CrystalformerError, DataError, StructureError
from .model import Crystalformer
from .relax import relax  # the function shadows its module's name on the package, on purpose

try:
    __version__ = _version("ase-crystalformer")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

#: Optional integrations, imported on first use so that `import ase_crystalformer` does not
#: need matminer or phonopy.
_LAZY = {
    "CrystalformerCalculator": "calculator",
    "CrystalformerFeaturizer": "featurizer",
    "run_phonons": "phonons",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Crystalformer",
    "CrystalformerCalculator",
    "CrystalformerError",
    "CrystalformerFeaturizer",
    "DataError",
    "ModelConfig",
    "StructureError",
    "TargetSpec",
    "TrainConfig",
    "__version__",
    "list_models",
    "load_model",
    "relax",
    "run_phonons",
]
