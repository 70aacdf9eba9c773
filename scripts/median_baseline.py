"""Test MAE of the median predictor: the training split's median for every structure.

    python scripts/median_baseline.py --model NAME --data SOURCE [--data-dir ../shared/data]

Uses the model's targets (names and log10 transforms) and the same split as
``crystalformer evaluate``, so the numbers sit next to each model's test MAE in
docs/results.md. Structures are not needed, only the labels, but the dataset is loaded
the usual way so that the split is exactly the evaluated one.
"""

from __future__ import annotations

import argparse

import numpy as np

from ase_crystalformer.checkpoint import load_model
from ase_crystalformer.data import load_dataset
from ase_crystalformer.evaluation import regression_metrics, split_indices
from ase_crystalformer.training import transform_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    specs = load_model(args.model).config.targets
    dataset = load_dataset(args.data, [s.name for s in specs], data_dir=args.data_dir)

    def labels(split: str) -> np.ndarray:
        rows = [[dataset.records[i].targets.get(s.name, np.nan) for s in specs] for i in split_indices(dataset, split)]
        return transform_targets(np.array(rows, dtype=float), specs)

    train, held_out = labels("train"), labels(args.split)
    for t, spec in enumerate(specs):
        median = np.nanmedian(train[:, t])
        known = np.isfinite(held_out[:, t])
        m = regression_metrics(held_out[known, t], np.full(known.sum(), median))
        unit = f"log10({spec.unit})" if spec.transform == "log10" else spec.unit
        print(f"{spec.name} [{args.split}, n={m['n']}]: median predictor MAE {m['mae']:.4g} {unit} (train median {median:.4g})")


if __name__ == "__main__":
    main()
