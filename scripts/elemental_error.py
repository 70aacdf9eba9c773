"""MAE on elemental solids against the rest, for the weak spot named in the mp-e_form card.

    python scripts/elemental_error.py --model NAME --data SOURCE [--data-dir ../shared/data] [--split val]

A formation-energy model sees few pure elements in training, and their zero is a choice of
polymorph it cannot know; this prints how many elemental structures the training split has
and the split's MAE for elemental and other structures, with ``evaluation.evaluate`` (the
code behind ``crystalformer evaluate``), so the numbers match its per-structure table.
"""

from __future__ import annotations

import argparse

from ase_crystalformer.checkpoint import load_model
from ase_crystalformer.data import load_dataset
from ase_crystalformer.evaluation import evaluate, split_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    model = load_model(args.model)
    dataset = load_dataset(args.data, [s.name for s in model.config.targets], data_dir=args.data_dir)
    elemental = {r.id for r in dataset.records if len(set(r.atoms.numbers)) == 1}
    in_train = sum(dataset.records[i].id in elemental for i in split_indices(dataset, "train"))
    print(f"train: {in_train} elemental of {len(split_indices(dataset, 'train'))} structures")

    _, table, _ = evaluate(model, dataset, args.split)
    is_elemental = table["id"].isin(elemental)
    for spec in model.config.targets:
        error = (table[f"{spec.name}_pred"] - table[f"{spec.name}_true"]).abs()
        for label, rows in (("elemental", is_elemental), ("other", ~is_elemental)):
            print(f"{args.split} {spec.name} {label}: n={int(rows.sum())} MAE {error[rows].mean():.4g} {spec.unit}")


if __name__ == "__main__":
    main()
