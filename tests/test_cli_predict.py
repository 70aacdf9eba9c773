"""`crystalformer predict`: every ase.io format, folders and tables (as featurize reads them),
several frames per file, three output formats, bad inputs reported, notes after the output."""

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

    assert row["band_gap (eV)"] == pytest.approx(float(load_model(model_path).predict(bulk("Si"))[0]), rel=1e-5)  # float32 noise on a small value
    assert row["band_gap_gap (eV)"] == pytest.approx(float(load_model(other).predict(bulk("Si"))[0]), rel=1e-5)  # float32 noise on a small value


def _cif_text(atoms) -> str:
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    return str(CifWriter(AseAtomsAdaptor.get_structure(atoms)))


def test_predict_and_featurize_read_folders_and_tables_alike(tmp_path, model_path):
    import pandas as pd
    from pymatgen.io.ase import AseAtomsAdaptor

    from ase_crystalformer.checkpoint import load_model

    si, nacl, cu, mgo = bulk("Si"), bulk("NaCl", "rocksalt", 5.64), bulk("Cu"), bulk("MgO", "rocksalt", 4.21)
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "b_si.cif", si)
    write(folder / "a_POSCAR", nacl, format="vasp")
    (folder / ".hidden").write_text("not a structure")
    pd.DataFrame({"id": ["x", "y"], "cif": [_cif_text(cu), _cif_text(mgo)]}).to_csv(tmp_path / "t.csv", index=False)
    records = [{"s": AseAtomsAdaptor.get_structure(a).as_dict()} for a in (mgo, si)]
    (tmp_path / "t.json").write_text(json.dumps(records))
    (tmp_path / "cu.json").write_text(json.dumps(AseAtomsAdaptor.get_structure(cu).as_dict()))
    write(tmp_path / "db.json", [si, nacl], format="json")  # an ASE database: not a table
    model = load_model(model_path)

    args = ["predict", str(folder), str(tmp_path / "t.csv"), "--model", str(model_path), "--column", "cif", "--format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["structure"] for r in rows] == [str(folder / "a_POSCAR"), str(folder / "b_si.cif"), f"{tmp_path / 't.csv'}@0", f"{tmp_path / 't.csv'}@1"]
    assert [r["formula"] for r in rows] == ["ClNa", "Si2", "Cu", "MgO"]
    np.testing.assert_allclose([r["band_gap (eV)"] for r in rows], model.predict([nacl, si, cu, mgo]), rtol=1e-5)

    args = ["predict", *(str(tmp_path / n) for n in ("t.json", "cu.json", "db.json")), "--model", str(model_path),
            "--column", "s", "--format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["structure"] for r in rows] == [f"{tmp_path / 't.json'}@0", f"{tmp_path / 't.json'}@1", str(tmp_path / "cu.json"),
                                              f"{tmp_path / 'db.json'}@0", f"{tmp_path / 'db.json'}@1"]
    np.testing.assert_allclose([r["band_gap (eV)"] for r in rows], model.predict([mgo, si, cu, si, nacl]), rtol=1e-5)

    # featurize reads the same folder (one row per structure, labelled as predict labels them)
    result = CliRunner().invoke(main, ["featurize", str(folder), "--model", str(model_path), "--mode", "predictions",
                                       "--out", str(tmp_path / "f.csv")])
    assert result.exit_code == 0, result.output
    out = pd.read_csv(tmp_path / "f.csv")
    assert list(out["structure"]) == [str(folder / "a_POSCAR"), str(folder / "b_si.cif")]
    np.testing.assert_allclose(out["crystalformer band_gap"], model.predict([nacl, si]), rtol=1e-5)

    result = CliRunner().invoke(main, ["predict", str(tmp_path / "t.csv"), "--model", str(model_path)])
    assert result.exit_code != 0 and "no column 'structure'" in result.output and "--column" in result.output


def test_corrupt_cif_files_and_cells_say_they_could_not_be_parsed(tmp_path, model_path):
    import pandas as pd

    write(tmp_path / "nacl.cif", bulk("NaCl", "rocksalt", 5.64))  # as ase writes it
    text = (tmp_path / "nacl.cif").read_text()
    (tmp_path / "truncated.cif").write_text(text[: len(text) // 2])  # ase: IndexError: pop from empty list
    (tmp_path / "no_data_line.cif").write_text(text.split("\n", 1)[1])  # ase: a bare AssertionError
    (tmp_path / "empty.cif").write_text("data_empty\nloop_\n")  # ase: no structures at all
    for name, detail in [("truncated.cif", "(IndexError: pop from empty list)"), ("no_data_line.cif", "(AssertionError)"),
                         ("empty.cif", "no structure found in this CIF file")]:
        result = CliRunner().invoke(main, ["predict", str(tmp_path / name), "--model", str(model_path)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"Error: {tmp_path / name}: " in result.output and detail in result.output
        assert "could not be parsed as CIF" in result.output or "no structure found" in result.output
        assert "may be truncated or corrupt" in result.output and "--ignore-errors" in result.output
    pd.DataFrame({"structure": [text, text[: len(text) // 2]]}).to_csv(tmp_path / "t.csv", index=False)
    result = CliRunner().invoke(main, ["featurize", str(tmp_path / "t.csv"), "--model", str(model_path), "--out", str(tmp_path / "o.csv")])
    assert result.exit_code == 1 and f"{tmp_path / 't.csv'}@1: cannot read the structure (cannot parse CIF text" in result.output


def test_predict_ignore_errors_reports_each_bad_input_and_predicts_the_rest(tmp_path, model_path):
    import pandas as pd
    from ase import Atoms

    from ase_crystalformer.checkpoint import load_model

    si, cu = bulk("Si"), bulk("Cu")
    write(tmp_path / "si.cif", si)
    (tmp_path / "bad.cif").write_text(_cif_text(cu)[:200])
    write(tmp_path / "frames.extxyz", [cu, Atoms("H2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=[3, 3, 3], pbc=True)])
    files = [str(tmp_path / n) for n in ("si.cif", "bad.cif", "frames.extxyz")]
    out = tmp_path / "sub" / "out.csv"
    result = CliRunner().invoke(main, ["predict", *files, "--model", str(model_path), "--ignore-errors", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # the table went to --out
    table = pd.read_csv(out)
    assert list(table.columns) == ["structure", "formula", "band_gap (eV)", "error"]
    assert list(table["structure"]) == [files[0], files[1], f"{files[2]}@0", f"{files[2]}@1"]
    expected = load_model(model_path).predict([si, cu])
    np.testing.assert_allclose(table["band_gap (eV)"][[0, 2]], expected, rtol=1e-5)
    assert table["band_gap (eV)"][[1, 3]].isna().all() and table["error"][[0, 2]].isna().all()
    assert table["error"][1].startswith(f"{files[1]}: could not be parsed as CIF")
    assert table["error"][3].startswith(f"{files[2]}@1 (H2): atom 0 is 0.01 Å from atom 1 (overlapping")
    assert result.stderr.splitlines() == [
        "skipped 2 of 4 input(s) that could not be predicted:",
        f"  {table['error'][1]}",
        f"  {table['error'][3]}",
        f"wrote predictions for 2 of 4 structure(s) to {out}",
    ]
    result = CliRunner().invoke(main, ["predict", files[1], "--model", str(model_path), "--ignore-errors", "--format", "json"])
    assert result.exit_code == 1 and "no structure could be predicted" in result.stderr
    (row,) = json.loads(result.stdout)
    assert row["band_gap (eV)"] is None and "could not be parsed as CIF" in row["error"]


def test_notes_come_after_the_output_and_the_output_ends_with_a_newline(tmp_path):
    """On a terminal stdout and stderr share one screen: a note must never land inside, or
    glued to, the last line of the table. CliRunner's ``output`` is both streams in order."""
    config = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, targets=(TargetSpec("band_gap", "eV"),))
    path = save_checkpoint(Crystalformer(config), tmp_path / "si-only.safetensors", {"domain": {"elements": ["Si"], "n_atoms": [1, 8]}})
    write(tmp_path / "si.cif", bulk("Si"))
    write(tmp_path / "nacl.cif", bulk("NaCl", "rocksalt", 5.64))
    for fmt in ("csv", "json", "table"):
        result = CliRunner().invoke(main, ["predict", str(tmp_path / "si.cif"), str(tmp_path / "nacl.cif"), "--model", str(path), "--format", fmt])
        assert result.exit_code == 0, result.output
        assert result.stdout.endswith("\n") and result.output == result.stdout + result.stderr
        assert result.stderr.splitlines() == [
            "note: si-only: 1 of 2 structure(s) lie outside its training domain, left empty; --extrapolate prints them:",
            f"  {tmp_path / 'nacl.cif'} (ClNa): no Na, Cl in its training set",
        ]
    assert result.stdout.splitlines()[-1].split()[-1] == "-"  # NaCl's cell left empty


def test_progress_bar_goes_to_stderr_only_when_asked_or_on_a_terminal(tmp_path, model_path):
    write(tmp_path / "frames.extxyz", [bulk("Si"), bulk("Cu"), bulk("Si")])
    args = ["predict", str(tmp_path / "frames.extxyz"), "--model", str(model_path), "--format", "csv", "--batch-size", "1"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0 and plain.stderr == ""  # not a terminal, few structures: no bar
    shown = CliRunner().invoke(main, [*args, "--progress"])
    assert shown.exit_code == 0 and shown.stdout == plain.stdout
    assert "0/3 [" in shown.stderr and "structure/s" in shown.stderr
