"""Crystalformer.predict on prebuilt windows, and the mode it leaves the model in."""

from __future__ import annotations

import numpy as np
import torch
from ase.build import bulk

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.geometry import windows_for


def _model() -> Crystalformer:
    torch.manual_seed(0)
    config = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32,
                         targets=(TargetSpec("band_gap", "eV"), TargetSpec("energy", "eV/atom")))
    return Crystalformer(config)


def test_predict_windows_is_predict_and_modes_are_restored() -> None:
    structures = [bulk("Si"), bulk("NaCl", "rocksalt", 5.64), bulk("Cu", cubic=True)]
    model = _model()
    model.predict(structures)  # the first call in train mode freezes the σ standardisation
    model.train()
    in_train = model.predict(structures, batch_size=2)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    in_eval = model.predict(structures, batch_size=2)
    assert not any(m.training for m in model.modules())
    windows = windows_for(structures, model.config.cutoff)
    np.testing.assert_array_equal(model.predict_windows(windows, batch_size=2), in_train)
    np.testing.assert_array_equal(in_eval, in_train)
    model.head.train()  # one submodule in training mode: predict still runs all in eval mode
    np.testing.assert_array_equal(model.predict(structures, batch_size=2), in_train)
    assert model.head.training is False and model.training is False
