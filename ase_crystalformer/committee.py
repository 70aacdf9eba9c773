"""Uncertainty by committee: several models of one architecture and targets, differing in
seed (initialisation and data order), whose spread is the prediction's uncertainty.

Statistics. Each member's prediction is taken in its target's training space (log10 of the
value for a log10 target, the value itself otherwise): the committee's prediction is the
mean of its members' there, transformed back (for a log10 target, the geometric mean of the
members' values), and its ``std`` is the members' sample standard deviation there (ddof=1),
so a log10 target's std is in log10 units (the value is uncertain by a factor 10**std).
Calibration (``calibration``) compares that std with the error in the same space, the space
in which the MAE is reported. Members that share a starting point (fine-tuned from one
model) spread far less than they err, so a committee carries one factor per target,
``std_scale``, fitted on the validation split (``fit_std_scale``) and applied to its std.

Layout on disk: a directory with ``committee.json`` (format, version, member file names,
metadata, optional ``std_scale``) and one ordinary checkpoint per member (``member-<k>.safetensors``), each read
strictly by ``checkpoint.read_checkpoint``; a member name may not leave the directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import COMMITTEE_FILE, read_checkpoint, save_checkpoint
from .domain import warn_outside
from .errors import CheckpointError
from .geometry import Batch, collate, windows_for
from .model import Crystalformer, prediction_inputs

FORMAT = "crystalformer-committee"
FORMAT_VERSION = 1
#: The smallest committee whose spread we call an uncertainty.
MIN_MEMBERS = 2


class Committee(nn.Module):
    """Members of one architecture and targets; predicts their mean and spread.

    Where the rest of the package expects a ``Crystalformer`` it gets the committee's mean:
    ``forward`` gives the mean in the first member's normalisation, so ``targets(forward)``
    is the committee's prediction. ``embed`` is the first member's embedding (members
    trained from different seeds do not share a feature basis, so embeddings are not
    averaged).
    """

    def __init__(self, members: Sequence[Crystalformer], metadata: dict[str, Any] | None = None,
                 std_scale: Sequence[float] | None = None) -> None:
        super().__init__()
        members = list(members)
        if len(members) < MIN_MEMBERS:
            raise ValueError(f"a committee needs at least {MIN_MEMBERS} members, got {len(members)}")
        first = members[0].config
        for k, m in enumerate(members[1:], 1):
            if m.config != first:
                raise ValueError(f"committee member {k} has another architecture or targets than member 0")
        self.members = nn.ModuleList(members)
        self.config = first
        scale = [1.0] * len(first.targets) if std_scale is None else [float(x) for x in std_scale]
        if len(scale) != len(first.targets) or not all(np.isfinite(x) and x > 0 for x in scale):
            raise ValueError(f"std_scale must hold one positive finite factor per target "
                             f"({len(first.targets)}), got {list(std_scale or [])}")
        self.std_scale = scale
        self.metadata: dict[str, Any] = dict(metadata or {})
        if members[0].metadata.get("domain") is not None:
            self.metadata.setdefault("domain", members[0].metadata["domain"])

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    @property
    def target_mean(self) -> torch.Tensor:
        return self.members[0].target_mean

    @property
    def target_std(self) -> torch.Tensor:
        return self.members[0].target_std

    def member_values(self, batch: Batch) -> torch.Tensor:
        """(K, B, T): every member's prediction in the targets' training space."""
        return torch.stack([m(batch) * m.target_std + m.target_mean for m in self.members])

    def mean_std(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sample std (ddof=1, times ``std_scale``) over members, (B, T) each, in
        training space."""
        values = self.member_values(batch)
        scale = torch.tensor(self.std_scale, dtype=values.dtype, device=values.device)
        return values.mean(0), values.std(0, correction=1) * scale

    def forward(self, batch: Batch) -> torch.Tensor:
        """The committee mean as normalised outputs (B, T) of the first member."""
        return (self.member_values(batch).mean(0) - self.target_mean) / self.target_std

    def targets(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.members[0].targets(outputs)

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.members[0].embed(batch)

    def predict(
        self, structures: Any, batch_size: int = 64, *, primitive: bool = False, return_std: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``Crystalformer.predict`` for the committee; with ``return_std`` also the std
        (module docstring: training space, ddof=1), of the same shape as the mean."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        atoms_list = prediction_inputs(self.config, structures, primitive)
        windows = windows_for(atoms_list, self.config.cutoff)
        warn_outside(self.metadata.get("name", "committee"), self.metadata.get("domain"),
                     enumerate(a.numbers for a in atoms_list), len(atoms_list))
        was_training = self.training
        self.eval()
        means, stds = [], []
        try:
            with torch.no_grad():
                for start in range(0, len(windows), batch_size):
                    batch = collate(windows[start : start + batch_size], self.dtype).to(self.device)
                    mean, std = self.mean_std(batch)
                    means.append(self.targets((mean - self.target_mean) / self.target_std).cpu().numpy())
                    stds.append(std.cpu().numpy())
        finally:
            self.train(was_training)
        empty = np.zeros((0, len(self.config.targets)))
        mean, std = (np.concatenate(c) if c else empty for c in (means, stds))
        if len(self.config.targets) == 1:
            mean, std = mean[:, 0], std[:, 0]
        return (mean, std) if return_std else mean


def save_committee(
    members: Sequence[Crystalformer], directory: str | Path, metadata: dict[str, Any] | None = None,
    std_scale: Sequence[float] | None = None,
) -> Path:
    """Write the members and ``committee.json`` (last, so a partial write is no committee)."""
    scale = Committee(members, std_scale=std_scale).std_scale  # refuse a bad committee before writing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for k, member in enumerate(members):
        names.append(f"member-{k}.safetensors")
        save_checkpoint(member, directory / names[-1], member.metadata)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "members": names, "metadata": metadata or {},
              "std_scale": scale}
    _write_header(directory, header)
    return directory


def _write_header(directory: Path, header: dict[str, Any]) -> None:
    """``committee.json``, atomically (written last: until then the folder is no committee)."""
    tmp = directory / (COMMITTEE_FILE + ".tmp")
    tmp.write_text(json.dumps(header, indent=2))
    os.replace(tmp, directory / COMMITTEE_FILE)


def read_committee(directory: str | Path) -> Committee:
    """Load a committee directory strictly (CPU, float32, eval mode)."""
    directory = Path(directory)
    path = directory / COMMITTEE_FILE
    try:
        header = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable committee file ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: committee version {header.get('version')!r} is not supported "
                              f"(this version reads {FORMAT_VERSION})")
    names = header.get("members")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: 'members' must be a list of file names")
    bad = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"{path}: member names must be files in the committee's folder, got {bad}")
    members = [read_checkpoint(directory / n)[0] for n in names]
    try:
        committee = Committee(members, header.get("metadata") or {}, header.get("std_scale"))
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    committee.eval()
    return committee


def calibration(errors: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """How well the std ranks and sizes the errors: Spearman's rank correlation of |error|
    with std, and the fractions of |error| within 1 and 2 std (a Gaussian gives 0.683,
    0.954). Pairs with a non-finite value are left out."""
    from scipy.stats import spearmanr

    errors, std = np.abs(np.asarray(errors, float)), np.asarray(std, float)
    ok = np.isfinite(errors) & np.isfinite(std)
    e, s = errors[ok], std[ok]
    if len(e) < 2:
        return {"n": int(len(e)), "spearman": float("nan"), "within_1sigma": float("nan"),
                "within_2sigma": float("nan")}
    rho = spearmanr(e, s).statistic
    return {"n": int(len(e)), "spearman": float(rho), "within_1sigma": float((e <= s).mean()),
            "within_2sigma": float((e <= 2 * s).mean())}


def fit_std_scale(errors: np.ndarray, std: np.ndarray) -> float:
    """The factor that makes the median of |error| / (factor·std) that of a standard normal
    (0.6745), from pairs with a finite error and a positive finite std; robust to the few
    large errors that a mean-based fit would follow. 1.0 when no pair qualifies."""
    errors, std = np.abs(np.asarray(errors, float)), np.asarray(std, float)
    ok = np.isfinite(errors) & np.isfinite(std) & (std > 0)
    if not ok.any():
        return 1.0
    return float(np.median(errors[ok] / std[ok]) / 0.6744897501960817) or 1.0


def calibrate_committee(directory: str | Path, dataset, split: str = "val", batch_size: int = 64) -> list[float]:
    """Fit ``std_scale`` of the committee in ``directory`` on ``split`` of ``dataset`` (its
    errors and unscaled std in training space) and write it to ``committee.json``."""
    from .evaluation import evaluate

    directory = Path(directory)
    committee = read_committee(directory)
    committee.std_scale = [1.0] * len(committee.config.targets)
    _, table, _ = evaluate(committee, dataset, split, batch_size=batch_size)
    scale = []
    for spec in committee.config.targets:
        errors = table[f"{spec.name}_pred"] - table[f"{spec.name}_true"]  # training space, as the std
        scale.append(fit_std_scale(errors.to_numpy(), table[f"{spec.name}_std"].to_numpy()))
    path = directory / COMMITTEE_FILE
    header = json.loads(path.read_text())
    header["std_scale"] = scale
    header.setdefault("metadata", {})["std_scale_fitted_on"] = f"{dataset.name}:{split} ({len(table)} structures)"
    _write_header(directory, header)
    return scale


def train_committee(dataset, targets, out_dir: str | Path, *, members: int = 5, config=None,
                    **train_kwargs: Any) -> list[dict[str, Any]]:
    """Train ``members`` runs (``training.train``) into ``out_dir/member-<k>``, member k with
    seed ``config.seed + k`` (its own initialisation and data order); returns their reports."""
    from .config import TrainConfig
    from .training import train

    if members < MIN_MEMBERS:
        raise ValueError(f"a committee needs at least {MIN_MEMBERS} members, got {members}")
    config = config or TrainConfig()
    out = Path(out_dir)
    return [train(dataset, targets, out / f"member-{k}", config=replace(config, seed=config.seed + k),
                  **train_kwargs) for k in range(members)]


def committee_from_runs(run_dirs: Sequence[str | Path], directory: str | Path,
                        metadata: dict[str, Any] | None = None) -> Path:
    """Save a committee of each run's final model: its SWA checkpoint (the recipe's result)
    where the run reached SWA, else its best-validation checkpoint."""
    chosen = []
    for run in map(Path, run_dirs):
        found = [run / f for f in ("swa.safetensors", "best.safetensors") if (run / f).is_file()]
        if not found:
            raise CheckpointError(f"{run}: no swa.safetensors or best.safetensors")
        chosen.append(read_checkpoint(found[0])[0])
    return save_committee(chosen, directory, {**(metadata or {}), "runs": [str(r) for r in run_dirs]})
