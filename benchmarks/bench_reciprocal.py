"""Cost of reciprocal-space heads: one training step per domain on the same MP structures.

    python benchmarks/bench_reciprocal.py --data PATH/flla_2015.csv [--threads 1] [--steps 3]

Paper-default architecture (4 blocks, 8 heads × 16), float32, one batch of 128 structures
(``_common.load_structures``, seed 0). Per domain, in a fresh process: the training step
(forward, L1 loss, backward, gradient clipping, AdamW step; median of ``--steps`` after a
warm-up step on the same batch) and inference on the batch, and their ratio to the real
domain. Prints a markdown table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common
import torch

DOMAINS = ("real", "reciprocal", "alternating", "dual", "routed")


def worker(args: argparse.Namespace) -> dict:
    from ase_crystalformer import Crystalformer, ModelConfig
    from ase_crystalformer.geometry import collate, windows_for
    from ase_crystalformer.reciprocal import reciprocal_geometry

    torch.set_num_threads(args.threads or torch.get_num_threads())
    atoms, energy = _common.load_structures(args.data, args.batch, args.seed)
    torch.manual_seed(0)
    model = Crystalformer(ModelConfig(domain=args.domain))
    batch = collate(windows_for(atoms, model.config.cutoff))
    y = torch.tensor(energy, dtype=torch.float32)
    y = (y - y.mean()) / y.std()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-5)

    def step() -> None:
        loss = (model(batch)[:, 0] - y).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    model.train()
    step()  # warm-up; also fixes the σ standardisation
    train = [_common.seconds(step) for _ in range(args.steps)]
    model.eval()
    with torch.no_grad():
        infer = [_common.seconds(lambda: model(batch)) for _ in range(args.steps)]
    waves = sum(len(c.k2) for c in reciprocal_geometry(batch, model.config).crystals)
    return {
        "domain": args.domain,
        "atoms": int(batch.n_atoms.sum()),
        "pairs": int((batch.n_atoms**2).sum()),
        "waves": waves,
        "train_step_s": _common.median(train),
        "infer_s": _common.median(infer),
        "rss_peak_mb": _common.peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=_common.default_data(), help="flla_2015.csv")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", dest="domain", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.domain:
        print(json.dumps(worker(args)))
        return
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    print(f"machine: {_common.machine(args.threads)}")
    print(f"data: {args.data}, batch {args.batch}, float32, median of {args.steps} steps\n")
    forwarded = ["--data", args.data, "--batch", str(args.batch), "--steps", str(args.steps),
                 "--threads", str(args.threads), "--seed", str(args.seed)]
    results = {}
    for domain in domains:
        print(f"running {domain} ...", file=sys.stderr, flush=True)
        results[domain] = _common.run_isolated(str(Path(__file__)), [*forwarded, "--worker", domain])
    base = results.get("real")
    rows = []
    for d in domains:
        r = results[d]
        rows.append([d, r["train_step_s"], r["train_step_s"] / base["train_step_s"] if base else float("nan"),
                     r["infer_s"], r["infer_s"] / base["infer_s"] if base else float("nan"), r["rss_peak_mb"]])
    first = results[domains[0]]
    print(f"{first['atoms']} atoms, {first['pairs']} atom pairs (all pairs of each crystal), "
          f"{first['waves']} reciprocal vectors (half-space) in the batch\n")
    print(_common.table(["domain", "training step, s", "× real", "inference, s", "× real", "peak RSS, MiB"], rows))


if __name__ == "__main__":
    main()
