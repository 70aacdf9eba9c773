"""Write a dataset (built-in name or file) to one extxyz file that trains anywhere.

Each frame carries its ``id``, its targets and its ``split`` in ``atoms.info``, which
``crystalformer train --data FILE.extxyz`` reads back as the source's own split. Used to take
the built-in datasets to a machine without ``../shared/data`` (e.g. a rented GPU).

    python scripts/export_extxyz.py mp-megnet runs/mp-megnet.extxyz --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

from ase.io import write

from ase_crystalformer.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--data-dir")
    parser.add_argument("--target", action="append", dest="targets")
    args = parser.parse_args()
    dataset = load_dataset(args.source, args.targets, data_dir=args.data_dir)
    split_of = {i: name for name, indices in dataset.splits.items() for i in indices}
    frames = []
    for index, record in enumerate(dataset.records):
        if index not in split_of:
            continue  # in no split: never used for training or evaluation
        atoms = record.atoms.copy()
        atoms.info = {"id": record.id, "split": split_of[index], **record.targets}
        frames.append(atoms)
    write(args.out, frames, format="extxyz")
    sizes = {k: len(v) for k, v in dataset.splits.items()}
    print(f"wrote {len(frames)} structures to {args.out}; splits {sizes}; skipped {len(dataset.skipped)}")


if __name__ == "__main__":
    main()
