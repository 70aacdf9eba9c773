"""This checkout against an older one (by default commit 0f864be), on the same structures.

    python benchmarks/bench_speed.py --data PATH/flla_2015.csv --baseline PATH/TO/OLD/CHECKOUT

Both run the paper's default model (seed-0 weights, float32, an energy target) on the
first 128 structures of the CSV, each (checkout, thread count) in a fresh process that
imports the package from that checkout (``PYTHONPATH``), so peak RSS is its own. The two
checkouts run back to back, alternating, ``--rounds`` times; tables give medians and
the speed-up as old ÷ new. Measured per process:

* training step, energy only: forward, L1 loss, backward, AdamW step;
* training step with forces and stress: ``forces.energy_forces_stress(create_graph=True)``
  and an L1 loss on energy, forces and stress, so backward is a double backward;
* inference at batch 128 (structures/s) and at batch 1 (ms/structure), model only:
  windows and batches are made beforehand;
* ``model.predict`` from the structures at batch 128 and of one structure at a time, so
  window building and collation are counted;
* peak RSS of the process.

The last column compares the CPU time of the process (all its threads) for the same work,
which other load on a shared machine disturbs less than the wall time.

It also prints the largest difference of the two checkouts' float32 predictions. Times on
a shared machine vary; compare the ratios, which come from runs minutes apart. Asserts
nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
MEASURES = [
    ("train_s", "training step, energy only, s", True),
    ("train_fs_s", "training step, energy + forces + stress, s", True),
    ("infer_per_s", "inference at batch {batch}, structures/s", False),
    ("single_ms", "inference at batch 1, ms/structure", True),
    ("predict_per_s", "model.predict at batch {batch} (windows + collate + model), structures/s", False),
    ("predict_single_ms", "model.predict of one structure, ms", True),
    ("rss_mb", "peak RSS, MiB", True),
]


def worker(args: argparse.Namespace) -> dict:
    """All measurements in this process (package from PYTHONPATH); a JSON-able dict."""
    import torch

    torch.set_num_threads(args.threads)
    from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec, forces
    from ase_crystalformer.geometry import collate, windows_for

    atoms, energy = _common.load_first(args.data, args.batch)
    torch.manual_seed(0)
    model = Crystalformer(ModelConfig(targets=(TargetSpec("energy", "eV/atom", kind="energy"),)))
    y = torch.tensor(energy, dtype=torch.float32)
    model.target_mean.fill_(float(y.mean()))
    model.target_std.fill_(float(y.std(unbiased=False)))
    batch = collate(windows_for(atoms, model.config.cutoff))
    singles = [collate(windows_for([a], model.config.cutoff)) for a in atoms[: args.single]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(with_forces: bool) -> None:
        if with_forces:
            out = forces.energy_forces_stress(model, batch, create_graph=True)
            per_atom = out["energy"] / batch.n_atoms
            loss = (per_atom - y).abs().mean() + out["forces"].abs().mean() + out["stress"].abs().mean()
        else:
            loss = (model(batch)[:, 0] - (y - model.target_mean) / model.target_std).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(fn, repeats: int) -> float:
        """Median wall time; the median CPU time of this process goes to ``cpu``."""
        fn()  # warm-up (and, the first time, the frozen σ standardisation)
        walls, cpus = [], []
        for _ in range(repeats):
            start = time.process_time()
            walls.append(_common.seconds(fn))
            cpus.append(time.process_time() - start)
        cpu.append(statistics.median(cpus))
        return statistics.median(walls)

    cpu: list[float] = []
    model.train()
    result = {"train_s": timed(lambda: step(False), args.repeats)}
    result["train_fs_s"] = timed(lambda: step(True), args.repeats)
    model.eval()
    with torch.no_grad():
        result["infer_per_s"] = len(atoms) / timed(lambda: model(batch), args.repeats)

        def all_singles() -> None:
            for b in singles:
                model(b)

        result["single_ms"] = 1e3 * timed(all_singles, args.repeats) / len(singles)
        # The whole predict path from structures; the new code remembers reduced cells,
        # which would flatter it on repeated calls, so its memory is cleared each time.
        from ase_crystalformer import geometry

        forget = getattr(getattr(geometry, "_minkowski_reduced", None), "cache_clear", lambda: None)

        def predict_all() -> None:
            forget()
            model.predict(atoms, batch_size=len(atoms))

        def predict_singles() -> None:
            forget()
            for a in atoms[: args.single]:
                model.predict(a)

        result["predict_per_s"] = len(atoms) / timed(predict_all, args.repeats)
        result["predict_single_ms"] = 1e3 * timed(predict_singles, args.repeats) / args.single
        # Predictions of the seed-0 weights (the training steps above changed these).
        torch.manual_seed(0)
        fresh = Crystalformer(model.config).eval()
        result["outputs"] = fresh(batch)[:, 0].tolist()
    result["cpu"] = dict(zip(("train_s", "train_fs_s", "infer_per_s", "single_ms", "predict_per_s", "predict_single_ms"), cpu))
    result["rss_mb"] = _common.peak_rss_mb()
    result["atoms"] = int(batch.n_atoms.sum())
    return result


def run(checkout: Path, args: argparse.Namespace, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable, str(Path(__file__)), "--worker", "--data", args.data, "--batch", str(args.batch),
        "--threads", str(threads), "--repeats", str(args.repeats), "--single", str(args.single),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker failed for {checkout} ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=_common.default_data(), help="flla_2015.csv")
    parser.add_argument(
        "--baseline", type=Path, default=HERE.parent.parent / "baseline",
        help="the old checkout (default: a sibling of this one named baseline)",
    )
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=1, help="old/new pairs per thread count")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measure")
    parser.add_argument("--single", type=int, default=32, help="batch-1 structures")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        print(json.dumps(worker(args)))
        return
    old, new = args.baseline.resolve(), HERE.parent
    if not (old / "ase_crystalformer" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {old}: no ase_crystalformer package there")
    print(f"machine: {_common.machine()}")
    print(f"data: first {args.batch} structures of {args.data}, float32")
    print(f"old: {old} ({_git(old)}), new: {new} ({_git(new)})\n")
    for threads in [int(t) for t in args.threads.split(",")]:
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for name in order:
                print(f"{threads} thread(s), round {r + 1}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run(old if name == "old" else new, args, threads))
        rows = []
        for key, label, lower_is_better in MEASURES:
            a = statistics.median(x[key] for x in runs["old"])
            b = statistics.median(x[key] for x in runs["new"])
            ratio = a / b if lower_is_better else b / a
            cpu_ratio = float("nan")
            if key in runs["new"][0]["cpu"]:
                ca = statistics.median(x["cpu"][key] for x in runs["old"])
                cb = statistics.median(x["cpu"][key] for x in runs["new"])
                cpu_ratio = ca / cb
            rows.append([label.format(batch=args.batch), a, b, ratio, cpu_ratio])
        print(f"{threads} thread(s), {runs['new'][0]['atoms']} atoms in the batch, "
              f"load average {os.getloadavg()[0]:.1f} at the end:\n")
        headers = ["measure", "old", "new", "new is × better", "× less CPU time"]
        print(_common.table(headers, rows))
        diff = max(abs(p - q) / max(abs(p), 1e-3) for p, q in zip(runs["old"][0]["outputs"], runs["new"][0]["outputs"]))
        print(f"\nmax relative difference of the predictions (old vs new, float32): {diff:.2e}\n")


def _git(path: Path) -> str:
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "not a git checkout"


if __name__ == "__main__":
    main()
