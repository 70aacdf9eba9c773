"""Record the training domain in a checkpoint trained before training recorded it.

    python scripts/stamp_domain.py --model NAME --data SOURCE [--data-dir ../shared/data]

Loads SOURCE with the model's targets and the usual split (as ``crystalformer evaluate``),
refuses unless the training ids hash to the checkpoint's ``train_ids_sha256``, then rewrites
the checkpoint with ``metadata["domain"]`` (``ase_crystalformer.domain.training_domain`` of
the training structures). Weights and every other metadata field are unchanged.
"""

from __future__ import annotations

import argparse

from ase_crystalformer.checkpoint import model_path, read_checkpoint, save_checkpoint
from ase_crystalformer.data import load_dataset
from ase_crystalformer.domain import training_domain
from ase_crystalformer.evaluation import split_indices
from ase_crystalformer.training import ids_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    path = model_path(args.model)
    model, metadata = read_checkpoint(path)
    dataset = load_dataset(args.data, [t.name for t in model.config.targets], data_dir=args.data_dir)
    train = [dataset.records[i] for i in split_indices(dataset, "train")]
    digest = ids_digest([r.id for r in train])
    if digest != metadata.get("train_ids_sha256"):
        raise SystemExit(f"{path}: the training ids of {args.data} do not match the checkpoint's; not stamped")
    metadata["domain"] = training_domain(r.atoms.numbers for r in train)
    save_checkpoint(model, path, metadata)
    print(f"{path}: domain {metadata['domain']['n_atoms']} atoms, {len(metadata['domain']['elements'])} elements")


if __name__ == "__main__":
    main()
