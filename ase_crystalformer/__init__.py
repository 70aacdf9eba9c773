"""Crystalformer (Taniai et al., ICLR 2024) for ASE, pymatgen and matminer workflows."""

from .config import ModelConfig, TargetSpec
from .errors import CheckpointError, CrystalformerError, DataError, StructureError
from .model import Crystalformer

__all__ = [
    "CheckpointError",
    "Crystalformer",
    "CrystalformerError",
    "DataError",
    "ModelConfig",
    "StructureError",
    "TargetSpec",
]
