import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def spread_sigma(model, scale: float = 25.0) -> None:
    """Freeze σ statistics with a large multiplier, as a trained model has (spec §2.2).

    With c ≈ 25 the widths σ span most of (0, 1.98 Å) instead of 1.4 ± 0.07 Å, so tests
    exercise narrow and wide Gaussians alike.
    """
    for block in model.blocks:
        attn = block.attention
        attn.sigma_shift.fill_(0.0)
        attn.sigma_scale.fill_(scale)
        attn.sigma_ready.fill_(True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
