"""The potential's data assembly, split, reference energies and training run, on tiny frames.

Frames are built here (EMT energies, forces and stresses of small rattled cells written as
extxyz with the shared data's info keys), so nothing is read from the shared data folder.
"""

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from ase_crystalformer.checkpoint import load_model
from ase_crystalformer.config import TrainConfig
from ase_crystalformer.errors import CheckpointError, DataError
from ase_crystalformer.potential import (
    DEFAULT_SOURCE,
    FORMATION_SOURCE,
    REFERENCE_SCALES,
    Frame,
    References,
    default_model_config,
    fit_references,
    formation_estimates,
    read_frames,
    references_of,
    split_frames,
    train_potential,
)

TINY = default_model_config(n_blocks=1, d_model=16, n_heads=2, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=7.0)


def _frames_file(path, source="MPtrj", key="mptrj_traj_id", n_traj=6, per_traj=2, seed=0):
    """EMT-labelled rattled Cu/Al/Ni cells, ``per_traj`` frames per trajectory id."""
    rng = np.random.default_rng(seed)
    images = []
    for t in range(n_traj):
        for k in range(per_traj):
            symbol = ("Cu", "Al", "Ni")[t % 3]
            atoms = bulk(symbol, "fcc", a=3.6 + 0.05 * k, cubic=True)
            atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
            atoms.calc = EMT()
            results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
                       "stress": atoms.get_stress()}
            atoms.calc = SinglePointCalculator(atoms, **results)
            atoms.info.update({"source": source, key: f"mp-{t}"})
            images.append(atoms)
    write(path, images, format="extxyz")
    return path


def _frame(symbols, energy, source, group="g"):
    from ase import Atoms

    atoms = Atoms(symbols)
    return Frame(group, group, source, "f", atoms, energy, np.zeros((len(atoms), 3)), np.zeros((3, 3)))


def test_frames_keep_source_group_and_labels(tmp_path):
    frames = read_frames(_frames_file(tmp_path / "mptrj.xyz"))
    assert len(frames) == 12
    assert {f.source for f in frames} == {DEFAULT_SOURCE}
    assert [f.group for f in frames[:4]] == ["mp-0", "mp-0", "mp-1", "mp-1"]
    assert frames[0].id == "mptrj#0" and frames[0].stress.shape == (3, 3)
    atoms = frames[0].atoms.copy()
    atoms.calc = EMT()
    assert frames[0].energy == pytest.approx(atoms.get_potential_energy())
    np.testing.assert_allclose(frames[0].forces, atoms.get_forces(), atol=1e-6)
    np.testing.assert_allclose(frames[0].stress, atoms.get_stress(voigt=False), atol=1e-6)


def test_unknown_source_is_refused(tmp_path):
    path = _frames_file(tmp_path / "x.xyz", source="VASP-somewhere")
    with pytest.raises(DataError, match=r"info\['source'\] is 'VASP-somewhere'"):
        read_frames(path)


def test_split_is_by_group_deterministic_and_honours_fixed_ids():
    frames = [_frame("Cu", -1.0, "mptrj", group=f"mp-{k // 3}") for k in range(300)]
    splits = split_frames(frames, {"mp-0": "test", "mp-1": "val"})
    assert splits == split_frames(frames, {"mp-0": "test", "mp-1": "val"})
    where = {frames[i].group: name for name, rows in splits.items() for i in rows}
    for name, rows in splits.items():  # a group never straddles two splits
        assert all(where[frames[i].group] == name for i in rows)
    assert where["mp-0"] == "test" and where["mp-1"] == "val"
    assert 0.6 < len(splits["train"]) / 300 < 0.95


def test_references_recover_per_source_element_energies():
    mu = {"mptrj": {29: -4.0, 13: -3.0}, "alexandria": {29: -4.5, 13: -3.2}, FORMATION_SOURCE: {29: 0.1, 13: 0.2}}
    frames = []
    for source, m in mu.items():
        for n_cu, n_al in [(1, 0), (0, 2), (1, 1), (2, 1), (1, 3)]:
            frames.append(_frame("Cu" * n_cu + "Al" * n_al, n_cu * m[29] + n_al * m[13], source))
    refs = fit_references(frames)
    for source, m in mu.items():
        for z, value in m.items():
            assert refs.sources[source][z] == pytest.approx(value, abs=2e-3)
    assert refs.energy(np.array([29, 29, 13])) == pytest.approx(2 * -4.0 - 3.0, abs=5e-3)


def test_aligned_references_put_every_source_on_the_formation_energy_scale():
    # Formation energies that no composition-linear fit reproduces: a linear fit per source
    # absorbs a different part of them in each source, the aligned fit none.
    def e_form(n_cu, n_al):
        return -0.8 * n_cu * n_al / (n_cu + n_al) ** 2

    mu = {"mptrj": {29: -4.0, 13: -3.0}, "alexandria": {29: -4.5, 13: -3.2}}
    compositions = {"mptrj": [(1, 0), (0, 2), (1, 1), (2, 1)], "alexandria": [(1, 3), (3, 1), (1, 1), (0, 1)],
                    FORMATION_SOURCE: [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1)]}
    frames, formation = [], []
    for source, rows in compositions.items():
        for n_cu, n_al in rows:
            n = n_cu + n_al
            shift = 0.0 if source == FORMATION_SOURCE else n_cu * mu[source][29] + n_al * mu[source][13]
            frames.append(_frame("Cu" * n_cu + "Al" * n_al, n * e_form(n_cu, n_al) + shift, source))
            formation.append(e_form(n_cu, n_al))
    refs = fit_references(frames, formation=formation)
    assert refs.scale == "aligned" and refs.sources[FORMATION_SOURCE] == {29: 0.0, 13: 0.0}
    for source, m in mu.items():
        for z, value in m.items():
            assert refs.sources[source][z] == pytest.approx(value, abs=2e-3)
    residual = [(f.energy - refs.energy(f.atoms.numbers, f.source)) / len(f.atoms) for f in frames]
    assert residual == pytest.approx(formation, abs=2e-3)  # one residual for every source
    linear = fit_references(frames)
    assert linear.scale == "linear" and abs(linear.sources["mptrj"][29] - mu["mptrj"][29]) > 0.01
    assert References.from_dict(json.loads(json.dumps(refs.to_dict()))).scale == "aligned"
    with pytest.raises(ValueError, match="formation has 2 values for 13 frames"):
        fit_references(frames, formation=[0.0, 0.0])


class _ConstantFormationModel:
    """Stands in for the shipped formation-energy model: −1 eV/atom, trained on Cu and Al."""

    metadata = {"name": "stub", "domain": {"elements": ["Al", "Cu"], "n_atoms": [1, 2]}}

    def predict(self, structures, batch_size=64):
        return np.full(len(structures), -1.0)


def test_formation_estimates_use_labels_the_model_and_a_linear_fit_for_unseen_elements():
    frames = [_frame("Cu", -0.2, FORMATION_SOURCE), _frame("Al2", -0.6, FORMATION_SOURCE),
              _frame("CuAl3", -20.0, "mptrj"), _frame("CuAr", -7.0, "alexandria")]
    estimates = formation_estimates(frames, _ConstantFormationModel())
    # labels per atom; a Cu/Al frame of any size gets the model's value; Ar was never seen by
    # the model, so CuAr takes the relaxed structures' linear fit (Cu −0.2, Ar 0 without data)
    assert estimates == pytest.approx([-0.2, -0.3, -1.0, -0.1], abs=2e-3)


def test_reference_scale_is_checked_and_the_cli_offers_every_scale():
    from ase_crystalformer.cli import train_potential as command

    (option,) = [p for p in command.params if p.name == "reference_scale"]
    assert tuple(option.type.choices) == REFERENCE_SCALES and option.default == REFERENCE_SCALES[0]
    with pytest.raises(ValueError, match="references must be one of"):
        train_potential("unused", "unused", config=TrainConfig(), references="pooled")


def test_default_source_falls_back_to_the_pooled_fit():
    frames = [_frame("Cu", -4.0, "mptrj"), _frame("Cu2", -8.0, "mptrj"), _frame("Ar", -0.1, "alexandria"),
              _frame("CuAr", -4.6, "alexandria")]
    refs = fit_references(frames)
    assert 18 not in refs.sources["mptrj"]
    assert refs.mu()[18] == refs.pooled[18]
    assert refs.energy(np.array([18])) == pytest.approx(refs.pooled[18])
    with pytest.raises(DataError, match=r"no reference energy for \['Ar'\] in source 'mptrj'"):
        refs.energy(np.array([18]), "mptrj")
    assert References.from_dict(json.loads(json.dumps(refs.to_dict()))).mu() == pytest.approx(refs.mu(), abs=1e-6)


def test_training_run_records_split_and_references_and_resumes(tmp_path):
    frames = read_frames(_frames_file(tmp_path / "mptrj.xyz", n_traj=12, per_traj=2))
    frames += read_frames(_frames_file(tmp_path / "alex.xyz", source="Alexandria", key="alexandria_id", n_traj=6,
                                       per_traj=1, seed=1))
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-3, swa_epochs=0, force_weight=1.0, stress_weight=1.0)
    out = tmp_path / "run"
    train_potential(tmp_path, out, config=config, model_config=TINY, steps_per_epoch=2, frames=(frames, {}))
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(sum(splits.values(), [])) == sorted(f.id for f in frames)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [2, 4]
    assert {"val_mae_energy", "val_mae_forces", "val_mae_stress", "val_mae_forces/mptrj.xyz"} <= set(log[0])
    model = load_model(out / "best.safetensors")
    refs = references_of(model)
    assert refs is not None and refs.default == DEFAULT_SOURCE
    assert refs.to_dict() == json.loads((out / "references.json").read_text())
    assert model.metadata["kind"] == "potential"
    config = TrainConfig(**{**config.to_dict(), "epochs": 3, "betas": tuple(config.betas)})
    train_potential(tmp_path, out, config=config, model_config=TINY, steps_per_epoch=2, frames=(frames, {}),
                    resume=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [2, 4, 6]


def _shifted(refs: References, by: float) -> References:
    data = refs.to_dict()
    data["sources"] = {s: {el: v + by for el, v in mu.items()} for s, mu in data["sources"].items()}
    data["pooled"] = {el: v + by for el, v in data["pooled"].items()}
    return References.from_dict(data)


def test_resumed_and_initialised_runs_keep_their_references_when_a_refit_differs(tmp_path, monkeypatch):
    """The aligned fit depends on the shipped mp-e_form: after it changes, a resumed run must
    keep its own references (not relabel its data mid-run) and --init-from the checkpoint's."""
    import ase_crystalformer.potential as potential

    frames = read_frames(_frames_file(tmp_path / "mptrj.xyz", n_traj=12, per_traj=2))
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, swa_epochs=0, force_weight=1.0)
    first = tmp_path / "first"
    train_potential(tmp_path, first, config=config, model_config=TINY, steps_per_epoch=2, frames=(frames, {}))
    kept = json.loads((first / "references.json").read_text())
    fit = potential.fit_references
    monkeypatch.setattr(potential, "fit_references", lambda *a, **k: _shifted(fit(*a, **k), 0.25))
    longer = TrainConfig(**{**config.to_dict(), "epochs": 2, "betas": tuple(config.betas)})
    train_potential(tmp_path, first, config=longer, model_config=TINY, steps_per_epoch=2, frames=(frames, {}),
                    resume=True)
    assert json.loads((first / "references.json").read_text()) == kept
    assert references_of(load_model(first / "latest.safetensors")).to_dict() == kept
    second = tmp_path / "second"
    train_potential(tmp_path, second, config=config, model_config=TINY, steps_per_epoch=2, frames=(frames, {}),
                    init_from=first / "latest.safetensors")
    assert json.loads((second / "references.json").read_text()) == kept
    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.model import Crystalformer

    regressor = save_checkpoint(Crystalformer(TINY), tmp_path / "regressor.safetensors")  # no reference energies
    with pytest.raises(CheckpointError, match="regressor.safetensors: not a potential"):
        train_potential(tmp_path, tmp_path / "fourth", config=config, model_config=TINY, steps_per_epoch=2,
                        frames=(frames, {}), init_from=regressor)
    without_cu = [f for f in frames if 29 not in f.atoms.numbers]  # other elements: other data
    with pytest.raises(CheckpointError, match="cover other sources or elements"):
        train_potential(tmp_path, tmp_path / "third", config=config, model_config=TINY, steps_per_epoch=2,
                        frames=(without_cu, {}), init_from=first / "latest.safetensors")


def test_cli_refuses_a_data_dir_without_frames(tmp_path):
    from click.testing import CliRunner

    from ase_crystalformer.cli import main

    result = CliRunner().invoke(main, ["train-potential", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert f"{tmp_path}: no forces/*.xyz files" in result.output


def test_relaxed_structures_without_energies_teach_forces_only_and_the_choice_is_kept(tmp_path):
    frames = read_frames(_frames_file(tmp_path / "mptrj.xyz", n_traj=12, per_traj=2))
    for k, symbol in enumerate(["Cu", "Al", "Ni"] * 4):
        atoms = bulk(symbol, "fcc", a=3.6, cubic=True)
        frames.append(Frame(f"mp-r{k}", f"mp-r{k}", FORMATION_SOURCE, "mp-megnet", atoms, -0.5 * len(atoms),
                            np.zeros((len(atoms), 3)), np.zeros((3, 3))))
    fixed = {f"mp-r{k}": "train" if k < 9 else "val" for k in range(12)}
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, swa_epochs=0, force_weight=1.0, stress_weight=1.0)
    out = tmp_path / "run"
    train_potential(tmp_path, out, config=config, model_config=TINY, steps_per_epoch=3, relaxed_share=0.5,
                    relaxed_energies=False, frames=(frames, fixed))
    (row,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert np.isfinite([row["train_loss"], row["val_loss"], row["val_mae_energy"]]).all()
    assert "val_mae_forces/mp-megnet" in row and "val_mae_energy/mp-megnet" not in row
    assert row["val_mae_energy"] == pytest.approx(row["val_mae_energy/mptrj.xyz"])
    assert load_model(out / "best.safetensors").metadata["sampling"]["relaxed_energies"] is False
    config = TrainConfig(**{**config.to_dict(), "epochs": 2, "betas": tuple(config.betas)})
    with pytest.raises(ValueError, match="'relaxed_energies': False"):
        train_potential(tmp_path, out, config=config, model_config=TINY, steps_per_epoch=3, relaxed_share=0.5,
                        frames=(frames, fixed), resume=True)
    # Validation that could not score an energy is refused before training.
    only_relaxed = {f"mp-r{k}": "val" if k < 9 else "train" for k in range(12)}
    mptrj = [f for f in frames if f.source != FORMATION_SOURCE]
    with pytest.raises(DataError, match="no validation frame has an energy label"):
        train_potential(tmp_path, tmp_path / "run2", config=config, model_config=TINY, steps_per_epoch=3,
                        relaxed_energies=False, frames=(mptrj + [f for f in frames if f.source == FORMATION_SOURCE],
                                                        {**only_relaxed, **{f.group: "train" for f in mptrj}}))


def test_a_backbone_becomes_a_smooth_potential_that_starts_from_its_head(tmp_path):
    """from_backbone: GELU(βx)/β in place of ReLU, the weights kept, the chosen head
    renormalised; with a large β the potential's energy per atom is the backbone's head."""
    import torch
    from dataclasses import replace

    from ase_crystalformer.checkpoint import save_checkpoint
    from ase_crystalformer.config import ModelConfig, TargetSpec
    from ase_crystalformer.geometry import collate, windows_for
    from ase_crystalformer.model import Crystalformer
    from ase_crystalformer.potential import ENERGY_TARGET, from_backbone

    torch.manual_seed(0)
    config = ModelConfig(n_blocks=2, d_model=16, n_heads=2, d_ff=32, d_head_mlp=16, n_rbf=8, cutoff=7.0,
                         readout="atoms", targets=(TargetSpec("gap", "eV"), TargetSpec("e_form", "eV/atom")))
    backbone = Crystalformer(config).double()
    for p in backbone.parameters():  # a trained-looking backbone: pre-activations of both signs
        p.data.add_(0.05 * torch.randn_like(p))
    backbone.target_mean.copy_(torch.tensor([1.0, -1.5]))
    backbone.target_std.copy_(torch.tensor([0.5, 0.8]))
    structures = [bulk("NaCl", "rocksalt", a=5.6), bulk("Cu", "fcc", a=3.6, cubic=True)]
    structures[1].rattle(0.1, seed=1)
    batch = collate(windows_for(structures, config.cutoff), dtype=torch.float64)
    with torch.no_grad():
        expected = backbone.targets(backbone(batch))[:, 1]
        potential = from_backbone(backbone, "e_form", target_mean=-1.0, target_std=1.3, sharpness=1e4)
        got = potential.targets(potential(batch))[:, 0]
    assert potential.config == replace(config, activation="gelu", activation_sharpness=1e4, targets=(ENERGY_TARGET,))
    assert float(potential.target_mean[0]) == -1.0 and float(potential.target_std[0]) == 1.3
    assert potential.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    with torch.no_grad():  # a small β is a different (smooth) function, not the same one
        blunt = from_backbone(backbone, "e_form", target_mean=-1.0, target_std=1.3, sharpness=1.0)
        assert not torch.allclose(blunt.targets(blunt(batch))[:, 0], expected, atol=1e-3)
    with pytest.raises(CheckpointError, match="no head 'k_vrh'"):
        from_backbone(backbone, "k_vrh", 0.0, 1.0)
    frames = read_frames(_frames_file(tmp_path / "mptrj.xyz", n_traj=12, per_traj=2))
    path = save_checkpoint(backbone.float(), tmp_path / "backbone.safetensors")
    train = TrainConfig(epochs=1, batch_size=4, lr=1e-3, swa_epochs=0, force_weight=1.0)
    with pytest.raises(ValueError, match="not both"):
        train_potential(tmp_path, tmp_path / "both", config=train, steps_per_epoch=1, frames=(frames, {}),
                        backbone=path, backbone_task="e_form", init_from=path)
    train_potential(tmp_path, tmp_path / "run", config=train, steps_per_epoch=2, frames=(frames, {}),
                    backbone=path, backbone_task="e_form")
    trained = load_model(tmp_path / "run" / "latest.safetensors")
    assert trained.config.activation == "gelu" and trained.config.d_model == 16
    assert trained.metadata["init_from"]["task"] == "e_form"
    longer = TrainConfig(**{**train.to_dict(), "epochs": 2, "betas": tuple(train.betas)})
    train_potential(tmp_path, tmp_path / "run", config=longer, steps_per_epoch=2, frames=(frames, {}),
                    backbone=path, backbone_task="e_form", resume=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [2, 4]
    with pytest.raises(ValueError, match="started with a different model config"):  # without its backbone
        train_potential(tmp_path, tmp_path / "run", config=longer, model_config=TINY, steps_per_epoch=2,
                        frames=(frames, {}), resume=True)
