"""Is model A's MAE different from model B's on the same structures? A paired bootstrap.

    python scripts/paired_bootstrap.py A/predictions.csv B/predictions.csv --target k_vrh

Reads two ``crystalformer evaluate --out-dir`` tables of one split, pairs them by id, and
resamples the structures (with replacement) to give the difference of the two MAEs (A − B)
with its standard error and 95 % interval: a validation difference well inside the interval
is a tie, which is how the model cards decide between candidates that close.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="predictions.csv of model A")
    parser.add_argument("b", help="predictions.csv of model B")
    parser.add_argument("--target", required=True, help="target column stem: <target>_true, <target>_pred")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    a, b = (pd.read_csv(p).set_index("id") for p in (args.a, args.b))
    if set(a.index) != set(b.index):
        raise SystemExit(f"the tables hold different structures ({len(a)} and {len(b)} ids): not the same split")
    b = b.loc[a.index]
    true, pred = f"{args.target}_true", f"{args.target}_pred"
    diff = (a[pred] - a[true]).abs().to_numpy() - (b[pred] - b[true]).abs().to_numpy()
    rng = np.random.default_rng(args.seed)
    boots = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(args.resamples)])
    low, high = np.percentile(boots, [2.5, 97.5])
    print(f"n {len(diff)}: MAE A − B = {diff.mean():+.5f}, bootstrap se {boots.std():.5f}, "
          f"95 % interval [{low:+.5f}, {high:+.5f}] ({args.resamples} resamples, seed {args.seed})")


if __name__ == "__main__":
    main()
