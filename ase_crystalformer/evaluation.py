"""Evaluation of a model on a dataset split: MAE, RMSE, R², a per-structure table, a plot.

Metrics are computed in each target's training space (log10 units for a log10 target),
which is how the paper reports moduli; the table also has predictions in raw units.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .committee import Committee, calibration
from .data import Dataset
from .errors import DataError
from .geometry import collate
from .model import Crystalformer
from .training import make_examples


def split_indices(dataset: Dataset, split: str) -> list[int]:
    """Indices of ``split`` ('train', 'val', 'test' or 'all') in ``dataset``."""
    if split == "all":
        return list(range(len(dataset.records)))
    if split not in dataset.splits:
        raise DataError(
            f"dataset {dataset.name!r} has no {split!r} split (it has: {sorted(dataset.splits) or 'none'}); "
            "use --split all"
        )
    return list(dataset.splits[split])


def regression_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² of finite pairs."""
    ok = np.isfinite(true) & np.isfinite(pred)
    t, p = true[ok], pred[ok]
    if not len(t):
        return {"n": 0, "mae": float("nan"), "rmse": float("nan"), "r2": float("nan")}
    resid = p - t
    var = ((t - t.mean()) ** 2).sum()
    return {
        "n": len(t),
        "mae": float(np.abs(resid).mean()),
        "rmse": float(np.sqrt((resid**2).mean())),
        "r2": float(1 - (resid**2).sum() / var) if var > 0 else float("nan"),
    }


def evaluate(
    model: Crystalformer, dataset: Dataset, split: str = "test", *, batch_size: int = 64
) -> tuple[dict[str, dict[str, float]], pd.DataFrame, list[tuple[str, str]]]:
    """Metrics per target, a per-structure table and the skipped (id, reason) pairs.

    For a committee, also each structure's std (``<target>_std``) and the calibration of
    the errors by it (``committee.calibration``), in training space as the MAE.
    """
    examples, skipped = make_examples(dataset, split_indices(dataset, split), model.config)
    model.eval()
    preds, stds = [], []
    committee = isinstance(model, Committee)
    with torch.no_grad():
        for k in range(0, len(examples), batch_size):
            batch = collate([e.window for e in examples[k : k + batch_size]], model.dtype).to(model.device)
            if committee:  # mean and std in training space
                mean, std = model.mean_std(batch)
                preds.append(mean.cpu().numpy())
                stds.append(std.cpu().numpy())
            else:
                out = model(batch)
                preds.append((out * model.target_std + model.target_mean).cpu().numpy())
    pred = np.concatenate(preds) if preds else np.zeros((0, len(model.config.targets)))
    std = np.concatenate(stds) if stds else np.zeros_like(pred)
    true = np.stack([e.y for e in examples]) if examples else np.zeros_like(pred)
    table = pd.DataFrame({"id": [e.id for e in examples]})
    metrics = {}
    for t, spec in enumerate(model.config.targets):
        table[f"{spec.name}_true"] = true[:, t]
        table[f"{spec.name}_pred"] = pred[:, t]
        if spec.transform == "log10":
            table[f"{spec.name}_pred_raw"] = 10.0 ** pred[:, t]
        metrics[spec.name] = regression_metrics(true[:, t], pred[:, t])
        if committee:
            table[f"{spec.name}_std"] = std[:, t]
            metrics[spec.name]["calibration"] = calibration(pred[:, t] - true[:, t], std[:, t])
    return metrics, table, skipped


def parity_plot(table: pd.DataFrame, targets: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Predicted vs true scatter per target, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 4.5), squeeze=False)
    for ax, name in zip(axes[0], targets):
        t, p = table[f"{name}_true"].to_numpy(), table[f"{name}_pred"].to_numpy()
        lo, hi = np.nanmin([t.min(), p.min()]), np.nanmax([t.max(), p.max()])
        ax.scatter(t, p, s=6, alpha=0.5)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"{name} (true)")
        ax.set_ylabel(f"{name} (predicted)")
        ax.set_title(f"{title} MAE {np.nanmean(np.abs(p - t)):.4g}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
