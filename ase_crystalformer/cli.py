"""The ``crystalformer`` command line: predict, train, evaluate, featurize, ... (click).

The library logs; this module is the only place that talks to the terminal.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
@click.version_option(package_name="ase-crystalformer")
def main() -> None:
    """Crystalformer crystal property models (Taniai et al., ICLR 2024)."""


def _read_structures(files: tuple[str, ...]) -> tuple[list[str], list]:
    """Every frame of every file that ``ase.io.read`` understands, with a label each."""
    from ase.io import read

    labels, frames = [], []
    for name in files:
        try:
            images = read(name, index=":")
        except Exception as err:  # ase raises many types for unreadable files
            raise click.ClickException(f"{name}: cannot read structures ({err})") from err
        for k, atoms in enumerate(images):
            labels.append(name if len(images) == 1 else f"{name}@{k}")
            frames.append(atoms)
    return labels, frames


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_names", multiple=True, help="Model name or checkpoint path (repeatable); default: every shipped model.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
def predict(files: tuple[str, ...], model_names: tuple[str, ...], fmt: str, batch_size: int, device: str) -> None:
    """Predict properties of every structure in FILES (CIF, POSCAR, extxyz, ...)."""
    import pandas as pd

    from .checkpoint import list_models, load_model
    from .errors import CrystalformerError

    names = list(model_names) or list_models()
    if not names:
        raise click.ClickException("no model given and no shipped model found")
    labels, frames = _read_structures(files)
    table = pd.DataFrame({"structure": labels, "formula": [a.get_chemical_formula() for a in frames]})
    try:
        for name in names:
            model = load_model(name, device=device)
            values = model.predict(frames, batch_size=batch_size).reshape(len(frames), -1)
            for t, spec in enumerate(model.config.targets):
                unit = f" ({spec.unit})" if spec.unit else ""
                column = f"{spec.name}{unit}" if len(names) == 1 else f"{Path(str(name)).name}:{spec.name}{unit}"
                table[column] = values[:, t]
    except CrystalformerError as err:
        raise click.ClickException(str(err)) from err
    if fmt == "csv":
        click.echo(table.to_csv(index=False), nl=False)
    elif fmt == "json":
        click.echo(json.dumps(table.to_dict(orient="records"), indent=2))
    else:
        click.echo(table.to_string(index=False))
