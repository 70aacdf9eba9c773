"""How far smooth activations move the ReLU backbone's formation energies (potential.from_backbone).

    python scripts/backbone_activation.py --data-dir ../shared/data

The first 300 DFT-relaxed MEGNet val structures (mp-megnet, in ``potential.read_all``'s
order): e_form@megnet MAE of the shipped backbone as trained (ReLU, mean readout), with
GELU/SiLU in its place, and as ``from_backbone`` makes it (GELU(βx)/β, per-atom readout).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from ase_crystalformer import potential as P
from ase_crystalformer.checkpoint import read_checkpoint
from ase_crystalformer.geometry import collate, windows_for
from ase_crystalformer.model import Crystalformer


def mae(model: Crystalformer, windows: list, y: np.ndarray) -> float:
    out = []
    with torch.no_grad():
        for k in range(0, len(windows), 64):
            out.append(model.targets(model.eval()(collate(windows[k : k + 64])))[:, 0].numpy())
    return float(np.abs(np.concatenate(out) - y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    frames, fixed = P.read_all(args.data_dir)
    val = [f for f in frames if f.file == "mp-megnet" and fixed.get(f.group) == "val"][:300]
    y = np.array([f.energy / len(f.atoms) for f in val])
    windows = windows_for([f.atoms for f in val], 10.0)
    base, _ = read_checkpoint(P.model_path("multitask-backbone"))
    t = [s.name for s in base.config.targets].index("e_form@megnet")
    print(f"| model | e_form MAE on {len(val)} MEGNet val structures (eV/atom) |\n|---|---|")
    for activation in ("relu", "gelu", "silu"):
        model = Crystalformer(replace(base.config, activation=activation, targets=(base.config.targets[t],)))
        state = base.state_dict()
        state = {**state, "head.2.weight": state["head.2.weight"][t : t + 1], "head.2.bias": state["head.2.bias"][t : t + 1],
                 "target_mean": state["target_mean"][t : t + 1], "target_std": state["target_std"][t : t + 1]}
        model.load_state_dict(state)
        label = "as trained (ReLU)" if activation == "relu" else f"{activation} in place of ReLU"
        print(f"| backbone, {label} | {mae(model, windows, y):.4f} |")
    for beta in (10.0, 50.0):
        for readout in ("mean", "atoms"):
            potential = P.from_backbone(base, "e_form@megnet", float(y.mean()), float(y.std()), sharpness=beta)
            model = Crystalformer(replace(potential.config, readout=readout))
            model.load_state_dict(potential.state_dict())
            print(f"| GELU({beta:g}x)/{beta:g}, readout {readout} | {mae(model, windows, y):.4f} |")


if __name__ == "__main__":
    main()
