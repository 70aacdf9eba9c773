"""A structure cell that would exhaust ``ast`` (deep nesting) is one reported row of
``crystalformer featurize --ignore-errors``, not a run that writes nothing."""

import pandas as pd
from click.testing import CliRunner
from test_data import crystals, user_frame  # tests/ is on sys.path (conftest.py)

from ase_crystalformer import ModelConfig, TargetSpec
from ase_crystalformer.checkpoint import save_checkpoint
from ase_crystalformer.cli import main
from ase_crystalformer.model import Crystalformer

TINY = ModelConfig(n_blocks=1, d_model=16, n_heads=2, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=7.0,
                   targets=(TargetSpec("y", "eV"),))


def test_featurize_reports_a_deeply_nested_cell_and_writes_the_other_rows(tmp_path):
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(Crystalformer(TINY), model)
    frame = user_frame(crystals())
    frame["cif"] = frame["cif"].astype(object)
    frame.loc[1, "cif"] = "{'a': " + "-" * 100_000 + "1}"  # ast: MemoryError
    table = tmp_path / "in.csv"
    frame.to_csv(table, index=False)
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(main, ["featurize", str(table), "--column", "cif", "--out", str(out),
                                       "--model", str(model), "--mode", "predictions", "--device", "cpu",
                                       "--ignore-errors"])
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out)
    assert written["crystalformer_error"].isna().tolist() == [True, False, True]
    assert written["crystalformer_error"][1] == (
        f"{table}@1: cannot read the structure "
        "(structure dict nested too deeply to read as a Python literal)"
    )
    assert written.filter(like="crystalformer").drop(columns="crystalformer_error").iloc[[0, 2]].notna().all().all()
