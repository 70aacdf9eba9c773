"""`--workers N` of predict and featurize: the same output as one process, in input order,
bad inputs reported (or stopping the run) exactly as with one worker."""

from __future__ import annotations

import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import write
from click.testing import CliRunner

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.checkpoint import save_checkpoint
from ase_crystalformer.cli import main
from ase_crystalformer.workers import ordered_map


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model and five frames, the third of them two overlapping atoms."""
    root = tmp_path_factory.mktemp("workers")
    config = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, targets=(TargetSpec("band_gap", "eV"),))
    save_checkpoint(Crystalformer(config), root / "gap.safetensors")
    overlapping = Atoms("H2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=[3, 3, 3], pbc=True)
    frames = [bulk("Si"), bulk("Cu"), overlapping, bulk("NaCl", "rocksalt", 5.64), bulk("MgO", "rocksalt", 4.21)]
    write(root / "frames.extxyz", frames)
    return root


def _run(args: list[str]):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("command", ["predict", "featurize"])
def test_two_workers_give_what_one_gives(inputs, command):
    base = [command, str(inputs / "frames.extxyz"), "--model", str(inputs / "gap.safetensors"), "--batch-size", "2"]
    if command == "featurize":
        base += ["--mode", "both"]
    runs = {}
    for workers in ("1", "2"):
        out = inputs / f"{command}-{workers}.csv"
        runs[workers] = _run([*base, "--ignore-errors", "--out", str(out), "--workers", workers])
        runs[workers] = (*runs[workers], out.read_text())
    code, stdout, stderr, text = runs["1"]
    assert code == 0, stderr
    assert "atom 0 is 0.01 Å from atom 1" in text and text.count("\n") == 6  # header and five rows
    assert runs["2"][0] == 0 and runs["2"][3] == text  # bit-identical numbers, same order, same error
    assert runs["2"][1:3] == (stdout.replace(f"{command}-1.csv", f"{command}-2.csv"), stderr.replace(f"{command}-1.csv", f"{command}-2.csv"))

    # without --ignore-errors the overlapping frame stops the run, with the same message
    stopped = [_run([*base, "--out", str(inputs / "stopped.csv"), "--workers", w]) for w in ("1", "2")]
    assert stopped[0][0] == stopped[1][0] == 1
    assert "0.01 Å from atom 1" in stopped[0][2] and stopped[1][2] == stopped[0][2]


def _setup(offset: int) -> int:
    return offset


def _add(offset: int, item: int) -> int:
    if item == 3:
        raise ValueError("item 3")
    return item + offset


def test_ordered_map_keeps_order_and_raises_where_one_process_would():
    assert list(ordered_map(_add, [5, 1, 4, 2], 2, _setup, (10,))) == [15, 11, 14, 12]
    results = ordered_map(_add, [1, 3, 2], 2, _setup, (0,))
    assert next(results) == 1
    with pytest.raises(ValueError, match="item 3"):
        next(results)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        list(ordered_map(_add, [1], 0, _setup))


def test_predict_primitive_predicts_the_primitive_cell(inputs, tmp_path):
    import numpy as np
    import pandas as pd

    from ase_crystalformer.checkpoint import load_model

    si = bulk("Si")
    write(tmp_path / "si222.cif", si.repeat((2, 2, 2)))
    out = tmp_path / "p.csv"
    code, _, stderr = _run(["predict", str(tmp_path / "si222.cif"), "--model", str(inputs / "gap.safetensors"),
                            "--primitive", "--out", str(out)])
    assert code == 0, stderr
    expected = load_model(inputs / "gap.safetensors").predict([si])
    np.testing.assert_allclose(pd.read_csv(out)["band_gap (eV)"], expected, rtol=1e-5)
    assert pd.read_csv(out)["formula"][0] == "Si16"  # the input's formula, not the primitive cell's
