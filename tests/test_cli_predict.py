"""`crystalformer predict`: every ase.io format, several frames per file, three output formats."""

import json

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import write
from click.testing import CliRunner

from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.checkpoint import save_checkpoint
from ase_crystalformer.cli import main


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    config = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, targets=(TargetSpec("band_gap", "eV"),))
    path = tmp_path_factory.mktemp("model") / "gap.safetensors"
    save_checkpoint(Crystalformer(config), path)
    return path


def test_predict_reads_cif_poscar_and_multi_frame_extxyz(tmp_path, model_path):
    si, nacl, cu = bulk("Si"), bulk("NaCl", "rocksalt", 5.64), bulk("Cu")
    write(tmp_path / "si.cif", si)
    write(tmp_path / "POSCAR", nacl, format="vasp")
    write(tmp_path / "frames.extxyz", [cu, si])
    files = [str(tmp_path / n) for n in ("si.cif", "POSCAR", "frames.extxyz")]
    result = CliRunner().invoke(main, ["predict", *files, "--model", str(model_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["structure"] for r in rows] == [files[0], files[1], f"{files[2]}@0", f"{files[2]}@1"]
    values = [r["band_gap (eV)"] for r in rows]
    from ase_crystalformer.checkpoint import load_model

    expected = load_model(model_path).predict([si, nacl, cu, si])
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert values[0] == pytest.approx(values[3], rel=1e-6)  # the same crystal from two formats


def test_predict_csv_and_table(tmp_path, model_path):
    write(tmp_path / "si.cif", bulk("Si"))
    runner = CliRunner()
    csv = runner.invoke(main, ["predict", str(tmp_path / "si.cif"), "--model", str(model_path), "--format", "csv"])
    assert csv.exit_code == 0 and csv.output.splitlines()[0] == "structure,formula,band_gap (eV)"
    table = runner.invoke(main, ["predict", str(tmp_path / "si.cif"), "--model", str(model_path)])
    assert table.exit_code == 0 and "Si2" in table.output


def test_predict_reports_bad_structures_and_files(tmp_path, model_path):
    from ase import Atoms

    write(tmp_path / "si.cif", bulk("Si"))
    write(tmp_path / "bad.extxyz", [bulk("Cu"), Atoms("H2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=[3, 3, 3], pbc=True)])
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "si.cif"), str(tmp_path / "bad.extxyz"), "--model", str(model_path)])
    assert result.exit_code != 0
    assert f"{tmp_path / 'bad.extxyz'}@1 (H2): atom 0 is 0.01 Å from atom 1 (overlapping" in result.output
    (tmp_path / "junk.cif").write_text("not a cif")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "junk.cif"), "--model", str(model_path)])
    assert result.exit_code != 0 and "junk.cif" in result.output
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "si.cif"), "--model", "no-such-model"])
    assert result.exit_code != 0 and "no-such-model" in result.output
    for device, message in [("gpu0", "Invalid value for '--device'"), ("cuda", "CUDA is not available")]:
        if device == "cuda" and torch.cuda.is_available():
            continue
        result = CliRunner().invoke(main, ["predict", str(tmp_path / "si.cif"), "--model", str(model_path), "--device", device])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_predict_keeps_two_models_with_the_same_file_name_apart(tmp_path, model_path):
    config = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, targets=(TargetSpec("band_gap", "eV"),))
    torch.manual_seed(1)
    other = save_checkpoint(Crystalformer(config), tmp_path / "other" / "gap.safetensors")
    write(tmp_path / "si.cif", bulk("Si"))
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "si.cif"), "--model", str(model_path), "--model", str(other), "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    from ase_crystalformer.checkpoint import load_model

    assert row["band_gap (eV)"] == pytest.approx(float(load_model(model_path).predict(bulk("Si"))[0]), rel=1e-6)
    assert row["band_gap_gap (eV)"] == pytest.approx(float(load_model(other).predict(bulk("Si"))[0]), rel=1e-6)
