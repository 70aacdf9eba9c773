"""The matminer featurizer: values, labels, and matminer's error semantics with batching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from ase import Atoms
from ase.build import bulk

pytest.importorskip("matminer")
from matminer.featurizers.base import BaseFeaturizer
from pymatgen.io.ase import AseAtomsAdaptor
from sklearn.base import clone

from ase_crystalformer import (
    Crystalformer,
    ModelConfig,
    StructureError,
    TargetSpec,
    inference,
)
from ase_crystalformer.featurizer import CrystalformerFeaturizer


def tiny_model() -> Crystalformer:
    torch.manual_seed(0)
    config = ModelConfig(
        n_blocks=1, d_model=16, n_heads=4, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=7.0,
        targets=(TargetSpec("e_form", "eV/atom"), TargetSpec("bandgap", "eV")),
    )
    return Crystalformer(config).eval()


@pytest.fixture(scope="module")
def model() -> Crystalformer:
    return tiny_model()


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """Three good structures (pymatgen and ASE) and one with overlapping atoms in row 2."""
    nacl = AseAtomsAdaptor.get_structure(bulk("NaCl", "rocksalt", 5.64))
    si = bulk("Si", "diamond", 5.43)
    broken = Atoms("Na2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=np.eye(3) * 4, pbc=True)
    mgo = AseAtomsAdaptor.get_structure(bulk("MgO", "rocksalt", 4.21))
    return pd.DataFrame({"structure": [nacl, si, broken, mgo], "y": [1.0, 2.0, 3.0, 4.0]})


def test_features_are_the_model_embedding_and_predictions(model, frame) -> None:
    feat = CrystalformerFeaturizer(model, mode="both", device="cpu", pooling="mean")
    good = [frame.structure[i] for i in (0, 1, 3)]
    with torch.no_grad():
        emb = model.embed(model.make_batch(good)).numpy()
    pred = model.predict(good)
    for k, s in enumerate(good):
        row = np.array(feat.featurize(s))
        np.testing.assert_allclose(row[:16], emb[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row[16:], pred[k], rtol=1e-5, atol=1e-6)
    labels = feat.feature_labels()
    assert labels[0] == "crystalformer emb 0" and len(labels) == 18
    assert labels[16:] == ["crystalformer formation_energy_per_atom", "crystalformer band_gap"]
    assert len(CrystalformerFeaturizer(model, mode="predictions").feature_labels()) == 2
    # The default keeps every statistic, the mean's d columns first.
    default = CrystalformerFeaturizer(model, device="cpu")
    assert default.pooling == ("mean", "max", "min", "std") and len(default.feature_labels()) == 4 * 16
    np.testing.assert_allclose(np.array(default.featurize(good[0]))[:16], emb[0], rtol=1e-5, atol=1e-6)


def test_batched_equals_matminers_one_by_one_path(model, frame) -> None:
    feat = CrystalformerFeaturizer(model, device="cpu", batch_size=2)
    ours = feat.featurize_many(frame.structure, ignore_errors=True, return_errors=True, pbar=False)
    reference = BaseFeaturizer.featurize_many(
        feat, frame.structure, ignore_errors=True, return_errors=True, pbar=False
    )
    assert len(ours) == len(reference) == 4
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(np.array(a[:-1], float), np.array(b[:-1], float), rtol=1e-5, atol=1e-6)
        if isinstance(b[-1], str):
            assert isinstance(a[-1], str) and "overlapping" in a[-1] and "StructureError" in a[-1]
        else:
            assert np.isnan(a[-1])


def test_featurize_dataframe_error_semantics(model, frame) -> None:
    feat = CrystalformerFeaturizer(model, device="cpu")
    with pytest.raises(StructureError, match="overlapping") as info:
        feat.featurize_dataframe(frame, "structure", pbar=False)
    assert "TO SKIP THESE ERRORS" in str(info.value)

    out = feat.featurize_dataframe(frame, "structure", ignore_errors=True, pbar=False)
    emb = out[feat.feature_labels()].to_numpy(float)
    assert np.isnan(emb[2]).all() and np.isfinite(emb[[0, 1, 3]]).all()
    assert list(out.columns[:2]) == ["structure", "y"]

    out = feat.featurize_dataframe(frame, "structure", ignore_errors=True, return_errors=True, pbar=False)
    errors = out["CrystalformerFeaturizer Exceptions"]
    assert "overlapping" in errors[2] and errors[[0, 1, 3]].isna().all()

    with pytest.raises(ValueError, match="ignore_errors"):
        feat.featurize_dataframe(frame, "structure", return_errors=True, pbar=False)
    assert feat.featurize_many([], pbar=False) == []


def test_single_structure_errors_are_raised_unchanged(model) -> None:
    feat = CrystalformerFeaturizer(model, device="cpu")
    molecule = Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])
    assert not feat.precheck(molecule) and feat.precheck(bulk("Cu"))
    with pytest.raises(StructureError, match="no periodic axis") as info:
        feat.featurize(molecule)
    assert "TO SKIP" not in str(info.value)
    with pytest.raises(TypeError, match="expected ase.Atoms"):
        feat.featurize("not a structure")


def test_matminer_and_sklearn_contract(model, monkeypatch) -> None:
    feat = CrystalformerFeaturizer(model, mode="embedding", device="cpu", batch_size=8)
    assert feat.get_params() == {"model": model, "mode": "embedding", "device": "cpu", "batch_size": 8,
                                "pooling": ("mean", "max", "min", "std")}
    assert clone(feat).batch_size == 8
    feat.set_n_jobs(4)
    assert feat.n_jobs == 1
    (bibtex,) = feat.citations()
    assert "Taniai" in bibtex and "Kanta Ono" in bibtex and "ICLR 2024" in bibtex
    assert feat.implementors()
    with pytest.raises(ValueError, match="mode"):
        CrystalformerFeaturizer(model, mode="logits")
    monkeypatch.setattr(inference, "list_models", list)
    with pytest.raises(ValueError, match="no shipped model"):
        CrystalformerFeaturizer().feature_labels()


def test_cli_featurize_table(model, frame, tmp_path) -> None:
    from click.testing import CliRunner
    from pymatgen.io.cif import CifWriter

    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.cli import main

    save_checkpoint(model, tmp_path / "tiny" / "model.safetensors")
    cifs = [str(CifWriter(frame.structure[i])) for i in (0, 3)]
    pd.DataFrame({"cif": [cifs[0], "not a structure", cifs[1]], "y": [1, 2, 3]}).to_csv(tmp_path / "in.csv", index=False)
    args = ["featurize", str(tmp_path / "in.csv"), "--column", "cif", "--model", str(tmp_path / "tiny"), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out.csv")])
    assert result.exit_code != 0 and "in.csv@1: cannot read the structure" in result.output

    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out.json"), "--ignore-errors", "--mode", "both"])
    assert result.exit_code == 0, result.output
    out = pd.read_json(tmp_path / "out.json")
    assert list(out.columns[:2]) == ["y", "crystalformer emb 0"] and "cif" not in out.columns
    assert np.isnan(out["crystalformer band_gap"][1]) and np.isfinite(out["crystalformer band_gap"][[0, 2]]).all()
    assert "in.csv@1: cannot read the structure" in out["crystalformer_error"][1]
    with torch.no_grad():
        expected = model.embed(model.make_batch([frame.structure[3]]))[0, 0].item()
    assert out["crystalformer emb 0"][2] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_cli_featurize_parquet_round_trip(model, frame, tmp_path) -> None:
    pytest.importorskip("pyarrow")
    from click.testing import CliRunner
    from pymatgen.io.cif import CifWriter

    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.cli import main

    save_checkpoint(model, tmp_path / "tiny" / "model.safetensors")
    cifs = [str(CifWriter(frame.structure[i])) for i in (0, 3)]
    pd.DataFrame({"cif": cifs, "y": [1.0, 2.0]}).to_parquet(tmp_path / "in.parquet", index=False)
    args = ["featurize", str(tmp_path / "in.parquet"), "--column", "cif", "--model", str(tmp_path / "tiny"),
            "--device", "cpu", "--out", str(tmp_path / "out.parquet")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out["y"]) == [1.0, 2.0]
    with torch.no_grad():
        expected = model.embed(model.make_batch([frame.structure[3]]))[0, 0].item()
    assert out["crystalformer emb 0"][1] == pytest.approx(expected, rel=1e-5, abs=1e-6)


_MULTIPLE_AT_DEFAULTS = """
import multiprocessing, sys
import numpy as np, pandas as pd, torch
from ase.build import bulk
from matminer.featurizers.base import MultipleFeaturizer
from matminer.featurizers.structure import DensityFeatures
from pymatgen.io.ase import AseAtomsAdaptor
sys.path.insert(0, sys.argv[1])
from test_featurizer import tiny_model
from ase_crystalformer.featurizer import CrystalformerFeaturizer

torch.set_num_threads(2)
cells = [("Si", "diamond", 5.43), ("Cu", "fcc", 3.6), ("NaCl", "rocksalt", 5.64), ("MgO", "rocksalt", 4.21)]
df = pd.DataFrame({"s": [AseAtomsAdaptor.get_structure(bulk(*c)) for c in cells * 3]})
ours = CrystalformerFeaturizer(tiny_model(), device="cpu")
direct = np.array(ours.featurize_many(df.s, pbar=False))  # torch has run its threads here
multi = MultipleFeaturizer([DensityFeatures(), ours])
if multiprocessing.cpu_count() < 2:  # the default n_jobs is the core count: make it a pool
    multi.set_n_jobs(2)
out = multi.featurize_dataframe(df, "s", pbar=False)
density = DensityFeatures()
density.set_n_jobs(1)
expected = np.array(density.featurize_many(df.s, pbar=False))
np.testing.assert_allclose(out[ours.feature_labels()].to_numpy(float), direct, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(out[density.feature_labels()].to_numpy(float), expected, rtol=1e-12)
print("OK", out.shape)
"""


def _run_forking_script(tmp_path, text: str) -> str:
    """Run ``text`` in a fresh interpreter (matminer's pools fork it) and return its stdout.

    A hang (the old code's failure) is killed after 120 s, the pool's workers with it.
    """
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "script.py"
    script.write_text(text)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the suite may run with 1, which hides the hang
    with subprocess.Popen(
        [sys.executable, str(script), str(Path(__file__).parent)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    ) as done:
        try:
            stdout, stderr = done.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(done.pid, signal.SIGKILL)  # the pool's workers too, not just the parent
            pytest.fail("MultipleFeaturizer with CrystalformerFeaturizer hung for 120 s")
    assert done.returncode == 0, stderr
    return stdout.strip()


def test_multiple_featurizer_at_matminer_defaults_finishes(tmp_path) -> None:
    """matminer forks a pool per MultipleFeaturizer; a forked worker must not hang in torch."""
    assert _run_forking_script(tmp_path, _MULTIPLE_AT_DEFAULTS) == "OK (12, 68)"


def test_multiple_featurizer_over_featurizers_stays_batched(model, frame, monkeypatch) -> None:
    from matminer.featurizers.base import MultipleFeaturizer
    from matminer.featurizers.structure import DensityFeatures

    ours = CrystalformerFeaturizer(model, device="cpu", batch_size=2)
    sizes: list[int] = []
    run = ours._run
    monkeypatch.setattr(ours, "_run", lambda m, windows: sizes.append(len(windows)) or run(m, windows))
    good = [AseAtomsAdaptor.get_structure(s) if isinstance(s, Atoms) else s for s in frame.structure[[0, 1, 3]]] * 2
    density = DensityFeatures()
    density.set_n_jobs(1)
    multi = MultipleFeaturizer([density, ours], iterate_over_entries=False)
    out = multi.featurize_many(good, pbar=False)
    assert sizes == [2, 2, 2]  # batches of batch_size, not one structure at a time
    with torch.no_grad():
        expected = model.embed(model.make_batch(good)).numpy()
    np.testing.assert_allclose(np.array(out)[:, 3:19], expected, rtol=1e-5, atol=1e-6)


def test_fit_keeps_the_features_and_featurize_answers_from_them(model, frame, monkeypatch) -> None:
    feat = CrystalformerFeaturizer(model, mode="both", device="cpu", batch_size=2)
    sizes: list[int] = []
    run = feat._run
    monkeypatch.setattr(feat, "_run", lambda m, windows: sizes.append(len(windows)) or run(m, windows))
    assert feat.fit(frame.structure, pbar=False) is feat
    assert sizes == [2, 1]  # rows 0 and 1, then row 3 (row 2 fails in its window)
    assert len(feat.features_.rows) == 3

    fresh = CrystalformerFeaturizer(model, mode="both", device="cpu", batch_size=2)
    expected = fresh.featurize_many(frame.structure, ignore_errors=True, return_errors=True, pbar=False)
    fitted = feat.featurize_many(frame.structure, ignore_errors=True, return_errors=True, pbar=False)
    assert sizes == [2, 1]  # nothing recomputed
    for i in (0, 1, 3):
        assert fitted[i][:-1] == expected[i][:-1] and np.isnan(fitted[i][-1])  # the same batches: bit for bit
    assert np.isnan(fitted[2][:-1]).all() and fitted[2][-1] == expected[2][-1]  # the same traceback text

    def no_model() -> None:
        raise AssertionError("a kept structure loaded the model")

    monkeypatch.setattr(feat, "_get_model", no_model)
    equal_copy = AseAtomsAdaptor.get_atoms(frame.structure[0])  # another object, the same structure
    assert feat.featurize(equal_copy) == expected[0][:-1]
    np.testing.assert_allclose(feat.featurize(frame.structure[1]), fresh.featurize(frame.structure[1]),
                               rtol=1e-5, atol=1e-6)  # one by one differs by float32 rounding only
    monkeypatch.undo()

    sizes.clear()
    monkeypatch.setattr(feat, "_run", lambda m, windows: sizes.append(len(windows)) or run(m, windows))
    moved = equal_copy.copy()
    moved.positions[0, 0] += 1e-3
    np.testing.assert_allclose(feat.featurize(moved), fresh.featurize(moved), rtol=1e-5, atol=1e-6)
    assert sizes == [1]  # a miss runs the model

    # Errors are the structure's own, with or without fit.
    for f in (feat, fresh):
        with pytest.raises(StructureError, match="overlapping") as info:
            f.featurize(frame.structure[2])
        assert "TO SKIP" not in str(info.value)
    disordered = equal_copy.copy()  # kept geometry, but partial occupancies: still refused
    disordered.info["occupancy"] = {"0": {"Na": 0.5, "K": 0.5}}
    with pytest.raises(StructureError, match="disordered structures"):
        feat.featurize(disordered)
    messages = []
    for f in (feat, fresh):
        with pytest.raises(StructureError, match="TO SKIP THESE ERRORS") as info:
            f.featurize_dataframe(frame, "structure", pbar=False)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_fit_is_dropped_with_its_settings_and_not_pickled(model, frame) -> None:
    import pickle

    feat = CrystalformerFeaturizer(model, device="cpu").fit(frame.structure, pbar=False)
    kept = feat.features_
    assert feat.__getstate__()["features_"] == kept.token  # a token, not the features
    assert pickle.loads(pickle.dumps(feat)).features_ is kept  # found again in this process
    assert not hasattr(clone(feat), "features_")
    feat.set_params(batch_size=3)
    assert feat.features_ is kept  # values do not depend on the batch size
    feat.set_params(mode="both")
    assert not hasattr(feat, "features_")
    assert len(feat.featurize(frame.structure[0])) == 4 * 16 + 2  # recomputed for the new mode
    assert not hasattr(pickle.loads(pickle.dumps(feat)), "features_")
    feat.fit([], pbar=False)
    assert feat.features_.values.shape == (0, 4 * 16 + 2)


_FIT_MULTIPLE_AT_DEFAULTS = """
import multiprocessing, os, sys
import numpy as np, pandas as pd, pytest, torch
from ase import Atoms
from ase.build import bulk
from matminer.featurizers.base import MultipleFeaturizer
from matminer.featurizers.structure import DensityFeatures
from pymatgen.io.ase import AseAtomsAdaptor
sys.path.insert(0, sys.argv[1])
from test_featurizer import tiny_model
from ase_crystalformer.featurizer import CrystalformerFeaturizer

torch.set_num_threads(2)
model = tiny_model()
PARENT, sizes, workers_may_run = os.getpid(), [], False  # a worker sees the value at its fork
run = CrystalformerFeaturizer._run


def counted(self, m, windows):
    if os.getpid() != PARENT and not workers_may_run:
        raise RuntimeError("a worker ran the model")
    sizes.append(len(windows))
    return run(self, m, windows)


CrystalformerFeaturizer._run = counted


def multiple():
    multi = MultipleFeaturizer([DensityFeatures(), CrystalformerFeaturizer(model, device="cpu", batch_size=4)])
    if multiprocessing.cpu_count() < 2:  # the default n_jobs is the core count: make it a pool
        multi.set_n_jobs(2)
    return multi


cells = [("Si", "diamond", 5.43), ("Cu", "fcc", 3.6), ("NaCl", "rocksalt", 5.64), ("MgO", "rocksalt", 4.21)]
good = [AseAtomsAdaptor.get_structure(bulk(*c)) for c in cells * 3]
broken = AseAtomsAdaptor.get_structure(
    Atoms("Na2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=np.eye(3) * 4, pbc=True))
df = pd.DataFrame({"s": good[:5] + [broken] + good[5:]})
ours = CrystalformerFeaturizer(model, device="cpu")
one_by_one = np.array([ours.featurize(s) for s in good])  # torch has run its threads here
labels, errors = ours.feature_labels(), "CrystalformerFeaturizer Exceptions"

workers_may_run = True  # without fit: per entry in the workers
plain = multiple().featurize_dataframe(df, "s", ignore_errors=True, return_errors=True, pbar=False)
with pytest.raises(ValueError) as plain_error:
    multiple().featurize_dataframe(df, "s", pbar=False)

workers_may_run, sizes[:] = False, []
multi = multiple()
out = multi.fit_featurize_dataframe(df, "s", ignore_errors=True, return_errors=True, pbar=False)
assert sizes == [4, 3, 4, 1], sizes  # batches in the parent; the broken row 5 has no window
good_rows = [i for i in range(13) if i != 5]
np.testing.assert_allclose(out[labels].to_numpy(float)[good_rows], one_by_one, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(out[labels].to_numpy(float)[good_rows], plain[labels].to_numpy(float)[good_rows],
                           rtol=1e-5, atol=1e-6)
assert out[labels].iloc[5].isna().all() and "overlapping" in out[errors][5]
assert out[errors].equals(plain[errors])  # the same error text per entry, NaN elsewhere
rest = [c for c in out.columns if c not in labels]
pd.testing.assert_frame_equal(out[rest], plain[rest])  # the density features and their errors
with pytest.raises(ValueError) as fitted_error:
    multi.featurize_dataframe(df, "s", pbar=False)
assert type(fitted_error.value) is type(plain_error.value)
assert str(fitted_error.value) == str(plain_error.value) and "overlapping" in str(plain_error.value)

workers_may_run = True  # a structure fit did not see still works
other = AseAtomsAdaptor.get_structure(bulk("Si", "diamond", 5.5))
missed = multi.featurize_dataframe(pd.DataFrame({"s": [good[0], other]}), "s", pbar=False)
assert sizes == [4, 3, 4, 1], sizes  # not in the parent
np.testing.assert_allclose(missed[labels].to_numpy(float), [one_by_one[0], ours.featurize(other)],
                           rtol=1e-5, atol=1e-6)
print("OK")
"""


def test_multiple_featurizer_fit_featurize_dataframe_at_defaults_is_batched(tmp_path) -> None:
    """MultipleFeaturizer's pool calls ``featurize`` per entry: ``fit`` batches them first.

    The model raises in a worker unless allowed, so the pool computed nothing for kept
    structures; the parent counts the batch sizes.
    """
    assert _run_forking_script(tmp_path, _FIT_MULTIPLE_AT_DEFAULTS) == "OK"
