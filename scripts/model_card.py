"""Write checkpoints/<name>/README.md from the checkpoint's metadata and `crystalformer evaluate`.

Also stores the evaluated test MAE in the checkpoint header (``test_mae``), which
``crystalformer models`` prints; the weights are not touched.

    python scripts/model_card.py NAME --eval-val DIR --eval-test DIR --notes scripts/model_cards.json [--report RUN/report.json]
    (DIR = an `crystalformer evaluate ... --out-dir DIR` folder holding metrics.json)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ase_crystalformer.checkpoint import read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def candidates(report: Path | None, target: str, unit: str) -> str:
    """Best-validation and SWA models of the last stage, from its run's report.json.

    The trainer scores both with the evaluation code of ``crystalformer evaluate`` (a test
    checks that they agree), so the shipped model's row repeats the table above.
    """
    if report is None:
        return ""
    metrics = json.loads(report.read_text())["metrics"]
    rows = "\n".join(
        f"| {kind} | {metrics[f'{key}_val'][target]['mae']:.4g} | {metrics[f'{key}_test'][target]['mae']:.4g} |"
        for kind, key in (("best validation", "best"), ("SWA", "swa"))
        if f"{key}_val" in metrics
    )
    return f"""
Both candidates of the last training stage (`{report.parent.name}/report.json`; chosen on validation):

| model | val MAE ({unit}) | test MAE ({unit}) |
|---|---|---|
{rows}
"""


def domain_row(domain: dict | None) -> str:
    """The elements and cell sizes of the training set, which ``predict`` checks against."""
    if not domain:
        return "not recorded (no out-of-domain warnings)"
    low, high = domain["n_atoms"]
    if low == high:
        sizes, outside = f"{low}-atom cells only", "another element or another cell size"
    else:  # sizes are not checked: predictions do not depend on the cell chosen
        sizes, outside = f"{low} to {high} atoms per cell", "another element"
    return (f"{len(domain['elements'])} elements ({' '.join(domain['elements'])}); {sizes}. A structure with "
            f"{outside} gets an `OutOfDomainWarning`, and `crystalformer predict` leaves it empty")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--eval-val", required=True, type=Path)
    parser.add_argument("--eval-test", required=True, type=Path)
    parser.add_argument("--notes", required=True, type=Path, help="JSON with the card's prose fields")
    parser.add_argument("--report", type=Path, help="report.json of the last training stage (best-val and SWA rows)")
    args = parser.parse_args()

    path = ROOT / "checkpoints" / args.name / "model.safetensors"
    model, meta = read_checkpoint(path)
    val = json.loads((args.eval_val / "metrics.json").read_text())["metrics"]
    test = json.loads((args.eval_test / "metrics.json").read_text())["metrics"]
    notes = json.loads(args.notes.read_text())[args.name]
    scores = {"test_mae": {k: round(v["mae"], 5) for k, v in test.items()},
              "val_mae": {k: round(v["mae"], 5) for k, v in val.items()}}
    if any(meta.get(k) != v for k, v in scores.items()):  # rewrite (a 3 MB blob) only on change
        save_checkpoint(model, path, {**meta, **scores})

    spec = model.config.targets[0]
    unit = f"log10({spec.unit})" if spec.transform == "log10" else spec.unit
    rows = "\n".join(
        f"| {split} | {m[spec.name]['n']} | {m[spec.name]['mae']:.4g} {unit} | {m[spec.name]['rmse']:.4g} | {m[spec.name]['r2']:.4f} |"
        for split, m in (("val", val), ("test", test))
    )
    tc = meta["train_config"]
    card = f"""# {args.name}

{notes['summary']}

| | |
|---|---|
| target | `{spec.name}` ({spec.unit}{', learnt as log10; `predict` returns ' + spec.unit if spec.transform == 'log10' else ''}) |
| architecture | Crystalformer, paper default: {model.config.n_blocks} blocks, d={model.config.d_model}, {model.config.n_heads} heads, K={model.config.n_rbf}, window {model.config.cutoff} Å, 853,505 parameters |
| data | {notes['data']} |
| split | {notes['split']}; sizes {meta['split_sizes']} |
| training ids | sha256 of the sorted ids: `{meta['train_ids_sha256']}` (validation: `{meta['val_ids_sha256']}`) |
| recipe | AdamW (0.9, 0.98), lr {tc['lr']} · sqrt({tc['lr_decay_steps']}/({tc['lr_decay_steps']}+t)), weight decay {tc['weight_decay']}, clip {tc['clip_norm']}, batch {tc['batch_size']}, L1 on normalised targets, seed {tc['seed']} |
| epochs | {notes['epochs']} |
| wall time, hardware | {meta['wall_time_s']:.0f} s of training to the selected epoch; {notes['hardware']} |
| checkpoint | {notes['checkpoint']} |
| training domain | {domain_row(meta.get('domain'))} |

## Command

```bash
{notes['command']}
```

## Metrics (`crystalformer evaluate`)

| split | n | MAE | RMSE | R² |
|---|---|---|---|---|
{rows}

```bash
{notes['evaluate']}
```
{candidates(args.report, spec.name, unit)}
{notes['compare']}

## What this model is not for

{notes['not_for']}
"""
    parity = args.eval_test / "parity.png"
    if parity.is_file():
        shutil.copyfile(parity, path.parent / "parity_test.png")
        card += "\n![test parity plot](parity_test.png)\n"
    (path.parent / "README.md").write_text(card)
    print(f"wrote {path.parent / 'README.md'}")


if __name__ == "__main__":
    main()
