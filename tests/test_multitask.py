"""Multi-task training: several sources merged by id, masked per-task loss, task weights,
the exclusion rule for held-out ids, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from ase_crystalformer.checkpoint import load_model
from ase_crystalformer.cli import main
from ase_crystalformer.config import ModelConfig, TargetSpec, TrainConfig
from ase_crystalformer.data import Dataset, load_dataset
from ase_crystalformer.data.multitask import TaskSource, holdout_ids, load_multitask, merge, parse_tasks
from ase_crystalformer.errors import DataError
from ase_crystalformer.geometry import collate
from ase_crystalformer.model import Crystalformer
from ase_crystalformer.training import Trainer, ids_digest, make_examples, train

FIXTURE = Path(__file__).parent / "fixtures" / "mp_megnet_40.extxyz"
DATA = Path(__file__).parent / "fixtures" / "data"
TINY = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16, cutoff=7.0)


@pytest.fixture(scope="module")
def base():
    return load_dataset(str(FIXTURE), ["e_form", "band_gap"])


def _source(base: Dataset, name: str, indices, labels, split=None) -> Dataset:
    """A source of some of ``base``'s structures, with ``labels`` {column: values}."""
    records = []
    for k, i in enumerate(indices):
        r = base.records[i]
        targets = {c: float(v[k]) for c, v in labels.items() if np.isfinite(v[k])}
        records.append(type(r)(r.id, r.atoms, targets))
    provenance = {"split": {"method": "source labels" if split else "ratio"}}
    splits = split or {}
    return Dataset(name, records, splits, dict.fromkeys(labels, "eV"), [], provenance)


def test_merge_joins_by_id_keeps_tasks_apart_and_masks_missing_labels(base):
    a = _source(base, "a", range(0, 6), {"e": np.arange(6.0)}, split={"train": [0, 1, 2, 3], "val": [4], "test": [5]})
    b = _source(base, "b", range(3, 9), {"e": np.arange(6.0) + 100, "g": [1, np.nan, 3, 4, 5, 6]})
    tasks = [TaskSource("e@a", "a", "e"), TaskSource("e@b", "b", "e"), TaskSource("g", "b", "g")]
    ds = merge({"a": a, "b": b}, tasks, val_fraction=0.0)
    ids = [r.id for r in ds.records]
    assert ids == [base.records[i].id for i in range(9)]  # one record per id, first source's order
    shared = ds.records[3]  # in both sources: a's label under e@a, b's under e@b
    assert shared.targets == {"e@a": 3.0, "e@b": 100.0, "g": 1.0}
    assert ds.records[4].targets == {"e@a": 4.0, "e@b": 101.0}  # g missing: absent, not dropped
    assert ds.records[0].targets == {"e@a": 0.0}
    assert ds.records[4].atoms is a.records[4].atoms  # structure from the first source
    # a's val/test ids stay held out although b (no split of its own, val_fraction 0) trains on them
    assert sorted(ds.splits) == ["test", "train", "val"]
    assert [ds.records[i].id for i in ds.splits["val"]] == [base.records[4].id]
    assert [ds.records[i].id for i in ds.splits["test"]] == [base.records[5].id]
    assert len(ds.splits["train"]) == 7
    info = ds.provenance["tasks"]
    assert info["g"]["labels"] == {"train": 4, "val": 0, "test": 1}
    assert info["e@b"]["from"] == ["b:e"] and info["e@a"]["labels"] == {"train": 4, "val": 1, "test": 1}


def test_excluded_ids_never_train_and_are_counted(base):
    a = _source(base, "a", range(8), {"e": np.arange(8.0)})
    banned = {base.records[1].id, base.records[6].id, "mp-not-here"}
    ds = merge({"a": a}, [TaskSource("e", "a", "e")], exclude={"held out": banned}, val_fraction=0.25)
    train_ids = {ds.records[i].id for i in ds.splits["train"]}
    val_ids = {ds.records[i].id for i in ds.splits["val"]}
    assert not train_ids & banned
    assert ds.provenance["excluded_from_train"] == {"held out": len(banned & (set(a.records[i].id for i in range(8)) - val_ids))}
    assert len(val_ids) == 2 and "test" not in ds.splits  # 25% of 8 to val, no test part


def test_one_source_feeding_a_task_twice_and_conflicting_labels(base):
    a = _source(base, "a", range(4), {"g": np.arange(4.0)})
    b = _source(base, "b", range(2, 6), {"g": [2.0, 30.0, 4.0, 5.0]})
    ds = merge({"a": a, "b": b}, [TaskSource("g", "a", "g"), TaskSource("g", "b", "g")], val_fraction=0.0)
    assert [r.targets["g"] for r in ds.records] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # first source wins
    assert ds.provenance["tasks"]["g"]["conflicts"] == 1
    assert ds.provenance["tasks"]["g"]["largest_conflict"] == 27.0


def test_parse_tasks_refuses_a_column_two_sources_share():
    columns = {"mp-megnet": ["e_form", "band_gap"], "mp20": ["formation_energy_per_atom", "band_gap"]}
    assert parse_tasks(["e_form"], columns) == [TaskSource("e_form", "mp-megnet", "e_form")]
    with pytest.raises(DataError, match=r"'band_gap' is a column of \['mp-megnet', 'mp20'\].*band_gap@mp-megnet=mp-megnet:band_gap"):
        parse_tasks(["band_gap"], columns)
    with pytest.raises(DataError, match="'mp21' is not one of the datasets"):
        parse_tasks(["x=mp21:band_gap"], columns)
    with pytest.raises(DataError, match="mp20 has no column 'e_form'"):
        parse_tasks(["x=mp20:e_form"], columns)
    with pytest.raises(DataError, match="mp20:band_gap feeds more than one task"):
        parse_tasks(["a=mp20:band_gap", "b=mp20:band_gap"], columns)


def test_holdout_ids_are_the_megnet_val_test_and_the_shipped_test_splits():
    from ase_crystalformer.data.parse import read_json

    held = holdout_ids(DATA)
    board = read_json(DATA / "jarvis_leaderboard" / "megnet_e_form.json.zip")
    assert held["mp-megnet test"] >= set(board["test"]) and held["mp-megnet val"] >= set(board["val"])
    for name in ("mp-elastic", "perov5", "mp-li", "mp40"):
        ds = load_dataset(name, data_dir=DATA)
        assert held[f"{name} test"] == {r.id for r in ds.subset("test")}, name
    for name in ("mp-li", "mp40"):  # no split of their own in a backbone: their val is held out too
        ds = load_dataset(name, data_dir=DATA)
        assert held[f"{name} val"] == {r.id for r in ds.subset("val")}, name
    assert "mp-elastic val" not in held and "perov5 val" not in held  # their own split keeps val as val


def _trainer(weights=()):
    ds = load_dataset(str(FIXTURE), ["e_form", "band_gap"])
    specs = (TargetSpec("e_form"), TargetSpec("band_gap"))
    model = Crystalformer(ModelConfig(**{**TINY.__dict__, "targets": specs}))
    examples, _ = make_examples(ds, list(range(8)), model.config)
    for e in examples[::2]:
        e.y = e.y.copy()
        e.y[1] = np.nan  # half of the band gaps missing
    config = TrainConfig(epochs=1, batch_size=8, swa_epochs=0, task_weights=weights)
    return Trainer(model, examples, examples[:4], config, Path("unused"), device=torch.device("cpu"), metadata={},
                   progress=False), examples


def test_loss_is_the_weighted_mean_of_per_task_means_over_known_labels():
    trainer, examples = _trainer((("band_gap", 3.0),))
    model = trainer.model
    batch = collate([e.window for e in examples], model.dtype)
    y = torch.as_tensor(np.stack([e.y for e in examples]), dtype=model.dtype)
    loss = trainer._loss(examples, batch, y)
    with torch.no_grad():
        out = model(batch).numpy()
    norm = (y.numpy() - model.target_mean.numpy()) / model.target_std.numpy()
    e_form = np.abs(out[:, 0] - norm[:, 0]).mean()
    gap = np.nanmean(np.abs(out[:, 1] - norm[:, 1]))  # the four known gaps only
    assert loss.item() == pytest.approx((e_form + 3.0 * gap) / 4.0, rel=1e-5)
    loss.backward()  # a missing label sends no gradient into its output
    assert torch.isfinite(torch.stack([p.grad.abs().sum() for p in model.parameters() if p.grad is not None])).all()


def test_missing_labels_send_no_gradient_and_a_zero_weight_silences_a_task():
    trainer, examples = _trainer((("band_gap", 0.0),))
    model = trainer.model
    batch = collate([e.window for e in examples], model.dtype)
    y = torch.as_tensor(np.stack([e.y for e in examples]), dtype=model.dtype)
    outputs = model(batch).detach().requires_grad_(True)
    trainer.network = lambda _batch: outputs  # the loss sees these outputs
    trainer._loss(examples, batch, y).backward()
    assert outputs.grad[:, 1].abs().max() == 0  # weight 0: band gap ignored
    assert (outputs.grad[:, 0] != 0).all()
    trainer, _ = _trainer()
    trainer.network = lambda _batch: outputs
    outputs.grad = None
    trainer._loss(examples, batch, y).backward()
    assert (outputs.grad[::2, 1] == 0).all() and (outputs.grad[1::2, 1] != 0).all()


def test_validation_loss_weights_tasks_and_skips_unlabelled_ones():
    trainer, examples = _trainer((("band_gap", 3.0),))
    val = trainer.validate()
    model = trainer.model
    batch = collate([e.window for e in examples[:4]], model.dtype)
    with torch.no_grad():
        out = model(batch).numpy()
    y = np.stack([e.y for e in examples[:4]])
    norm = (y - model.target_mean.numpy()) / model.target_std.numpy()
    expected = (np.abs(out[:, 0] - norm[:, 0]).mean() + 3 * np.nanmean(np.abs(out[:, 1] - norm[:, 1]))) / 4
    assert val["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_task_weights_must_name_targets_and_round_trip():
    config = TrainConfig(task_weights=(("a", 0.5),))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="must be >= 0"):
        TrainConfig(task_weights=(("a", -1.0),))
    with pytest.raises(ValueError, match=r"task weights for \['nope'\]"):
        _trainer((("nope", 1.0),))


def test_a_task_without_training_labels_is_refused(base, tmp_path):
    a = _source(base, "a", range(6), {"e": np.arange(6.0), "g": [np.nan] * 4 + [1.0, 2.0]},
                split={"train": [0, 1, 2, 3], "val": [4, 5]})
    ds = merge({"a": a}, [TaskSource("e", "a", "e"), TaskSource("g", "a", "g")])
    with pytest.raises(DataError, match=r"target\(s\) \['g'\] have no label in the training split"):
        train(ds, [TargetSpec("e"), TargetSpec("g")], tmp_path / "run", config=TrainConfig(epochs=1, swa_epochs=0),
              model_config=TINY, progress=False)


def test_cli_trains_one_model_on_several_builtin_datasets(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "mp-megnet", "--data", "mp20", "--data", "mp-elastic", "--data-dir", str(DATA),
            "--target", "e_form@megnet=mp-megnet:e_form", "--target", "e_form@mp20=mp20:formation_energy_per_atom",
            "--target", "k_vrh", "--transform", "k_vrh:log10", "--task-weight", "e_form@mp20:0.5",
            "--epochs", "1", "--swa-epochs", "0", "--batch-size", "8", "--blocks", "1", "--cutoff", "7",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    model = load_model(out / "best.safetensors")
    assert model.config.target_names == ["e_form@megnet", "e_form@mp20", "k_vrh"]
    assert model.config.targets[2].transform == "log10"
    meta = model.metadata
    assert meta["train_config"]["task_weights"] == [["e_form@mp20", 0.5]]
    data = meta["data"]
    assert set(data["sources"]) == {"mp-megnet", "mp20", "mp-elastic"}
    assert data["tasks"]["e_form@mp20"]["from"] == ["mp20:formation_energy_per_atom"]
    # the ids it trained on: from the sources' training parts, no held-out id, as the digest says
    multi = load_multitask(["mp-megnet", "mp20", "mp-elastic"], [a for a in args if "=" in a or a == "k_vrh"],
                           data_dir=DATA)
    trained = {r.id for r in multi.subset("train")}
    assert meta["train_ids_sha256"] == ids_digest(sorted(trained))
    megnet, elastic = load_dataset("mp-megnet", data_dir=DATA), load_dataset("mp-elastic", data_dir=DATA)
    mp20 = {r.id for r in load_dataset("mp20", data_dir=DATA).records}
    assert trained <= {r.id for r in megnet.subset("train")} | mp20 | {r.id for r in elastic.subset("train")}
    assert not trained & set().union(*holdout_ids(DATA).values())
    assert not trained & {r.id for r in [*megnet.subset("val"), *elastic.subset("val")]}
    # one task of the multi-task model scored on one dataset's column
    result = CliRunner().invoke(main, ["evaluate", "--model", str(out / "best.safetensors"), "--data", "mp-megnet",
                                       "--data-dir", str(DATA), "--task", "e_form@megnet=e_form", "--split", "test",
                                       "--out-dir", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    test_ids = [r.id for r in megnet.subset("test")]
    assert list(rows["id"]) == test_ids and "e_form@megnet [test, n=" in result.output
    assert "k_vrh" not in result.output
    expected = model.predict([r.atoms for r in megnet.subset("test")])[:, 0]
    np.testing.assert_allclose(rows["e_form@megnet_pred"], expected, rtol=1e-4)
    np.testing.assert_allclose(rows["e_form@megnet_true"], [r.targets["e_form"] for r in megnet.subset("test")])
    bad = CliRunner().invoke(main, ["train", "--data", "mp-megnet", "--data", "mp20", "--data-dir", str(DATA),
                                    "--target", "band_gap", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "'band_gap' is a column of ['mp-megnet', 'mp20']" in bad.output
    bad = CliRunner().invoke(main, ["train", "--data", "mp-megnet", "--data", "mp20", "--data-dir", str(DATA),
                                    "--target", "e_form", "--split-rule", "ratio", "--out", str(tmp_path / "y")])
    assert bad.exit_code != 0 and "keeps each dataset's own split" in bad.output



def test_task_names_keep_their_scheme_in_property_names():
    from ase_crystalformer.inference import property_name

    assert property_name(TargetSpec("e_form@megnet")) == ("formation_energy_per_atom_megnet", "eV/atom")
    assert property_name(TargetSpec("e_form@mp20")) == ("formation_energy_per_atom_mp20", "eV/atom")
    assert property_name(TargetSpec("custom@x", "eV")) == ("custom@x", "eV")


def test_a_drawn_validation_role_never_outranks_a_source_split(base):
    own = _source(base, "own", range(10), {"e": np.arange(10.0)}, split={"train": list(range(8)), "val": [8], "test": [9]})
    drawn = _source(base, "drawn", range(20), {"g": np.arange(20.0)})
    ds = merge({"own": own, "drawn": drawn}, [TaskSource("e", "own", "e"), TaskSource("g", "drawn", "g")],
               val_fraction=0.5)
    role = {ds.records[i].id: name for name, indices in ds.splits.items() for i in indices}
    ids = [r.id for r in base.records[:20]]
    assert [role[i] for i in ids[:10]] == ["train"] * 8 + ["val", "test"]  # own split kept whatever was drawn
    drawn_val = [role[i] for i in ids[10:]].count("val")
    assert ds.provenance["tasks"]["g"]["labels"]["val"] == drawn_val + 1  # + the own split's val id
    assert 0 < drawn_val < 10  # the draw still makes a validation part
