"""Batched ``CrystalformerCalculator.predict`` against one ``calculate`` per structure.

Prints a table of wall times for a paper-size model (random weights: speed does not depend
on training) on random crystals of 2-8 atoms. Usage:

    python benchmarks/calculator_batch.py [--device cpu|cuda] [--n 64] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ase import Atoms

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.calculator import CrystalformerCalculator


def random_crystal(rng: np.random.Generator, n_atoms: int, scale: float = 4.5) -> Atoms:
    """Random atoms, no two closer than 1.2 Å, in a skewed cell of about ``scale`` Å."""
    while True:
        cell = np.eye(3) * scale + rng.uniform(-0.35, 0.35, (3, 3)) * scale
        if abs(np.linalg.det(cell)) > 0.4 * scale**3:
            break
    numbers = rng.integers(1, 40, n_atoms)
    while True:
        atoms = Atoms(numbers=numbers, scaled_positions=rng.random((n_atoms, 3)), cell=cell, pbc=True)
        if (atoms.get_all_distances(mic=True) + 1e3 * np.eye(n_atoms)).min() > 1.2:
            return atoms


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    frames = [random_crystal(rng, int(rng.integers(2, 9))) for _ in range(args.n)]
    cases = [
        ("band_gap only", (TargetSpec("bandgap", "eV"),), ["band_gap"]),
        ("energy+forces+stress", (TargetSpec("energy", "eV/atom", kind="energy"),), ["energy", "forces", "stress"]),
    ]
    print(f"{'properties':<22} {'device':<8} {'n':>4} {'loop (s)':>9} {'predict (s)':>12} {'speedup':>8}")
    for label, targets, props in cases:
        model = Crystalformer(ModelConfig(activation="silu", targets=targets))
        calc = CrystalformerCalculator(model, device=args.device)
        device = str(calc.device)
        calc.predict(frames[:4], properties=props)  # warm-up
        sync(device)
        start = time.perf_counter()
        for atoms in frames:
            copy = atoms.copy()
            for p in props:
                calc.get_property(p, copy)
        sync(device)
        loop = time.perf_counter() - start
        start = time.perf_counter()
        calc.predict(frames, properties=props, batch_size=args.batch_size)
        sync(device)
        batched = time.perf_counter() - start
        print(f"{label:<22} {device:<8} {args.n:>4} {loop:>9.2f} {batched:>12.2f} {loop / batched:>7.1f}x")


if __name__ == "__main__":
    main()
