"""The ``crystalformer`` command line: predict, train, evaluate, featurize, ... (click).

The library logs; this module is the only place that talks to the terminal.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click


@click.group()
@click.version_option(package_name="ase-crystalformer")
def main() -> None:
    """Crystalformer crystal property models (Taniai et al., ICLR 2024)."""


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Resolve ``auto`` and refuse a device this machine lacks before any work starts."""
    from .inference import resolve_device

    try:
        return str(resolve_device(value))
    except (ValueError, RuntimeError) as err:  # torch.device raises RuntimeError on a bad string
        raise click.BadParameter(str(err)) from err


def device_option(func):
    """The ``--device`` option every command shares."""
    return click.option("--device", default="auto", show_default=True, callback=_check_device,
                        help="torch device: cpu, cuda, cuda:1, ... or auto (CUDA when present).")(func)


def workers_option(func):
    """``--workers``, shared by predict and featurize (``workers.ordered_map``)."""
    return click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
                        help="Worker processes on this machine, each with its share of the torch threads; output stays in input order.")(func)


def _read_structures(paths: tuple[str, ...], column: str, ignore_errors: bool) -> list:
    """Every structure of every input (``inputs.read_inputs``); the first unreadable one
    stops the command unless ``ignore_errors``."""
    from .errors import CrystalformerError
    from .inputs import read_inputs

    try:
        entries = read_inputs(paths, column)
    except CrystalformerError as err:
        raise click.ClickException(str(err)) from err
    bad = next((e for e in entries if e.error is not None), None)
    if bad is not None and not ignore_errors:
        raise click.ClickException(f"{bad.error}\n(--ignore-errors reports bad inputs and goes on with the rest)")
    return entries


#: Structures from which predict shows a progress bar on a terminal by default.
PROGRESS_MIN = 200


def _progress(total: int, wanted: bool | None):
    """A tqdm bar on stderr: when asked, or by default for many structures on a terminal."""
    from tqdm import tqdm

    stderr = click.get_text_stream("stderr")
    show = wanted if wanted is not None else total >= PROGRESS_MIN and stderr.isatty()
    return tqdm(total=total, file=stderr, disable=not show, leave=False, unit="structure")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_names", multiple=True, help="Model name or checkpoint path (repeatable); default: every shipped property model (not the backbone).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), help="Output format  [default: table; with --out, csv or json from the file's suffix].")
@click.option("--out", "outfile", type=click.Path(dir_okay=False, path_type=Path), help="Write the output to this file instead of stdout.")
@click.option("--column", default="structure", show_default=True, help="Column of a table input holding CIF/POSCAR text or pymatgen Structure dicts.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@device_option
@click.option("--primitive", is_flag=True, help="Predict on primitive cells (same answer, faster for supercells).")
@click.option("--extrapolate", is_flag=True, help="Also print predictions for structures outside a model's training domain (left empty by default).")
@click.option("--ignore-errors", is_flag=True, help="Report structures that cannot be read or taken (stderr and an error column) and predict the rest.")
@click.option("--progress/--no-progress", default=None, help=f"Progress bar on stderr  [default: on a terminal, from {PROGRESS_MIN} structures].")
@workers_option
def predict(inputs: tuple[str, ...], model_names: tuple[str, ...], fmt: str | None, outfile: Path | None, column: str,
            batch_size: int, device: str, primitive: bool, extrapolate: bool, ignore_errors: bool, progress: bool | None,
            workers: int) -> None:
    """Predict properties of every structure in INPUTS.

    INPUTS are structure files (CIF, POSCAR, extxyz, ... : every frame), folders of them,
    or tables (.csv, .json, .parquet) with a --column of structures. FILE@k in the output
    names frame or row k of FILE (from 0).

    A structure unlike a model's training set (an element it never saw; another cell size
    for a model trained on one) gets an empty cell for that model and a note on stderr.
    A committee model adds a <property>_std column after each of its properties: the
    members' spread (ddof=1; log10 units for a log10 target).
    """
    import numpy as np
    import pandas as pd
    import torch

    from .errors import CrystalformerError
    from .committee import Committee
    from .inference import load_models, std_property, target_properties
    from .workers import ordered_map

    if fmt is None:
        suffix = outfile.suffix.lower() if outfile is not None else ""
        fmt = {".csv": "csv", ".json": "json"}.get(suffix, "table")
    entries = _read_structures(inputs, column, ignore_errors)
    errors = {i: e.error for i, e in enumerate(entries) if e.error is not None}
    notes: list[str] = []
    other: list[tuple] = []  # warnings shown after the output, as the notes are
    try:
        models = load_models(list(model_names) or None, torch.device(device), torch.float32)
        properties = target_properties(models)  # the calculator's and featurizer's names
        values = [np.full((len(entries), len(model.config.targets)), np.nan) for _, model in models]
        stds = {m: np.full_like(values[m], np.nan) for m, (_, model) in enumerate(models) if isinstance(model, Committee)}
        outside: list[dict[int, str]] = [{} for _ in models]
        todo = [(i, e.label, e.atoms) for i, e in enumerate(entries) if e.atoms is not None]
        jobs = [(todo[k : k + batch_size], primitive, ignore_errors, batch_size) for k in range(0, len(todo), batch_size)]
        setup = (tuple(model_names), device)
        with _progress(len(todo), progress) as bar:
            for good, failed, chunk_values, chunk_stds, chunk_outside, chunk_other in ordered_map(
                _predict_chunk, jobs, workers, _predict_setup, setup
            ):
                errors.update(failed)
                for m in range(len(models)):
                    values[m][good] = chunk_values[m]
                    if m in stds:
                        stds[m][good] = chunk_stds[m]
                    outside[m].update(chunk_outside[m])
                other += chunk_other
                bar.update(len(good) + len(failed))
    except CrystalformerError as err:
        raise click.ClickException(str(err)) from err
    good = [i for i in range(len(entries)) if i not in errors]
    for m, (label, _) in enumerate(models):
        if outside[m]:
            left = "printed anyway (--extrapolate)" if extrapolate else "left empty; --extrapolate prints them"
            notes.append(f"note: {label}: {len(outside[m])} of {len(good)} structure(s) lie outside its training domain, {left}:")
            notes += [f"  {entries[i].label} ({entries[i].atoms.get_chemical_formula()}): {reason}" for i, reason in outside[m].items()]
            if not extrapolate:
                values[m][list(outside[m])] = np.nan
                if m in stds:
                    stds[m][list(outside[m])] = np.nan
    if errors:
        notes.append(f"skipped {len(errors)} of {len(entries)} input(s) that could not be predicted:")
        notes += [f"  {errors[i]}" for i in sorted(errors)]
    table = pd.DataFrame({
        "structure": [e.label for e in entries],
        "formula": [e.atoms.get_chemical_formula() if e.atoms is not None else "" for e in entries],
    })
    for prop in properties:
        table[f"{prop.name} ({prop.unit})" if prop.unit else prop.name] = values[prop.model][:, prop.column]
        if prop.model in stds:
            name, unit = std_property(prop)
            table[f"{name} ({unit})" if unit else name] = stds[prop.model][:, prop.column]
    if ignore_errors:
        table["error"] = [errors.get(i) for i in range(len(entries))]
    _predict_write(table, fmt, outfile)
    for line in notes:  # after the output has ended with a newline and been flushed
        click.echo(line, err=True)
    for message, category, filename, lineno in other:
        warnings.showwarning(message, category, filename, lineno)
    if outfile is not None:
        click.echo(f"wrote predictions for {len(good)} of {len(entries)} structure(s) to {outfile}", err=True)
    if not good:
        raise click.ClickException("no structure could be predicted")


def _predict_setup(model_names: tuple[str, ...], device: str) -> list:
    """A worker's models (``workers.ordered_map`` setup)."""
    import torch

    from .inference import load_models

    return load_models(list(model_names) or None, torch.device(device), torch.float32)


def _predict_chunk(models: list, job: tuple) -> tuple:
    """Predictions of every model for one chunk of (entry index, label, atoms).

    Each structure's window is built once per cutoff and is both the check and the model's
    input. Returns (indices predicted, {index: error}, per model its (n, T) values, its
    (n, T) std (a committee; else None) and {index: out-of-domain reason}, other warnings
    as (message, category, file, line)).
    """
    import numpy as np

    from .committee import Committee
    from .domain import OutOfDomainWarning
    from .errors import CrystalformerError
    from .forces import energy_target_index
    from .geometry import build_window
    from .potential import reference_per_atom
    from .reciprocal import check_periodic
    from .structures import check_atoms, primitive_cell

    chunk, primitive, ignore_errors, batch_size = job
    cutoffs = sorted({model.config.cutoff for _, model in models})
    windows: dict[float, list] = {c: [] for c in cutoffs}
    good, frames, errors = [], [], {}
    for i, label, atoms in chunk:
        label = f"{label} ({atoms.get_chemical_formula()})"
        try:
            if primitive:
                check_atoms(atoms, label)  # spglib wants a sane structure
                atoms = primitive_cell(atoms)
            built = {c: build_window(atoms, c, label) for c in cutoffs}
            for _, model in models:  # a slab for a model with reciprocal heads: this entry's error
                check_periodic(model.config, [atoms], [label])
        except CrystalformerError as err:
            if not ignore_errors:
                raise
            errors[i] = str(err)
            continue
        good.append(i)
        frames.append(atoms)
        for c in cutoffs:
            windows[c].append(built[c])
    values, stds, outside, other = [], [], [], []
    for _, model in models:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if isinstance(model, Committee):  # its mean and the members' std
                empty = np.zeros((0, len(model.config.targets)))
                mean, std = model.predict(frames, batch_size=batch_size, return_std=True) if frames else (empty, empty)
                values.append(mean.reshape(len(frames), -1))
                stds.append(std.reshape(len(frames), -1))
            else:
                values.append(model.predict_windows(windows[model.config.cutoff], batch_size))
                stds.append(None)
        shift = reference_per_atom(model, frames)  # a potential's energy is network + references
        if shift is not None:
            values[-1][:, energy_target_index(model)] += shift
        outside.append({})
        for w in caught:
            if isinstance(w.message, OutOfDomainWarning):
                outside[-1].update({good[k]: reason for k, reason in w.message.problems.items()})
            else:
                other.append((str(w.message), w.category, w.filename, w.lineno))
    return good, errors, values, stds, outside, other


def _predict_write(table, fmt: str, outfile: Path | None) -> None:
    """The table as csv, json or text, ending with a newline, to ``outfile`` or stdout
    (flushed, so that notes on stderr never land inside the output on a terminal)."""
    if fmt == "csv":
        text = table.to_csv(index=False)
    elif fmt == "json":
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        text = json.dumps(records, indent=2)  # empty cells as null: JSON has no NaN
    else:
        text = table.astype(object).where(table.notna(), "-").to_string(index=False)
    text = text if text.endswith("\n") else text + "\n"
    if outfile is not None:
        outfile.parent.mkdir(parents=True, exist_ok=True)
        outfile.write_text(text, encoding="utf-8")
        return
    click.echo(text, nl=False)  # click.echo flushes


# --------------------------------------------------------------------------- data options
def data_options(func=None, *, multiple: bool = False):
    """Options shared by every command that reads a dataset (``multiple``: --data repeatable)."""
    if func is None:
        return lambda f: data_options(f, multiple=multiple)
    several = (" Repeatable: several datasets train one multi-task model (rows merged by material id;"
               " see --target).") if multiple else ""
    options = [
        click.option("--data", "source", required=True, multiple=multiple, help="Built-in dataset name (mp-megnet, mp20, mp-li, mp40, mp2015, mp-elastic, perov5, carbon24) or a file (CSV, extxyz, ASE db, pymatgen or jarvis-tools JSON)." + several),
        click.option("--data-dir", type=click.Path(file_okay=False), envvar="CRYSTALFORMER_DATA_DIR", help="Folder of the built-in datasets [env CRYSTALFORMER_DATA_DIR]."),
        click.option("--structure-column", help="CSV column holding CIF/POSCAR text."),
        click.option("--id-column", help="CSV column holding ids."),
        click.option("--split-file", type=click.Path(exists=True, dir_okay=False), help="JSON/text file of train/val/test ids."),
        click.option("--split-rule", "split_rule", type=click.Choice(["source", "ratio", "paper"]), help="How to split (default: the source's own split, else a seeded 80/10/10)."),
        click.option("--primitive/--no-primitive", default=False, show_default=True, help="Primitive standard cells, as the paper's pipeline."),
        click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache parsed structures here."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load(source, targets, data_dir, structure_column, id_column, split_file, split_rule, primitive, cache_dir, seed=123):
    from .data import load_dataset
    from .errors import CrystalformerError

    try:
        return load_dataset(source, targets, data_dir=data_dir, structure_column=structure_column,
                            id_column=id_column, split_file=split_file, split=split_rule,
                            seed=seed, primitive=primitive, cache_dir=cache_dir)
    except CrystalformerError as err:
        raise click.ClickException(str(err)) from err


def _target_specs(names: tuple[str, ...], transforms: tuple[str, ...], units: dict[str, str],
                  given_units: tuple[str, ...] = (), as_energy: tuple[str, ...] = ()):
    from .config import TargetSpec

    chosen = {}
    for item in transforms:
        name, _, transform = item.partition(":")
        if name not in names or transform not in ("log10", "none"):
            raise click.BadParameter(f"{item!r}: expected TARGET:log10 with TARGET one of {list(names)}", param_hint="--transform")
        chosen[name] = transform
    units = dict(units)
    for item in given_units:
        name, sep, unit = item.partition(":")
        if name not in names or not sep:
            raise click.BadParameter(f"{item!r}: expected TARGET:UNIT with TARGET one of {list(names)}", param_hint="--unit")
        units[name] = unit
    specs = []
    for name in names:
        if name == "energy":  # total energy: learnt per atom, gives forces and stress
            specs.append(TargetSpec("energy", "eV/atom", kind="energy"))
        else:
            if name in as_energy and chosen.get(name, "none") != "none":
                raise click.BadParameter(f"{name}: an energy target cannot be transformed", param_hint="--as-energy")
            kind = "energy" if name in as_energy else "intensive"
            specs.append(TargetSpec(name, units.get(name, ""), transform=chosen.get(name, "none"), kind=kind))
    unknown = set(as_energy) - set(names)
    if unknown:
        raise click.BadParameter(f"{sorted(unknown)} are not among the targets {list(names)}", param_hint="--as-energy")
    return specs


def _final_report(out_dir: Path, dataset, batch_size: int, device: str, kinds=("best", "swa")) -> dict:
    """Val and test metrics of the best-validation and SWA models of a finished run (or
    of its committee directory)."""
    from .checkpoint import load_model
    from .evaluation import evaluate

    report = {}
    for kind in kinds:
        path = out_dir / (kind if kind == "committee" else f"{kind}.safetensors")
        if not path.exists():
            continue
        model = load_model(path, device=device)
        for split in ("val", "test"):
            if dataset.splits.get(split):
                metrics, _, _ = evaluate(model, dataset, split, batch_size=batch_size)
                report[f"{kind}_{split}"] = metrics
    return report


def _run_training(opts: dict, *, init_from=None, freeze_encoder: bool = False, head_from=None, model_config=None) -> None:
    """Shared body of ``train`` and ``finetune``; ``opts`` are the click options by name.

    The run directory is locked (and checked for another run) before the data is read, so
    a second run into it fails at once, and stays locked until report.json is written.
    """
    import os
    import sys

    from .config import TrainConfig
    from .errors import CrystalformerError
    from .rundir import run_directory
    from .training import train, write_json

    targets, sources = opts["targets"], opts["source"]
    out, device = Path(opts["out"]), opts["device"]
    try:
        with run_directory(out, resume=opts["resume"], overwrite=opts["overwrite"]):
            if len(sources) == 1 and not any("=" in t for t in targets):
                dataset = _load(sources[0], list(targets), opts["data_dir"], opts["structure_column"],
                                opts["id_column"], opts["split_file"], opts["split_rule"], opts["primitive"],
                                opts["cache_dir"], seed=opts["seed"])
            else:
                dataset = _load_multitask(sources, targets, opts)
                targets = tuple(dataset.targets)
            specs = _target_specs(targets, opts["transforms"], dataset.units, opts["units"], opts["as_energy"])
            config = TrainConfig(
                epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"],
                swa_epochs=min(opts["swa_epochs"], opts["epochs"]), seed=opts["seed"],
                weight_decay=opts["weight_decay"], lr_decay_steps=opts["lr_decay_steps"], clip_norm=opts["clip_norm"],
                betas=tuple(opts["betas"]), force_weight=opts["force_weight"], stress_weight=opts["stress_weight"],
                task_weights=_task_weights(opts["task_weights"], targets),
            )

            def echo(summary: dict) -> None:
                val = " ".join(f"{k}={v:.4g}" for k, v in summary.items() if k.startswith("val_"))
                click.echo(f"epoch {summary['epoch']:>4} step {summary['step']:>6} loss {summary['train_loss']:.4f} "
                           f"lr {summary['lr']:.2e} {val} {summary['structures_per_s']:.0f} structures/s "
                           f"({summary['wall_time_s']:.0f} s)")

            common = dict(model_config=model_config, init_from=init_from, freeze_encoder=freeze_encoder, head_from=head_from,
                          resume=opts["resume"], overwrite=opts["overwrite"], device=device,
                          command=" ".join(["crystalformer", *sys.argv[1:]]), progress=opts["progress"],
                          on_epoch=echo, num_workers=opts["workers"])
            if opts["committee"] > 1:  # member-k runs with seed + k, then one committee directory
                from .committee import committee_from_runs, train_committee

                reports = train_committee(dataset, specs, out, members=opts["committee"], config=config, **common)
                runs = [out / f"member-{k}" for k in range(opts["committee"])]
                committee_from_runs(runs, out / "committee", {"command": common["command"]})
                if dataset.splits.get("val"):  # the members' spread, scaled to their errors
                    from .committee import calibrate_committee

                    calibrate_committee(out / "committee", dataset, "val", opts["batch_size"])
                report = {"members": reports, "skipped": reports[0]["skipped"],
                          "metrics": _final_report(out, dataset, opts["batch_size"], device, kinds=("committee",))}
            else:
                report = train(dataset, specs, out, config=config, **common)
                report["metrics"] = _final_report(out, dataset, opts["batch_size"], device)
            if int(os.environ.get("RANK", "0")) == 0:
                write_json(report, out / "report.json")
    except (CrystalformerError, ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    if report["skipped"]:
        click.echo(f"skipped {len(report['skipped'])} structures (ids and reasons in report.json)")
    for key, metrics in report["metrics"].items():
        click.echo(f"{key}: " + ", ".join(f"{t} MAE {m['mae']:.4g} (n={m['n']})" + _calibration_text(m)
                                         for t, m in metrics.items()))


def _calibration_text(metrics: dict) -> str:
    """A committee's calibration of one target, as evaluate and train print it."""
    c = metrics.get("calibration")
    if not c:
        return ""
    return (f" calibration: Spearman(|error|, std) {c['spearman']:.3f}, within 1 std {c['within_1sigma']:.3f},"
            f" within 2 std {c['within_2sigma']:.3f}")


def _load_multitask(sources: tuple[str, ...], targets: tuple[str, ...], opts: dict):
    """Several datasets (or named tasks) as one multi-task set (``data.multitask``)."""
    from .data.multitask import load_multitask
    from .errors import CrystalformerError

    for option, hint in (("split_file", "--split-file"), ("split_rule", "--split-rule")):
        if opts[option] is not None:  # a multi-task run keeps each dataset's own split
            raise click.BadParameter("applies to one dataset; a multi-task run keeps each dataset's own split "
                                     "and draws --val-fraction from those without one", param_hint=hint)
    try:
        return load_multitask(list(sources), list(targets), data_dir=opts["data_dir"], val_fraction=opts["val_fraction"],
                              seed=opts["seed"], structure_column=opts["structure_column"], id_column=opts["id_column"],
                              primitive=opts["primitive"], cache_dir=opts["cache_dir"])
    except CrystalformerError as err:
        raise click.ClickException(str(err)) from err


def _task_weights(items: tuple[str, ...], targets: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    weights = []
    for item in items:
        name, sep, value = item.rpartition(":")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or name not in targets or not weight >= 0:
            raise click.BadParameter(f"{item!r}: expected TASK:WEIGHT (weight >= 0) with TASK one of {list(targets)}",
                                     param_hint="--task-weight")
        weights.append((name, weight))
    return tuple(weights)


def training_options(func):
    options = [
        click.option("--target", "targets", multiple=True, required=True, help="Target column (repeatable); 'energy' trains total energy per atom. With several --data: TASK=DATA:COLUMN names a task and where its labels come from (one TASK from several DATA pools labels of one scheme, e.g. band_gap@mp=mp20:band_gap band_gap@mp=mp-li:band_gap); a plain COLUMN must belong to one dataset only. Structures keep only the labels they have."),
        click.option("--task-weight", "task_weights", multiple=True, help="TASK:WEIGHT in the loss (default 1 each; the loss is the weighted mean of each task's mean L1)."),
        click.option("--val-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Several --data: the validation share of datasets without a split of their own (MEGNet val/test ids and the shipped models' test ids never train)."),
        click.option("--transform", "transforms", multiple=True, help="TARGET:log10 to learn log10 of a positive target."),
        click.option("--unit", "units", multiple=True, help="TARGET:UNIT where the data does not say (e.g. k_vrh:GPa)."),
        click.option("--as-energy", multiple=True, help="A per-atom energy target (eV/atom, e.g. e_form) that the ASE calculator turns into energy, forces and stress."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, log.jsonl, report.json)."),
        click.option("--epochs", default=500, show_default=True, type=click.IntRange(min=1)),
        click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1)),
        click.option("--lr", default=5e-4, show_default=True, type=float),
        click.option("--swa-epochs", default=50, show_default=True, type=click.IntRange(min=0)),
        click.option("--seed", default=123, show_default=True, type=int),
        device_option,
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch."),
        click.option("--overwrite", is_flag=True, help="Remove the files of a previous run in --out and start afresh (without it, a used --out is refused)."),
        click.option("--weight-decay", default=1e-5, show_default=True, help="AdamW weight decay (not on biases)."),
        click.option("--lr-decay-steps", default=4000, show_default=True, type=click.IntRange(min=1), help="T of lr·sqrt(T/(T+t))."),
        click.option("--clip-norm", default=1.0, show_default=True, help="Global gradient-norm clip."),
        click.option("--betas", default=(0.9, 0.98), nargs=2, type=float, show_default=True, help="AdamW betas."),
        click.option("--force-weight", default=0.0, show_default=True, help="Weight of the force L1 loss (eV/Å)."),
        click.option("--stress-weight", default=0.0, show_default=True, help="Weight of the stress L1 loss (eV/Å³)."),
        click.option("--progress/--no-progress", default=True, show_default=True),
        click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="DataLoader worker processes that collate batches."),
        click.option("--committee", default=1, show_default=True, type=click.IntRange(min=1), help="Train this many members (runs OUT/member-k, seed + k: own initialisation and data order) and save their final models (SWA, or best validation without SWA) as one committee in OUT/committee, whose spread, scaled to the validation errors (std_scale in committee.json), is the uncertainty (>= 5 recommended)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


READOUT_HELP = ("mean: the paper's head on the mean of the atom features; atoms: the head on every atom, "
                "then the mean (an energy becomes a sum of per-atom energies, the form of a potential).")


@main.command()
@data_options(multiple=True)
@training_options
@click.option("--cutoff", default=10.0, show_default=True, help="Window radius in Å.")
@click.option("--blocks", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--activation", type=click.Choice(["relu", "gelu", "silu"]), default="relu", show_default=True, help="silu or gelu give smooth forces (ReLU forces are only piecewise smooth).")
@click.option("--domain", type=click.Choice(["real", "reciprocal", "alternating", "dual", "routed"]), default="real", show_default=True,
              help="Attention heads in real space (the paper's model), in reciprocal space (wide Gaussians over the whole crystal), alternating layers, dual (half the heads of each layer each), or routed (every head's α a learned, per-atom mixture of its real- and reciprocal-space lattice sums). Reciprocal heads need 3D-periodic cells.")
@click.option("--route-temperature", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Routed domain only: the factor on the gate's logit (larger: the gates commit to one space sooner).")
@click.option("--readout", type=click.Choice(["mean", "atoms"]), default="mean", show_default=True, help=READOUT_HELP)
def train(cutoff: float, blocks: int, activation: str, domain: str, route_temperature: float, readout: str,
          **opts) -> None:
    """Train a Crystalformer from scratch with the paper's recipe."""
    from .config import ModelConfig

    try:
        model_config = ModelConfig(n_blocks=blocks, cutoff=cutoff, activation=activation, domain=domain,
                                   route_temperature=route_temperature, readout=readout)
    except ValueError as err:  # the config's own checks, e.g. the cutoff's range
        raise click.UsageError(str(err)) from err
    _run_training(opts, model_config=model_config)


@main.command()
@click.option("--from", "init_from", required=True, help="Trained model name or checkpoint path.")
@click.option("--freeze-encoder", is_flag=True, help="Train only the head MLP.")
@click.option("--head-from", "head_from", multiple=True, metavar="TARGET=BASE_TARGET",
              help="Start TARGET's output from the base model's BASE_TARGET output (and the head's hidden layer), "
                   "e.g. band_gap=band_gap@megnet from the multi-task backbone; its predictions start unchanged "
                   "in target units. Repeatable. Without it the head is kept only when the targets match.")
@data_options(multiple=True)
@training_options
def finetune(init_from: str, freeze_encoder: bool, head_from: tuple[str, ...], **opts) -> None:
    """Fine-tune a trained model (a new head when the targets differ, unless --head-from)."""
    pairs = {}
    for item in head_from:
        target, sep, base = item.partition("=")
        if not (sep and target and base):
            raise click.BadParameter(f"{item!r}: use TARGET=BASE_TARGET", param_hint="--head-from")
        pairs[target] = base
    _run_training(opts, init_from=init_from, freeze_encoder=freeze_encoder, head_from=pairs or None)


@main.command()
@click.option("--model", "model_name", required=True, help="Model name or checkpoint path.")
@data_options
@click.option("--split", "which", type=click.Choice(["train", "val", "test", "all"]), help="Default: test when the source defines splits, else all.")
@click.option("--task", "tasks", multiple=True, help="TARGET=COLUMN: score the model's TARGET on the dataset's COLUMN (e.g. a multi-task model's e_form@megnet=e_form); with --task only the named targets are scored.")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Write predictions.csv and parity.png here.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@device_option
def evaluate(model_name, source, data_dir, structure_column, id_column, split_file, split_rule, primitive, cache_dir,
             which, tasks, out_dir, batch_size, device):
    """MAE, RMSE and R² of a model on a dataset split, a per-structure CSV and a parity plot.

    For a committee also the calibration of its std: Spearman's rank correlation of |error|
    with std and the fractions of errors within 1 and 2 std.
    """
    from .checkpoint import load_model
    from .errors import CrystalformerError
    from .evaluation import evaluate as run_evaluation
    from .evaluation import parity_plot

    try:
        model = load_model(model_name, device=device)
    except CrystalformerError as err:
        raise click.ClickException(str(err)) from err
    names = [t.name for t in model.config.targets]
    mapping = {}
    for item in tasks:
        name, sep, column = item.partition("=")
        if not sep or name not in names or not column:
            raise click.BadParameter(f"{item!r}: expected TARGET=COLUMN with TARGET one of {names}", param_hint="--task")
        mapping[name] = column
    columns = list(mapping.values()) if mapping else names
    dataset = _load(source, columns, data_dir, structure_column, id_column, split_file, split_rule, primitive, cache_dir)
    if mapping:  # the dataset's columns under the model's target names
        for record in dataset.records:
            record.targets = {name: record.targets[c] for name, c in mapping.items() if c in record.targets}
        dataset.units = {name: dataset.units.get(c, "") for name, c in mapping.items()}
    which = which or ("test" if dataset.splits.get("test") else "all")
    try:
        metrics, table, skipped = run_evaluation(model, dataset, which, batch_size=batch_size)
    except CrystalformerError as err:
        raise click.ClickException(str(err)) from err
    for spec in model.config.targets:
        if mapping and spec.name not in mapping:
            continue
        m = metrics[spec.name]
        unit = f"log10({spec.unit})" if spec.transform == "log10" else spec.unit
        click.echo(f"{spec.name} [{which}, n={m['n']}]: MAE {m['mae']:.4g} {unit}  RMSE {m['rmse']:.4g}  R2 {m['r2']:.4f}"
                   + _calibration_text(m))
    if skipped:
        click.echo(f"skipped {len(skipped)} structures: " + "; ".join(f"{i}: {r}" for i, r in skipped[:5]))
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "predictions.csv", index=False)
        parity_plot(table, [t.name for t in model.config.targets if not mapping or t.name in mapping], out / "parity.png", title=Path(str(model_name)).name)
        (out / "metrics.json").write_text(json.dumps({"split": which, "metrics": metrics}, indent=2))
        click.echo(f"wrote {out / 'predictions.csv'}, {out / 'parity.png'}")


@main.command()
def models() -> None:
    """List the shipped models: property (as predict names it), unit, training target, test MAE.

    A backbone (noted below the table) is loaded only when named: predict and the
    calculator without a model use the others; the featurizer's embedding defaults to it."""
    from .checkpoint import is_backbone, list_models, load_model
    from .inference import property_name

    names = list_models()
    if not names:
        click.echo("no shipped models found")
        return
    rows = [("model", "property", "unit", "trained on", "test MAE")]
    for name in names:
        model = load_model(name)
        test = model.metadata.get("test_mae", {})
        for spec in model.config.targets:
            prop, unit = property_name(spec)
            mae = test.get(spec.name)
            mae_unit = f"log10({spec.unit})" if spec.transform == "log10" else spec.unit
            rows.append((name, prop, unit, spec.name, f"{mae} {mae_unit}" if mae is not None else "n/a"))
    widths = [max(len(row[k]) for row in rows) for k in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    for name in filter(is_backbone, names):
        click.echo(f"\n{name}: a backbone, used only when named (fine-tuning, the featurizer's default "
                   "embedding); predict and the calculator without a model leave it out")


# ---------------------------------------------------------------- featurize and phonons
def _featurize_write(table, path: Path) -> None:
    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".csv"):
        table.to_csv(path, index=False)
    elif name.endswith(".json"):
        table.to_json(path, orient="records", indent=1)
    elif name.endswith(".parquet"):
        try:
            table.to_parquet(path, index=False)
        except ImportError as err:
            raise click.ClickException(f"{path}: writing Parquet needs pyarrow ({err})") from err
    else:
        raise click.ClickException(f"{path}: unknown output format; use .csv, .json or .parquet")


def _featurize_read(infile: Path, column: str, ignore_errors: bool):
    """The input table and its entries (``inputs``); a structure file or folder becomes a
    table of one ``structure`` column of labels."""
    import pandas as pd

    from .errors import CrystalformerError
    from .inputs import is_table, read_table, table_entries

    try:
        table = read_table(infile) if infile.is_file() and is_table(infile) else None
        entries = table_entries(table, column, infile) if table is not None else None
    except CrystalformerError as err:
        raise click.ClickException(str(err)) from err
    if entries is None:
        entries = _read_structures((str(infile),), column, ignore_errors)
        table = pd.DataFrame({"structure": [e.label for e in entries]})
        return table, entries, False
    bad = next((e for e in entries if e.error is not None), None)
    if bad is not None and not ignore_errors:
        raise click.ClickException(f"{bad.error}\n(--ignore-errors reports bad inputs and goes on with the rest)")
    return table, entries, True


def _same(value):
    """The featurizer itself as a worker's state (a copy pickled without its model, which
    the worker loads)."""
    return value


def _featurize_part(featurizer, job: tuple) -> tuple:
    """Features of rows ``start``, ``start + 1``, ... (``CrystalformerFeaturizer.featurize_part``)."""
    start, rows, ignore_errors = job
    return featurizer.featurize_part(rows, start, ignore_errors, return_errors=ignore_errors)


@main.command()
@click.argument("infile", metavar="IN", type=click.Path(exists=True, path_type=Path))
@click.option("--column", default="structure", show_default=True, help="Column holding CIF/POSCAR text or pymatgen Structure dicts (JSON).")
@click.option("--out", "outfile", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output table (.csv, .json or .parquet).")
@click.option("--model", "model_name", help="Model name or checkpoint path; default (for --mode embedding only): the shipped backbone, multitask-backbone.")
@click.option("--mode", type=click.Choice(["embedding", "predictions", "both"]), default="embedding", show_default=True)
@click.option("--pooling", default="mean,max,min,std", show_default=True, help="Statistics of the atom features in the embedding, comma-separated from mean, max, min, std (all four: 4 x d columns; mean: d, the head's input).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@device_option
@click.option("--ignore-errors", is_flag=True, help="Give failing rows NaN features and an error column instead of stopping.")
@click.option("--keep-structure", is_flag=True, help="Keep the structure column of a table in the output.")
@workers_option
def featurize(infile: Path, column: str, outfile: Path, model_name: str | None, mode: str, pooling: str, batch_size: int,
              device: str, ignore_errors: bool, keep_structure: bool, workers: int) -> None:
    """Add Crystalformer features (embedding and/or predictions) to every structure of IN.

    IN is a table (.csv, .json, .parquet) with a --column of structures, whose other columns
    are kept; or, as predict reads them, a structure file or a folder of them, giving one row
    per structure.
    """
    import numpy as np
    import pandas as pd

    from .errors import CrystalformerError
    from .featurizer import CrystalformerFeaturizer
    from .workers import ordered_map

    if model_name is None and mode != "embedding":
        raise click.BadParameter(f"--mode {mode} needs --model (the default model, the backbone, is for embeddings)",
                                 param_hint="--model")
    table, entries, from_table = _featurize_read(infile, column, ignore_errors)
    try:
        featurizer = CrystalformerFeaturizer(model_name, mode=mode, device=device, batch_size=batch_size,
                                             pooling=[p.strip() for p in pooling.split(",")])
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--pooling") from err
    try:
        labels = featurizer.feature_labels()
        # Unreadable rows too (they fail again, as None), so that "structure k" in a message is row k.
        rows = [(e.atoms,) for e in entries]
        jobs = [(start, rows[start : start + batch_size], ignore_errors) for start in range(0, len(rows), batch_size)]
        features, seen = [], []
        for part, part_seen in ordered_map(_featurize_part, jobs, workers, _same, (featurizer,)):
            features += part
            seen += part_seen
        featurizer.warn_outside(seen, len(rows))
    except (CrystalformerError, ImportError) as err:
        raise click.ClickException(str(err)) from err
    values = np.full((len(table), len(labels)), np.nan)
    errors = [e.error for e in entries]
    for row, feats in enumerate(features):
        values[row] = feats[: len(labels)]
        if errors[row] is None and ignore_errors and isinstance(feats[-1], str):
            errors[row] = feats[-1].strip().splitlines()[-1]  # the exception line, not the traceback
    out = table if keep_structure or not from_table else table.drop(columns=[column])
    if keep_structure and from_table:  # dicts as JSON text, so that every output format can hold them
        out = out.assign(**{column: [json.dumps(v) if isinstance(v, dict) else v for v in table[column]]})
    out = out.reset_index(drop=True)
    out = pd.concat([out, pd.DataFrame(values, columns=labels)], axis=1)
    if ignore_errors:
        out["crystalformer_error"] = errors
    _featurize_write(out, outfile)
    n_failed = sum(e is not None for e in errors)
    click.echo(f"wrote {len(labels)} features for {len(table) - n_failed} of {len(table)} structures to {outfile}")
    if n_failed:
        click.echo(f"{n_failed} rows failed; see the crystalformer_error column")


@main.command()
@click.argument("structure", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_names", multiple=True, help="Model name or checkpoint path (repeatable); needs an energy-type target. Default: the shipped potential.")
@click.option("--supercell", nargs=3, type=click.IntRange(min=1), default=(2, 2, 2), show_default=True)
@click.option("--displacement", default=0.01, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Atomic displacement in Å.")
@click.option("--mesh", nargs=3, type=click.IntRange(min=1), default=(20, 20, 20), show_default=True, help="q-point mesh for DOS and thermal properties.")
@click.option("--out", "out_dir", default="phonons", show_default=True, type=click.Path(file_okay=False), help="Folder for phonopy_params.yaml, band_dos.png and thermal.csv.")
@device_option
def phonons(structure: str, model_names: tuple[str, ...], supercell: tuple[int, int, int], displacement: float,
            mesh: tuple[int, int, int], out_dir: str, device: str) -> None:
    """Harmonic phonons of STRUCTURE (CIF, POSCAR, extxyz, ...): bands, DOS, thermal properties."""
    from ase.calculators.calculator import PropertyNotImplementedError
    from ase.io import read

    from .errors import CrystalformerError
    from .potential import DEFAULT_POTENTIAL

    try:
        from .calculator import CrystalformerCalculator
        from .phonons import run_phonons
    except ImportError as err:
        raise click.ClickException(str(err)) from err
    try:
        atoms = read(structure)
    except Exception as err:  # ase raises many types for unreadable files
        raise click.ClickException(f"{structure}: cannot read a structure ({err})") from err
    try:
        calc = CrystalformerCalculator(list(model_names) or DEFAULT_POTENTIAL, device=device, dtype="float64")
        result = run_phonons(atoms, calc, supercell=supercell, displacement=displacement, mesh=mesh, out_dir=out_dir)
    except (CrystalformerError, PropertyNotImplementedError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    n_disp = len(result.phonopy.supercells_with_displacements)
    click.echo(f"{atoms.get_chemical_formula()}: supercell {' x '.join(map(str, supercell))}, {n_disp} displacement(s) of {displacement} Å")
    click.echo(f"lowest frequency {result.min_frequency:.3f} THz" + ("  (imaginary modes: not dynamically stable at this cell, or the model's curvature is unreliable here)" if result.has_imaginary_modes else ""))
    t = result.thermal
    i = int(abs(t["temperatures"] - 300.0).argmin())
    click.echo(f"at {t['temperatures'][i]:.0f} K: F = {t['free_energy'][i]:.3f} kJ/mol, S = {t['entropy'][i]:.2f} J/K/mol, Cv = {t['heat_capacity'][i]:.2f} J/K/mol (per mole of primitive cells)")
    for path in result.files.values():
        click.echo(f"wrote {path}")


@main.command("train-potential")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False), envvar="CRYSTALFORMER_DATA_DIR", help="Shared data folder: forces/*.xyz and the mp-megnet structures [env CRYSTALFORMER_DATA_DIR].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, log.jsonl, splits.json, references.json).")
@click.option("--epochs", default=400, show_default=True, type=click.IntRange(min=1), help="Sub-epochs of --steps-per-epoch batches each.")
@click.option("--steps-per-epoch", default=150, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=5e-4, show_default=True, type=float)
@click.option("--lr-decay-steps", default=4000, show_default=True, type=click.IntRange(min=1), help="T of lr·sqrt(T/(T+t)).")
@click.option("--swa-epochs", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--force-weight", default=0.3, show_default=True, help="Weight of the force L1 loss (eV/Å); the energy loss is L1 of energy per atom over its training std.")
@click.option("--stress-weight", default=3.0, show_default=True, help="Weight of the stress L1 loss (eV/Å³).")
@click.option("--relaxed-share", default=0.5, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Share of the draws that are relaxed MP structures.")
@click.option("--relaxed-energies/--no-relaxed-energies", default=True, show_default=True, help="Whether the relaxed structures' formation energies enter the energy loss (without: they teach zero forces and stress only; see potential.make_examples).")
@click.option("--references", "reference_scale", type=click.Choice(["aligned", "linear"]), default="aligned", show_default=True, help="Reference energies: 'aligned' puts every source on MP's formation-energy scale (total-energy sources fitted against the shipped mp-e_form model's formation energies), 'linear' fits each source on its own (ase_crystalformer.potential).")
@click.option("--modulus-weight", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Weight of the relative bulk-modulus error (mp-elastic K_VRH at DFT cells, by isotropic strain; ase_crystalformer.elastic) in the loss; 0: no modulus term.")
@click.option("--modulus-batch", default=8, show_default=True, type=click.IntRange(min=1), help="mp-elastic structures per step for the modulus term.")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), help="Start from this potential checkpoint's weights (same architecture and reference energies).")
@click.option("--from-backbone", "backbone", help="Start from this multi-task backbone (name or path) and its --backbone-task head, its ReLUs made smooth (ase_crystalformer.potential.from_backbone); the architecture options are then the backbone's.")
@click.option("--backbone-task", default="e_form@megnet", show_default=True, help="The backbone head the energy starts from (a formation energy on MP's scale, as the aligned references expect).")
@click.option("--max-val-relaxed", default=200, show_default=True, type=click.IntRange(min=0), help="Relaxed MEGNet-val structures in the validation set.")
@click.option("--blocks", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--d-model", default=64, show_default=True, type=click.IntRange(min=8))
@click.option("--heads", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--readout", type=click.Choice(["mean", "atoms"]), default="atoms", show_default=True, help=READOUT_HELP)
@click.option("--seed", default=123, show_default=True, type=int)
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--overwrite", is_flag=True, help="Remove the files of a previous run in --out and start afresh.")
@device_option
def train_potential(data_dir: str, out: str, epochs: int, steps_per_epoch: int, batch_size: int, lr: float,
                    lr_decay_steps: int, swa_epochs: int, force_weight: float, stress_weight: float,
                    relaxed_share: float, relaxed_energies: bool, reference_scale: str, modulus_weight: float,
                    modulus_batch: int, init_from: str | None, backbone: str | None, backbone_task: str, max_val_relaxed: int, blocks: int, d_model: int, heads: int, readout: str, seed: int,
                    threads: int | None, resume: bool, overwrite: bool, device: str) -> None:
    """Train a Crystalformer potential on DFT energies, forces and stresses.

    Data: every frame of DATA_DIR/forces/*.xyz and the DFT-relaxed mp-megnet structures of the
    MEGNet train split (formation energy × N, zero forces and stress). Split by material id;
    per-source, per-element reference energies; see ase_crystalformer.potential.
    """
    import sys

    import torch

    from .config import TrainConfig
    from .errors import CrystalformerError
    from .potential import default_model_config
    from .potential import train_potential as run

    if threads:
        torch.set_num_threads(threads)

    def echo(summary: dict) -> None:
        val = " ".join(f"{k}={v:.4g}" for k, v in summary.items() if k.startswith("val_") and "/" not in k)
        click.echo(f"epoch {summary['epoch']:>4} step {summary['step']:>6} loss {summary['train_loss']:.4f} "
                   f"{val} ({summary['wall_time_s']:.0f} s)", err=False)

    try:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay_steps=lr_decay_steps,
                             swa_epochs=min(swa_epochs, epochs), seed=seed, force_weight=force_weight,
                             stress_weight=stress_weight, eval_batch_size=32)
        model_config = default_model_config(n_blocks=blocks, d_model=d_model, n_heads=heads,
                                            d_ff=4 * d_model, d_head_mlp=d_model, readout=readout)
        report = run(data_dir, out, config=config, model_config=model_config, steps_per_epoch=steps_per_epoch,
                     relaxed_share=relaxed_share, relaxed_energies=relaxed_energies, references=reference_scale,
                     modulus_weight=modulus_weight, modulus_batch=modulus_batch, init_from=init_from,
                     backbone=backbone, backbone_task=backbone_task, max_val_relaxed=max_val_relaxed, resume=resume, overwrite=overwrite, device=device,
                     command=" ".join(["crystalformer", *sys.argv[1:]]), on_epoch=echo)
    except (CrystalformerError, ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(report))


@main.command("relax")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for relaxed.extxyz and summary.csv (and traj/ with --trajectory).")
@click.option("--model", "model_names", multiple=True, help="Model name or checkpoint path (repeatable); default: the shipped potential.")
@click.option("--fmax", default=0.05, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Force criterion in eV/Å (with the cell: also stress × volume).")
@click.option("--steps", default=500, show_default=True, type=click.IntRange(min=0), help="Most optimizer steps per structure.")
@click.option("--fixed-cell", is_flag=True, help="Relax positions only (default: positions and cell, FrechetCellFilter).")
@click.option("--optimizer", type=click.Choice(["FIRE", "BFGS", "LBFGS"]), default="FIRE", show_default=True)
@click.option("--trajectory", is_flag=True, help="Write OUT/traj/<k>.traj for the k-th structure.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Structures per model call.")
@device_option
def relax_command(files: tuple[str, ...], out_dir: str, model_names: tuple[str, ...], fmax: float, steps: int,
                  fixed_cell: bool, optimizer: str, trajectory: bool, batch_size: int, device: str) -> None:
    """Relax every structure in FILES (CIF, POSCAR, extxyz, ...), all together in batches.

    Writes OUT/relaxed.extxyz (the relaxed structures with energy, forces, stress and their
    converged flag) and OUT/summary.csv (steps, final energy and fmax, volume change).
    """
    import pandas as pd
    from ase.io import write

    from .errors import CrystalformerError
    from .potential import DEFAULT_POTENTIAL
    from .relax import relax

    entries = _read_structures(files, "structure", False)
    labels, frames = [e.label for e in entries], [e.atoms for e in entries]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if trajectory:
        (out / "traj").mkdir(exist_ok=True)
    try:
        from .calculator import CrystalformerCalculator

        calc = CrystalformerCalculator(list(model_names) or DEFAULT_POTENTIAL, device=device, batch_size=batch_size)
        results = relax(frames, calc, fmax=fmax, steps=steps, cell=not fixed_cell, optimizer=optimizer,
                        trajectory=str(out / "traj" / "{index}.traj") if trajectory else None)
    except (CrystalformerError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    rows = []
    for label, start, r in zip(labels, frames, results, strict=True):
        r.atoms.info.update(structure=label, converged=r.converged, relax_steps=r.steps)
        v0, v1 = start.get_volume(), r.atoms.get_volume()
        rows.append({"structure": label, "formula": r.atoms.get_chemical_formula(), "converged": r.converged,
                     "steps": r.steps, "energy_eV": r.energy, "fmax_eV_A": r.fmax,
                     "volume_A3": v1, "volume_change": v1 / v0 - 1})
    write(out / "relaxed.extxyz", [r.atoms for r in results], format="extxyz")
    table = pd.DataFrame(rows)
    table.to_csv(out / "summary.csv", index=False)
    click.echo(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    click.echo(f"{sum(r.converged for r in results)} of {len(results)} converged (fmax {fmax} eV/Å); wrote {out / 'relaxed.extxyz'}, {out / 'summary.csv'}")
