"""Add the integrity digest to checkpoints written before ``save_checkpoint`` recorded one.

    python scripts/stamp_digest.py checkpoints/*/model.safetensors

Each file must pass every other check of ``read_checkpoint`` first. It is then rewritten with
``sha256`` (``checkpoint.tensors_digest``) added to its header: every other header entry is
kept as it is, and the tensors are compared byte for byte with the original before the new
file replaces it. A file that already carries a digest is left alone.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ase_crystalformer.checkpoint import DIGEST_KEY, read_checkpoint, tensors_digest


def _raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {}), {k: handle.get_tensor(k) for k in handle.keys()}


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def stamp(path: Path) -> str:
    """Add the digest to ``path``; return what was done."""
    header, tensors = _raw(path)
    if DIGEST_KEY in header:
        return "already stamped"
    with warnings.catch_warnings():  # the missing digest is what we are fixing
        warnings.simplefilter("ignore", UserWarning)
        read_checkpoint(path)  # raises CheckpointError for anything else wrong with it
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**header, DIGEST_KEY: tensors_digest(header["config"], tensors)})
    new_header, new_tensors = _raw(tmp)
    same = (
        {k: v for k, v in new_header.items() if k != DIGEST_KEY} == header
        and new_tensors.keys() == tensors.keys()
        and all(
            new_tensors[k].dtype == t.dtype and new_tensors[k].shape == t.shape and _bytes(new_tensors[k]) == _bytes(t)
            for k, t in tensors.items()
        )
    )
    if not same:
        tmp.unlink()
        raise SystemExit(f"{path}: the rewritten file differs from the original; not stamped")
    read_checkpoint(tmp)  # verifies the digest just written
    os.replace(tmp, path)
    return f"stamped {new_header[DIGEST_KEY][:12]}…, {len(tensors)} tensors bit-identical"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    for path in parser.parse_args().paths:
        print(f"{path}: {stamp(path)}")


if __name__ == "__main__":
    main()
