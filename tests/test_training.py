"""Training recipe, resume, SWA, evaluation and the CLI on a tiny real fixture.

``fixtures/mp_megnet_40.extxyz``: 40 small MP structures (24/8/8 in the MEGNet split)
with their MEGNet labels, copied from the shared data.
"""

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from click.testing import CliRunner

from ase_crystalformer import ModelConfig, TargetSpec
from ase_crystalformer.checkpoint import load_model
from ase_crystalformer.cli import main
from ase_crystalformer.config import TrainConfig
from ase_crystalformer.data import Record, load_dataset
from ase_crystalformer.errors import RunError
from ase_crystalformer.evaluation import evaluate
from ase_crystalformer.training import train

FIXTURE = Path(__file__).parent / "fixtures" / "mp_megnet_40.extxyz"
TINY = ModelConfig(n_blocks=1, d_model=32, n_heads=4, d_ff=64, d_head_mlp=32, n_rbf=16, cutoff=7.0)
E_FORM = [TargetSpec("e_form", "eV/atom")]


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(str(FIXTURE), ["e_form", "band_gap"])


def _train(dataset, out, epochs=3, swa=1, resume=False, **kwargs):
    config = TrainConfig(epochs=epochs, batch_size=8, swa_epochs=swa, lr=2e-3)
    return train(dataset, E_FORM, out, config=config, model_config=TINY, resume=resume, progress=False, **kwargs)


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_schedule_numbers_from_the_spec():
    config = TrainConfig()
    assert config.lr_at(0) == 5e-4
    assert config.lr_at(4000) == pytest.approx(3.54e-4, abs=5e-7)
    assert config.lr_at(16200) == pytest.approx(2.22e-4, abs=5e-7)


def test_loss_falls_and_files_are_written(dataset, tmp_path):
    _train(dataset, tmp_path, epochs=10, swa=2)
    log = _log(tmp_path)
    assert len(log) == 10
    assert log[-1]["train_loss"] < 0.7 * log[0]["train_loss"]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    for name in ("best.safetensors", "latest.safetensors", "swa.safetensors", "state.pt", "report.json"):
        assert (tmp_path / name).is_file(), name
    best = load_model(tmp_path / "best.safetensors")
    assert best.metadata["n_train"] == 24
    assert best.metadata["train_config"]["epochs"] == 10
    assert len(best.metadata["train_ids_sha256"]) == 64
    # The target normalisation is the training split's mean and population std.
    y = np.array([r.targets["e_form"] for r in (dataset.records[i] for i in dataset.splits["train"])])
    assert best.target_mean.item() == pytest.approx(y.mean(), rel=1e-6)
    assert best.target_std.item() == pytest.approx(y.std(), rel=1e-6)


def test_lr_is_frozen_during_swa_and_swa_averages_steps(dataset, tmp_path):
    _train(dataset, tmp_path, epochs=4, swa=2)
    log = _log(tmp_path)
    steps_per_epoch = 3  # 24 structures, batches of 8, drop_last
    config = TrainConfig(lr=2e-3)
    assert log[1]["lr"] == pytest.approx(config.lr_at(2 * steps_per_epoch))
    assert log[2]["lr"] == log[3]["lr"] == log[1]["lr"]  # no scheduler step during SWA
    swa = load_model(tmp_path / "swa.safetensors")
    latest = load_model(tmp_path / "latest.safetensors")
    assert not torch.equal(swa.head[0].weight, latest.head[0].weight)
    # σ statistics and normalisation are copied, not averaged to something else.
    assert torch.equal(swa.blocks[0].attention.sigma_scale, latest.blocks[0].attention.sigma_scale)
    assert torch.equal(swa.target_std, latest.target_std)


def test_resume_reproduces_the_uninterrupted_run_exactly(dataset, tmp_path):
    _train(dataset, tmp_path / "straight", epochs=4, swa=2)
    _train(dataset, tmp_path / "split", epochs=2, swa=0)  # "killed" after epoch 2, before SWA
    _train(dataset, tmp_path / "split", epochs=4, swa=2, resume=True)
    for name in ("latest.safetensors", "swa.safetensors"):
        a = load_model(tmp_path / "straight" / name).state_dict()
        b = load_model(tmp_path / "split" / name).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert [r["train_loss"] for r in _log(tmp_path / "straight")] == [r["train_loss"] for r in _log(tmp_path / "split")]


def test_resume_refuses_a_changed_recipe(dataset, tmp_path):
    _train(dataset, tmp_path, epochs=2, swa=0)
    with pytest.raises(ValueError, match="different training config"):
        train(dataset, E_FORM, tmp_path, config=TrainConfig(epochs=3, batch_size=4, swa_epochs=0),
              model_config=TINY, resume=True, progress=False)
    # Same tensors, other architecture: refused, from the state or (older states) from latest.
    for changed in (replace(TINY, readout="atoms"), replace(TINY, activation="silu")):
        with pytest.raises(ValueError, match="different model config"):
            train(dataset, E_FORM, tmp_path, config=TrainConfig(epochs=2, batch_size=8, lr=2e-3, swa_epochs=0),
                  model_config=changed, resume=True, progress=False)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    del state["model_config"]
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="different model config"):
        train(dataset, E_FORM, tmp_path, config=TrainConfig(epochs=2, batch_size=8, lr=2e-3, swa_epochs=0),
              model_config=replace(TINY, readout="atoms"), resume=True, progress=False)
    with pytest.raises(RunError, match=r"empty: nothing to resume: no training state \(state.pt\)"):
        _train(dataset, tmp_path / "empty", resume=True)
    (tmp_path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"state.pt: cannot read the training state \(.*\); .* holds \["):
        _train(dataset, tmp_path, epochs=2, swa=0, resume=True)


@pytest.mark.filterwarnings("ignore::ase_crystalformer.domain.OutOfDomainWarning")  # 24 training structures
def test_evaluate_matches_an_independent_mae(dataset, tmp_path):
    _train(dataset, tmp_path, epochs=2, swa=0)
    model = load_model(tmp_path / "best.safetensors")
    metrics, table, skipped = evaluate(model, dataset, "test")
    test = [dataset.records[i] for i in dataset.splits["test"]]
    pred = model.predict([r.atoms for r in test])
    true = np.array([r.targets["e_form"] for r in test])
    assert metrics["e_form"]["mae"] == pytest.approx(np.abs(pred - true).mean(), rel=1e-5)
    assert metrics["e_form"]["n"] == 8 and not skipped
    assert list(table["id"]) == [r.id for r in test]


def test_broken_structure_is_skipped_and_reported(dataset, tmp_path):
    broken = Atoms("Cu2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=np.eye(3) * 3, pbc=True)
    records = list(dataset.records) + [Record("mp-broken", broken, {"e_form": 0.1})]
    splits = {**dataset.splits, "train": list(dataset.splits["train"]) + [len(records) - 1]}
    report = _train(replace(dataset, records=records, splits=splits), tmp_path, epochs=1, swa=0)
    assert [i for i, _ in report["skipped"]] == ["mp-broken"]
    assert "overlapping" in report["skipped"][0][1]
    assert load_model(tmp_path / "best.safetensors").metadata["n_skipped"] == 1


def test_every_skipped_structure_is_in_the_report_and_the_log(dataset, tmp_path, caplog):
    """Rows the loader could not read and structures the model refuses, from every split."""
    broken = Atoms("Cu2", positions=[[0, 0, 0], [0.01, 0, 0]], cell=np.eye(3) * 3, pbc=True)
    records = list(dataset.records) + [Record(f"mp-broken-{k}", broken, {"e_form": 0.1}) for k in range(2)]
    n = len(dataset.records)
    splits = {**dataset.splits, "train": [*dataset.splits["train"], n], "val": [*dataset.splits["val"], n + 1]}
    unreadable = [("mp-unreadable-0", "row 3, column 'cif': cannot parse CIF text"),
                  ("mp-unreadable-1", "row 7, column 'cif': structure dict nested too deeply")]
    data = replace(dataset, records=records, splits=splits, skipped=unreadable)
    with caplog.at_level(logging.WARNING, logger="ase_crystalformer.training"):
        report = _train(data, tmp_path, epochs=1, swa=0)
    expected = ["mp-unreadable-0", "mp-unreadable-1", "mp-broken-0", "mp-broken-1"]
    on_disk = json.loads((tmp_path / "report.json").read_text())["skipped"]
    assert [i for i, _ in report["skipped"]] == [i for i, _ in on_disk] == expected
    assert on_disk[:2] == [list(item) for item in unreadable]
    assert all("overlapping" in reason for _, reason in on_disk[2:])
    for ident, reason in on_disk:
        assert f"skipped {ident}: {reason}" in caplog.text


class Killed(BaseException):
    """A simulated kill: not an Exception, so that no handler in the code under test catches it."""


def _weights(out):
    return {name: load_model(Path(out) / name).state_dict()
            for name in ("best.safetensors", "latest.safetensors", "swa.safetensors")}


def test_resume_after_a_kill_at_any_write_ends_with_the_uninterrupted_weights(dataset, tmp_path, monkeypatch, caplog):
    """Kill the run before each file replacement of its writes (models, log, state, report)
    in turn; ``resume`` must finish with the same weights, bit for bit, and no stale files."""
    small = replace(dataset, splits={"train": dataset.splits["train"][:8], "val": dataset.splits["val"][:4]})
    config = TrainConfig(epochs=2, batch_size=4, swa_epochs=1, lr=2e-3)

    def run(out, resume=False):
        return train(small, E_FORM, out, config=config, model_config=TINY, resume=resume, progress=False)

    real_replace, writes = os.replace, []

    def counting(src, dst):
        writes.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", counting)
    run(tmp_path / "straight")
    monkeypatch.undo()
    assert writes.count("state.pt") == 2 and writes[-1] == "report.json"
    reference, ref_log = _weights(tmp_path / "straight"), _log(tmp_path / "straight")
    for k, name in enumerate(writes):
        out = tmp_path / f"killed-{k}"
        calls = []

        def killing(src, dst, k=k):
            calls.append(dst)
            if len(calls) > k:
                raise Killed
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", killing)
        with pytest.raises(Killed):
            run(out)
        monkeypatch.undo()
        assert (out / f"{name}.tmp").exists()  # the write in progress
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ase_crystalformer"):
            run(out, resume=True)
        if k < writes.index("state.pt") + 1:
            assert "ended before completing its first epoch" in caplog.text, k
        assert not list(out.glob("*.tmp")), k
        assert [r["train_loss"] for r in _log(out)] == [r["train_loss"] for r in ref_log], k
        for file, tensors in _weights(out).items():
            assert all(torch.equal(tensors[key], reference[file][key]) for key in tensors), (k, name, file)


def test_a_run_directory_is_locked_while_a_run_uses_it(dataset, tmp_path):
    import threading

    # A second trainer (another thread) while the first is between epochs.
    out, errors = tmp_path / "threads", []

    def second(summary):
        def run():
            try:
                _train(dataset, out, epochs=1, swa=0)
            except Exception as err:
                errors.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    _train(dataset, out, epochs=1, swa=0, on_epoch=second)
    assert len(errors) == 1 and isinstance(errors[0], RunError)
    assert str(errors[0]).startswith(f"run directory {out} is in use by another run (pid {os.getpid()},")
    # Another process holding it.
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ase_crystalformer.rundir import run_directory\n"
         "with run_directory(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = f"run directory {out} is in use by another run (pid {holder.pid}, holding {out / 'run.lock'})"
        with pytest.raises(RunError) as info:
            _train(dataset, out, epochs=1, swa=0)
        assert str(info.value).startswith(message)
        result = CliRunner().invoke(main, ["train", "--data", str(FIXTURE), "--target", "e_form", "--epochs", "1",
                                           "--out", str(out), "--device", "cpu", "--no-progress"])
        assert result.exit_code != 0 and message in result.output
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing written beside the holder
    finally:
        holder.communicate("", timeout=30)
    _train(dataset, out, epochs=1, swa=0)  # free again once the holder has exited


def test_a_used_run_directory_is_refused_unless_overwritten(tmp_path):
    out = tmp_path / "run"
    common = ["train", "--data", str(FIXTURE), "--target", "e_form", "--batch-size", "8", "--blocks", "1",
              "--cutoff", "7", "--out", str(out), "--device", "cpu", "--no-progress"]
    runner = CliRunner()
    first = runner.invoke(main, [*common, "--epochs", "2", "--swa-epochs", "1"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(main, [*common, "--epochs", "1", "--swa-epochs", "0"])
    assert again.exit_code != 0
    assert (f"run directory {out} holds another run (state.pt, log.jsonl, report.json, best.safetensors, "
            "latest.safetensors, swa.safetensors); resume it (--resume), replace it (--overwrite)") in again.output
    assert len(_log(out)) == 2  # untouched
    fresh = runner.invoke(main, [*common, "--epochs", "1", "--swa-epochs", "0", "--overwrite"])
    assert fresh.exit_code == 0, fresh.output
    assert "swa_" not in fresh.output and not (out / "swa.safetensors").exists()
    assert [r["epoch"] for r in _log(out)] == [1]
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["metrics"]) == ["best_test", "best_val"] and report["epochs_run"] == 1
    both = runner.invoke(main, [*common, "--resume", "--overwrite"])
    assert both.exit_code != 0 and "resume or overwrite, not both" in both.output


def test_finetune_new_head_keeps_the_encoder(dataset, tmp_path):
    _train(dataset, tmp_path / "base", epochs=1, swa=0)
    base = load_model(tmp_path / "base" / "best.safetensors")
    train(dataset, [TargetSpec("band_gap", "eV")], tmp_path / "ft", init_from=tmp_path / "base" / "best.safetensors",
          freeze_encoder=True, config=TrainConfig(epochs=1, batch_size=8, swa_epochs=0), progress=False)
    tuned = load_model(tmp_path / "ft" / "best.safetensors")
    assert tuned.config.target_names == ["band_gap"]
    assert torch.equal(tuned.blocks[0].attention.q_proj.weight, base.blocks[0].attention.q_proj.weight)
    assert not torch.equal(tuned.head[2].weight[:1], base.head[2].weight[:1])


def test_energy_and_force_training_runs_through_the_autograd_path(tmp_path):
    forces = Path(__file__).parent / "fixtures" / "data" / "forces"
    data = load_dataset(str(next(forces.glob("*.xyz"))), ["energy"], split="ratio", split_ratios=(0.34, 0.33, 0.33))
    data.splits["train"] = list(range(len(data.records)))
    config = TrainConfig(epochs=2, batch_size=2, swa_epochs=0, force_weight=1.0, stress_weight=1.0)
    train(data, [TargetSpec("energy", "eV/atom", kind="energy")], tmp_path, config=config,
          model_config=replace(TINY, activation="silu"), progress=False)
    log = _log(tmp_path)
    assert np.isfinite(log[-1]["train_loss"])


def test_cli_train_and_evaluate(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(main, ["train", "--data", str(FIXTURE), "--target", "e_form", "--epochs", "2",
                                  "--swa-epochs", "1", "--batch-size", "8", "--blocks", "1", "--cutoff", "7",
                                  "--weight-decay", "2e-5", "--clip-norm", "0.5", "--betas", "0.8", "0.9",
                                  "--out", str(out), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    recipe = load_model(out / "best.safetensors").metadata["train_config"]
    assert (recipe["weight_decay"], recipe["clip_norm"], recipe["betas"]) == (2e-5, 0.5, [0.8, 0.9])
    assert "epoch    2" in result.output and "swa_test: e_form MAE" in result.output
    result = runner.invoke(main, ["evaluate", "--model", str(out / "swa.safetensors"), "--data", str(FIXTURE),
                                  "--out-dir", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "e_form [test, n=8]: MAE" in result.output
    assert (tmp_path / "eval" / "parity.png").stat().st_size > 1000
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert metrics["metrics"]["e_form"]["mae"] == pytest.approx(report["metrics"]["swa_test"]["e_form"]["mae"])
    bad = runner.invoke(main, ["train", "--data", str(FIXTURE), "--target", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "nope" in bad.output


def test_torchrun_two_process_gloo(tmp_path, dataset):
    """Two ranks train one model; each validates half the set and the sums are all-reduced."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ase_crystalformer", "train", "--data", str(FIXTURE), "--target", "e_form", "--epochs", "2",
           "--swa-epochs", "0", "--batch-size", "8", "--blocks", "1", "--cutoff", "7", "--out", str(tmp_path),
           "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = _log(tmp_path)
    assert len(log) == 2  # only rank 0 writes
    assert load_model(tmp_path / "best.safetensors").metadata["n_train"] == 24
    latest = load_model(tmp_path / "latest.safetensors")
    metrics, _, _ = evaluate(latest, dataset, "val")
    assert metrics["e_form"]["n"] > 2  # an odd split between the ranks is fine too
    assert log[-1]["val_mae_e_form"] == pytest.approx(metrics["e_form"]["mae"], rel=1e-5)


def test_per_atom_energy_target_is_read_as_is_and_gives_forces(dataset, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(FIXTURE), "--target", "e_form", "--as-energy", "e_form",
                                       "--epochs", "1", "--swa-epochs", "0", "--batch-size", "8", "--blocks", "1",
                                       "--cutoff", "7", "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "best.safetensors")
    assert model.config.targets[0].kind == "energy"
    y = np.array([dataset.records[i].targets["e_form"] for i in dataset.splits["train"]])
    assert model.target_mean.item() == pytest.approx(y.mean(), rel=1e-6)  # not divided by N
    from ase_crystalformer.calculator import CrystalformerCalculator

    atoms = dataset.records[0].atoms.copy()
    atoms.calc = CrystalformerCalculator(model, device="cpu")
    assert atoms.get_potential_energy() == pytest.approx(len(atoms) * model.predict(atoms)[0], rel=1e-5)
    assert atoms.get_forces().shape == (len(atoms), 3)


def test_head_from_carries_one_output_unchanged_in_target_units(rng):
    """``head_from`` starts a target from one output of a multi-task base model: after this
    run's own normalisation its predictions equal the base output's; bad pairs are refused."""
    from structures_for_tests import random_crystal

    from ase_crystalformer import Crystalformer
    from ase_crystalformer.geometry import build_window, collate
    from ase_crystalformer.training import _initial_model, _renormalise_carried

    small = ModelConfig(n_blocks=1, d_model=16, n_heads=2, d_ff=32, d_head_mlp=16)
    base = Crystalformer(replace(small, targets=(TargetSpec("a", "eV"), TargetSpec("b@x", "eV"),
                                                 TargetSpec("c", "GPa", transform="log10")))).eval()
    base.target_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    base.target_std.copy_(torch.tensor([0.3, 4.0, 0.2]))
    batch = collate([build_window(random_crystal(rng, n), small.cutoff) for n in (2, 3)])
    model, carried = _initial_model([TargetSpec("new"), TargetSpec("b", "eV")], None, base, False, {"b": "b@x"})
    model.eval().target_mean.copy_(torch.tensor([0.0, 7.0]))  # this run's own normalisation
    model.target_std.copy_(torch.tensor([1.0, 0.25]))
    with torch.no_grad():
        before = model.targets(model(batch))[:, 1]
        _renormalise_carried(model, carried)
        torch.testing.assert_close(model.targets(model(batch))[:, 1], base.targets(base(batch))[:, 1])
    assert not torch.allclose(before, base.targets(base(batch))[:, 1])  # the rescaling is what made them equal
    with pytest.raises(ValueError, match="the base model has no output 'nope'"):
        _initial_model([TargetSpec("b", "eV")], None, base, False, {"b": "nope"})
    with pytest.raises(ValueError, match="'k' .* cannot start from 'c'"):
        _initial_model([TargetSpec("k", "GPa")], None, base, False, {"k": "c"})
    with pytest.raises(ValueError, match="'z' is not a target of this run"):
        _initial_model([TargetSpec("b", "eV")], None, base, False, {"z": "a"})
