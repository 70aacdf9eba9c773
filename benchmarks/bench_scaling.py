"""Time and memory against atoms per cell, 8 to 1,000 atoms, on supercells of a real crystal.

    python benchmarks/bench_scaling.py --data PATH/flla_2015.csv [--quick]

An n×n×n supercell of a 1-atom primitive cell from the data (default mp-134, fcc Al) has
n³ atoms. Each (cell, path) runs in a fresh process so that its peak RSS is its own. Per
cell: window slots, window building + collation (vesin, CPU), inference time at batch 1,
energy + forces (forward, backward to positions), the peak RSS of each above the RSS
before the first forward, and inference with the dense box reference up to ``--dense-max-atoms``
(its work grows as atoms² × box images). The sphere window makes the model exactly
invariant to the supercell, so the last columns show what predicting on the primitive
cell saves: the same prediction, at a fraction of the time. Asserts nothing about time.
``--sizes 16,20 --forces-max-atoms 1000`` shows inference memory past 2²⁰ window slots
(4,096 and 8,000 atoms), where the radial bases are made per row chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import _common
import torch


def base_structure(data: str, material: str):
    """The structure of ``material`` (an MP id) in the CSV, as ase.Atoms."""
    import ast

    import pandas as pd
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    with open(data, encoding="utf-8") as f:
        skip = 1 if f.readline().startswith("#") else 0
    frame = pd.read_csv(data, skiprows=skip)
    rows = frame[frame["material_id"] == material]
    if rows.empty:
        raise SystemExit(f"{material} is not in {data}")
    return AseAtomsAdaptor.get_atoms(Structure.from_dict(ast.literal_eval(rows["structure"].iloc[0])))


def worker(args: argparse.Namespace) -> dict:
    """Measurements of one supercell size with one path."""
    from ase_crystalformer import Crystalformer
    from ase_crystalformer.geometry import collate, windows_for

    if args.threads:
        torch.set_num_threads(args.threads)
    atoms = base_structure(args.data, args.material) * (args.n, args.n, args.n)
    torch.manual_seed(0)
    model = Crystalformer()
    if args.path == "dense":
        from dense_box_reference import DenseBoxCrystalformer

        dense = DenseBoxCrystalformer(model.config)
        dense.load_state_dict(model.state_dict())
        model = dense
    model.eval()
    holder: list = []
    cutoff = model.config.cutoff
    prep = _common.seconds(lambda: holder.append(collate(windows_for([atoms], cutoff))))
    batch = holder[0]
    rss_base = _common.rss_mb()
    with torch.no_grad():
        prediction = float(model(batch)[0, 0])  # also the warm-up
        infer = [_common.seconds(lambda: model(batch)) for _ in range(args.repeats)]
    infer_rss = _common.peak_rss_mb() - rss_base  # ru_maxrss only grows: read it now

    forces = float("nan")
    if args.path == "ours" and len(atoms) <= args.forces_max_atoms:

        def energy_forces() -> None:
            positions = batch.positions.clone().requires_grad_()
            b = dataclasses.replace(batch, positions=positions)
            energy = model(b).sum() * len(atoms)
            torch.autograd.grad(energy, positions)

        energy_forces()
        forces = _common.median([_common.seconds(energy_forces) for _ in range(args.repeats)])
    return {
        "atoms": len(atoms),
        "slots": int(batch.mask.numel()),
        "images": int(batch.mask.sum()),
        "prep_ms": 1e3 * prep,
        "infer_ms": 1e3 * _common.median(infer),
        "forces_ms": 1e3 * forces,
        "rss_delta_mb": infer_rss,
        "forces_rss_delta_mb": _common.peak_rss_mb() - rss_base if not math.isnan(forces) else float("nan"),
        "prediction": prediction,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=_common.default_data(), help="flla_2015.csv")
    parser.add_argument("--material", default="mp-134", help="a 1-atom cell (mp-134: fcc Al)")
    parser.add_argument("--quick", action="store_true", help="n = 2, 4, 6, 8, 10; 2 repeats")
    parser.add_argument("--sizes", default=None, help="comma-separated n (n³ atoms); default 2..10")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (3; quick 2)")
    parser.add_argument("--dense-max-atoms", type=int, default=None, help="125 (quick 64)")
    parser.add_argument("--forces-max-atoms", type=int, default=1000,
                        help="skip energy + forces above this (~2.7 MiB/atom up to 2^20 window slots, then bounded)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", dest="path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.path:
        print(json.dumps(worker(args)))
        return

    default_sizes = "2,4,6,8,10" if args.quick else "2,3,4,5,6,7,8,9,10"
    sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
    dense_max = args.dense_max_atoms or (64 if args.quick else 125)
    script = str(Path(__file__))
    common = ["--data", args.data, "--material", args.material, "--repeats", str(args.repeats),
              "--threads", str(args.threads), "--forces-max-atoms", str(args.forces_max_atoms)]
    print(f"machine: {_common.machine(args.threads)}")
    print(f"cell: {args.material} ×n×n×n, float32, batch 1, median of {args.repeats} calls\n")

    def measure(n: int, path: str) -> dict:
        print(f"running n={n} {path} ...", file=sys.stderr, flush=True)
        return _common.run_isolated(script, [*common, "--n", str(n), "--worker", path])

    primitive = measure(1, "ours")
    rows = []
    for n in sizes:
        ours = measure(n, "ours")
        dense = measure(n, "dense") if n**3 <= dense_max else None
        rows.append([
            ours["atoms"],
            ours["images"],
            ours["prep_ms"],
            ours["infer_ms"],
            ours["infer_ms"] / ours["atoms"],
            ours["rss_delta_mb"],
            ours["forces_ms"],
            ours["forces_rss_delta_mb"],
            dense["infer_ms"] if dense else float("nan"),
            dense["rss_delta_mb"] if dense else float("nan"),
            ours["infer_ms"] / primitive["infer_ms"],
            abs(ours["prediction"] - primitive["prediction"]),
        ])
    print(_common.table(
        [
            "atoms", "window images", "window + collate ms", "inference ms", "ms/atom",
            "inference peak ΔRSS MiB", "energy + forces ms", "energy + forces peak ΔRSS MiB",
            "dense box inference ms",
            "dense peak ΔRSS MiB", "time vs primitive cell", "abs Δ prediction vs primitive",
        ],
        rows,
    ))
    print(f"\nprimitive cell ({primitive['atoms']} atom, {primitive['images']} images): "
          f"inference {primitive['infer_ms']:.3g} ms, window + collate {primitive['prep_ms']:.3g} ms; "
          f"threads: {primitive['threads']}")


if __name__ == "__main__":
    main()
