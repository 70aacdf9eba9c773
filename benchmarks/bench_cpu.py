"""CPU throughput of our window attention (torch path) against the dense box reference.

    python benchmarks/bench_cpu.py --data PATH/flla_2015.csv [--quick]

Same structures (a fixed random sample of the CSV), same weights (one state dict loaded
into both models), float32. Per path, in a fresh process (so that its peak RSS is its
own): inference structures/s at batch 128, ms/structure at batch 1, the time of one
training step at batch 128 (forward, L1 loss, backward, gradient clipping, AdamW step),
and the peak RSS. Window building and collation (our CPU preprocessing, done once per
structure and cacheable) is timed separately and not included in the model times.
Prints a markdown table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common
import torch

PATHS = {
    "ours": "ours: sphere window, torch path",
    "dense": "dense box (the original code's window, chunked RBFs)",
    "dense-cached": "dense box (RBFs cached per batch)",
}


def build_model(path: str) -> torch.nn.Module:
    """Paper-default model with seed-0 weights; dense variants load the same state dict."""
    from ase_crystalformer import Crystalformer

    torch.manual_seed(0)
    model = Crystalformer()
    if path == "ours":
        return model
    from dense_box_reference import DenseBoxCrystalformer

    dense = DenseBoxCrystalformer(model.config, cache_basis=path == "dense-cached")
    dense.load_state_dict(model.state_dict())
    return dense


def worker(args: argparse.Namespace) -> dict:
    """All measurements of one path; returns a JSON-able dict."""
    from ase_crystalformer.geometry import collate, windows_for

    torch.set_num_threads(args.threads or torch.get_num_threads())
    bs = args.batch
    n_batches = max(args.infer_batches, args.train_steps)
    atoms, energy = _common.load_structures(args.data, bs * n_batches, args.seed)
    model = build_model(args.path)
    cutoff = model.config.cutoff
    y = torch.tensor(energy, dtype=torch.float32)
    model.target_mean.fill_(float(y.mean()))
    model.target_std.fill_(float(y.std(unbiased=False)))
    y = (y - model.target_mean) / model.target_std

    start = time.perf_counter()
    batches = [
        collate(windows_for(atoms[b * bs : (b + 1) * bs], cutoff)) for b in range(n_batches)
    ]
    prep = time.perf_counter() - start
    singles = [collate(windows_for([a], cutoff)) for a in atoms[: args.single]]
    warm = collate(windows_for(atoms[:8], cutoff))
    rss_base = _common.rss_mb()

    # Training first (it also fixes the σ standardisation of a fresh model).
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-5)

    def train_step(batch, target) -> None:
        loss = (model(batch)[:, 0] - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    model.train()
    train_step(warm, y[:8])  # warm-up on a small batch
    train = [
        _common.seconds(lambda s=s: train_step(batches[s], y[s * bs : (s + 1) * bs]))
        for s in range(args.train_steps)
    ]

    model.eval()
    with torch.no_grad():
        model(warm)
        infer = [_common.seconds(lambda b=b: model(b)) for b in batches[: args.infer_batches]]
        single = [_common.seconds(lambda b=b: model(b)) for b in singles]

    images = None
    if args.path == "ours":
        images = int(batches[0].mask.sum())  # real window slots of the first batch
    else:
        from dense_box_reference import box_geometry

        images = box_geometry(batches[0], model.c_max).n_images
    return {
        "path": args.path,
        "threads": torch.get_num_threads(),
        "atoms_per_batch": int(batches[0].n_atoms.sum()),
        "images_per_batch": images,
        "prep_ms_per_structure": 1e3 * prep / (bs * n_batches),
        "infer_structures_per_s": bs * len(infer) / sum(infer),
        "batch1_ms_per_structure": 1e3 * sum(single) / len(single),
        "train_step_s": sum(train) / len(train),
        "train_steps": len(train),
        "rss_base_mb": rss_base,
        "rss_peak_mb": _common.peak_rss_mb(),
    }


def agreement(data: str, n: int) -> float:
    """Max |ours − dense| of the normalised outputs on ``n`` structures, float64."""
    from ase_crystalformer.geometry import collate, windows_for

    atoms, _ = _common.load_structures(data, n, seed=1)
    ours, dense = build_model("ours").double(), build_model("dense").double()
    batch = collate(windows_for(atoms, ours.config.cutoff), torch.float64)
    with torch.no_grad():
        return float((ours(batch) - dense(batch)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=_common.default_data(), help="flla_2015.csv")
    parser.add_argument("--quick", action="store_true", help="1 batch, 1 step, 8 singles")
    parser.add_argument("--paths", default="ours,dense,dense-cached", help=f"of {list(PATHS)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--infer-batches", type=int, default=None, help="default 4 (quick 1)")
    parser.add_argument("--train-steps", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--single", type=int, default=None, help="batch-1 structures, 32 (8)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", dest="path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.infer_batches = args.infer_batches or (1 if quick else 4)
    args.train_steps = args.train_steps or (1 if quick else 3)
    args.single = args.single or (8 if quick else 32)

    if args.path:  # worker mode: one path, JSON on the last line
        print(json.dumps(worker(args)))
        return

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {list(PATHS)}")
    print(f"machine: {_common.machine(args.threads)}")
    print(f"data: {args.data}, batch {args.batch}, float32\n")
    forwarded = [
        "--data", args.data, "--batch", str(args.batch), "--seed", str(args.seed),
        "--infer-batches", str(args.infer_batches), "--train-steps", str(args.train_steps),
        "--single", str(args.single), "--threads", str(args.threads),
    ]
    results = {}
    for path in paths:
        print(f"running {path} ...", file=sys.stderr, flush=True)
        results[path] = _common.run_isolated(str(Path(__file__)), [*forwarded, "--worker", path])

    rows = [
        ("atoms in the first batch", "atoms_per_batch"),
        ("window images in the first batch", "images_per_batch"),
        ("window + collate, ms/structure (CPU preprocessing)", "prep_ms_per_structure"),
        (f"inference, structures/s at batch {args.batch}", "infer_structures_per_s"),
        ("inference, ms/structure at batch 1", "batch1_ms_per_structure"),
        (f"training step at batch {args.batch}, s", "train_step_s"),
        ("RSS before the first forward, MiB", "rss_base_mb"),
        ("peak RSS, MiB", "rss_peak_mb"),
    ]
    headers = ["measure"] + [PATHS[p] for p in paths]
    body = []
    for label, key in rows:
        values = [results[p][key] for p in paths]
        if key == "prep_ms_per_structure":
            values = [v if p == "ours" else float("nan") for p, v in zip(paths, values)]
        body.append([label, *values])
    print(_common.table(headers, body))
    if "ours" in results and len(paths) > 1:
        o = results["ours"]
        speed = [
            [
                p,
                results[p]["train_step_s"] / o["train_step_s"],
                o["infer_structures_per_s"] / results[p]["infer_structures_per_s"],
                results[p]["batch1_ms_per_structure"] / o["batch1_ms_per_structure"],
            ]
            for p in paths
            if p != "ours"
        ]
        print("\nSpeed-up of ours (× faster):\n")
        print(_common.table(
            ["over", f"training step b{args.batch}", f"inference b{args.batch}", "inference b1"],
            speed,
        ))
    steps = results[paths[0]]["train_steps"]
    print(f"\n(training time: mean of {steps} step(s) after a warm-up step on 8 structures; "
          f"threads: {results[paths[0]]['threads']})")
    if "ours" in paths and any(p.startswith("dense") for p in paths):
        print(f"max |ours − dense| on 16 structures, float64, normalised outputs: "
              f"{agreement(args.data, 16):.2e}")


if __name__ == "__main__":
    main()
