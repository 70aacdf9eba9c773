"""Write a dataset (built-in name or file), or several merged, to one extxyz file that trains anywhere.

Each frame carries its ``id``, its targets and its ``split`` in ``atoms.info``, which
``crystalformer train --data FILE.extxyz`` reads back as the source's own split. Used to take
the built-in datasets to a machine without ``../shared/data`` (e.g. a rented GPU), and to
train one target from several sources of the same label scheme:

    python scripts/export_extxyz.py mp-megnet runs/mp-megnet.extxyz --data-dir ../shared/data
    python scripts/export_extxyz.py mp-li mp40 runs/mp-ehull.extxyz --data-dir ../shared/data \\
        --target energy_above_hull

Several sources are merged by id: each source is split as its loader splits it, an id found
in more than one takes its most held-out role (test > val > train; for sources without a
split of their own, as mp-li and mp40, this is ``data.multitask``'s rule, whose
``SHIPPED_HOLDOUTS`` then keeps those test ids out of a backbone), and its structure and
labels from the first source that has it (the count of differing labels is printed).
"""

from __future__ import annotations

import argparse

from ase.io import write

from ase_crystalformer.data import load_dataset

RANK = {"train": 0, "val": 1, "test": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", metavar="SOURCE... OUT")
    parser.add_argument("--data-dir")
    parser.add_argument("--target", action="append", dest="targets")
    args = parser.parse_args()
    if len(args.sources) < 2:
        parser.error("give at least one SOURCE and the OUT file")
    *sources, out = args.sources
    frames, role, conflicts = {}, {}, 0
    for source in sources:
        dataset = load_dataset(source, args.targets, data_dir=args.data_dir)
        for name, indices in dataset.splits.items():
            for index in indices:  # an id in no split is never used for training or evaluation
                record = dataset.records[index]
                if record.id not in frames:
                    frames[record.id] = record.atoms.copy()
                    frames[record.id].info = {"id": record.id, **record.targets}
                else:
                    kept = frames[record.id].info
                    conflicts += any(k in kept and abs(kept[k] - v) > 1e-6 for k, v in record.targets.items())
                if RANK[name] > RANK.get(role.get(record.id, "train"), 0) or record.id not in role:
                    role[record.id] = name
        print(f"{source}: {sum(map(len, dataset.splits.values()))} structures in splits, skipped {len(dataset.skipped)}")
    for rid, atoms in frames.items():
        atoms.info["split"] = role[rid]
    write(out, list(frames.values()), format="extxyz")
    sizes = {name: sum(r == name for r in role.values()) for name in RANK}
    print(f"wrote {len(frames)} structures to {out}; splits {sizes}; "
          f"{conflicts} ids with labels differing between sources (the first source's kept)")


if __name__ == "__main__":
    main()
