"""Cost of reciprocal-space heads: one training step per domain on the same MP structures.

    python benchmarks/bench_reciprocal.py --data PATH/flla_2015.csv [--threads 1] [--rounds 5]

Paper-default architecture (4 blocks, 8 heads × 16), float32, one batch of 128 structures
(``_common.load_structures``, seed 0). One model per domain; each round times one training
step (forward, L1 loss, backward, gradient clipping, AdamW step) and one inference pass of
every domain in turn, so that all domains see the same machine load (a shared machine
makes absolute times drift; the per-round ratios to the real domain drift much less).
Prints medians over rounds, after a warm-up round; asserts nothing about time.
"""

from __future__ import annotations

import argparse

import _common
import torch

DOMAINS = ("real", "reciprocal", "alternating", "dual", "routed")


def main() -> None:
    from ase_crystalformer import Crystalformer, ModelConfig
    from ase_crystalformer.geometry import collate, windows_for
    from ase_crystalformer.reciprocal import PAD_K2, reciprocal_geometry

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=_common.default_data(), help="flla_2015.csv")
    parser.add_argument("--domains", default=",".join(DOMAINS), help="real first: the baseline")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    torch.set_num_threads(args.threads)
    print(f"machine: {_common.machine(args.threads)}")
    print(f"data: {args.data}, batch {args.batch}, float32, median of {args.rounds} rounds\n")

    atoms, energy = _common.load_structures(args.data, args.batch, args.seed)
    batch = collate(windows_for(atoms, ModelConfig().cutoff))
    y = torch.tensor(energy, dtype=torch.float32)
    y = (y - y.mean()) / y.std()
    models, optimizers = {}, {}
    for domain in domains:
        torch.manual_seed(0)
        models[domain] = Crystalformer(ModelConfig(domain=domain)).train()
        optimizers[domain] = torch.optim.AdamW(models[domain].parameters(), lr=5e-4, betas=(0.9, 0.98))

    def step(domain: str) -> None:
        model, optimizer = models[domain], optimizers[domain]
        model.train()
        loss = (model(batch)[:, 0] - y).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def infer(domain: str) -> None:
        models[domain].eval()
        with torch.no_grad():
            models[domain](batch)

    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (and fixes the σ standardisation)
        for domain in domains:
            for what, fn in (("train", step), ("infer", infer)):
                t = _common.seconds(lambda fn=fn, domain=domain: fn(domain))
                if r:
                    times.setdefault((what, domain), []).append(t)

    def ratio(what: str, domain: str) -> float:
        pairs = zip(times[(what, domain)], times[(what, domains[0])])
        return _common.median([a / b for a, b in pairs])

    waves = int(sum((b.k2 < PAD_K2).sum() for b in reciprocal_geometry(batch, ModelConfig()).blocks))
    print(f"{int(batch.n_atoms.sum())} atoms, {int((batch.n_atoms**2).sum())} atom pairs (all pairs of each "
          f"crystal), {waves} reciprocal vectors (half-space) in the batch\n")
    rows = [[d, _common.median(times[("train", d)]), ratio("train", d),
             _common.median(times[("infer", d)]), ratio("infer", d)] for d in domains]
    print(_common.table(["domain", "training step, s", f"× {domains[0]} (per round)", "inference, s",
                         f"× {domains[0]} (per round)"], rows))
    print(f"\nload average at the end: {__import__('os').getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
