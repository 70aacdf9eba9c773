"""Energy + forces + stress of one large cell: this checkout against an older one, side by side.

    python benchmarks/bench_large_cell.py --baseline PATH/TO/OLD/CHECKOUT [--size 17]

The cell is an n×n×n supercell of the 1-atom fcc Al cell (a = 4.05 Å), n³ atoms
(17³ = 4,913 by default), never reduced to its primitive cell. Each checkout runs
in a fresh process that imports the package from it (``PYTHONPATH``), so the peak RSS is
that computation's own: the paper's default model (seed-0 weights, float32, an energy
target), one call of ``forces.energy_forces_stress``. Prints wall time, peak RSS and the
largest difference of the energies, forces and stresses. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent


def worker(size: int, threads: int) -> dict:
    import torch
    from ase.build import bulk

    torch.set_num_threads(threads)
    from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec, forces
    from ase_crystalformer.geometry import collate, windows_for

    atoms = bulk("Al", "fcc", a=4.05) * (size, size, size)
    torch.manual_seed(0)
    model = Crystalformer(ModelConfig(targets=(TargetSpec("energy", "eV/atom", kind="energy"),))).eval()
    start = time.perf_counter()
    batch = collate(windows_for([atoms], model.config.cutoff))
    out = forces.energy_forces_stress(model, batch)
    seconds = time.perf_counter() - start
    return {
        "atoms": len(atoms), "slots": int(batch.mask.sum()), "seconds": seconds, "rss_mb": _common.peak_rss_mb(),
        "energy": float(out["energy"][0]), "forces": out["forces"].tolist(), "stress": out["stress"][0].tolist(),
    }


def run(checkout: Path, size: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__)), "--worker", "--size", str(size), "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"worker failed for {checkout} ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=HERE.parent.parent / "baseline")
    parser.add_argument("--size", type=int, default=17, help="n of the n×n×n supercell (n³ atoms)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.size, args.threads)))
        return
    old, new = args.baseline.resolve(), HERE.parent
    if not (old / "ase_crystalformer" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {old}: no ase_crystalformer package there")
    print(f"machine: {_common.machine(args.threads)}\n")
    results = {name: run(path, args.size, args.threads) for name, path in (("old", old), ("new", new))}
    a, b = results["old"], results["new"]
    rows = [
        ["energy + forces + stress (window, collate, forward, backward), s", a["seconds"], b["seconds"], a["seconds"] / b["seconds"]],
        ["peak RSS, MiB", a["rss_mb"], b["rss_mb"], a["rss_mb"] / b["rss_mb"]],
    ]
    print(f"fcc Al {args.size}³ = {b['atoms']} atoms, {b['slots']} window slots, {args.threads} thread(s):\n")
    print(_common.table(["measure", "old", "new", "old ÷ new"], rows))
    force_diff = max(abs(p - q) for u, v in zip(a["forces"], b["forces"]) for p, q in zip(u, v))
    stress_diff = max(abs(p - q) for u, v in zip(a["stress"], b["stress"]) for p, q in zip(u, v))
    print(f"\nenergy {a['energy']:.6f} vs {b['energy']:.6f} eV; largest force difference {force_diff:.2e} eV/Å, "
          f"stress {stress_diff:.2e} eV/Å³")


if __name__ == "__main__":
    main()
