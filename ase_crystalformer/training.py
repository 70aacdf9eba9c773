"""Training and fine-tuning with the paper's recipe: AdamW, inverse-sqrt LR, clipping, SWA.

A run directory holds everything needed to watch, stop and resume a run:

* ``latest.safetensors``, ``best.safetensors``, ``swa.safetensors``: models (checkpoint format);
* ``state.pt``: optimizer, scheduler, SWA and RNG state, read with ``weights_only=True``;
* ``log.jsonl``: one line per epoch; ``report.json``: val/test metrics at the end.

The directory is locked for the run (``rundir.py``). Every file is replaced atomically at
the end of an epoch, models and log first and ``state.pt`` last: ``state.pt`` is the commit
point and holds the log too, so a run killed at any moment resumes from its last completed
epoch (files already written for the lost epoch are rewritten identically) and
``resume=True`` continues bit for bit. Under ``torchrun`` each process takes a slice of
every batch (DistributedDataParallel).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import read_checkpoint, save_checkpoint
from .config import ModelConfig, TargetSpec, TrainConfig
from .data import Dataset
from .domain import training_domain
from .errors import DataError, RunError, StructureError
from .forces import energy_forces_stress
from .geometry import Window, build_window, collate
from .inference import resolve_device
from .model import Crystalformer
from .reciprocal import check_periodic
from .rundir import STATE_NAME, run_directory

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"


@dataclass
class Example:
    """One training structure: its window, its transformed targets and optional labels."""

    id: str
    window: Window
    y: np.ndarray  # (T,) transformed targets, NaN where missing
    forces: np.ndarray | None
    stress: np.ndarray | None  # (3, 3)


def transform_targets(values: np.ndarray, specs: Sequence[TargetSpec]) -> np.ndarray:
    """Apply each target's transform to a (n, T) array; log10 needs positive values."""
    out = np.array(values, dtype=float)
    for t, spec in enumerate(specs):
        if spec.transform == "log10":
            column = out[:, t]
            if (column[np.isfinite(column)] <= 0).any():
                raise DataError(f"target {spec.name!r}: log10 transform needs positive values")
            out[:, t] = np.log10(column)
    return out


def make_examples(
    dataset: Dataset, indices: Sequence[int], config: ModelConfig
) -> tuple[list[Example], list[tuple[str, str]]]:
    """Windows and targets for ``indices``; structures a model of ``config`` refuses (bad
    cells; partial pbc for reciprocal-space heads) are skipped, with the reason."""
    specs, cutoff = config.targets, config.cutoff
    examples, skipped = [], []
    raw = np.full((len(indices), len(specs)), np.nan)
    for row, index in enumerate(indices):
        record = dataset.records[index]
        for t, spec in enumerate(specs):
            value = record.targets.get(spec.name)
            if value is not None:  # the data's `energy` is a total energy; the model learns eV/atom
                raw[row, t] = value / len(record.atoms) if spec.name == "energy" else value
    values = transform_targets(raw, specs)
    for row, index in enumerate(indices):
        record = dataset.records[index]
        try:
            window = build_window(record.atoms, cutoff, label=f"{record.id}")
            check_periodic(config, [record.atoms], [f"{record.id}"])
        except StructureError as err:
            skipped.append((record.id, str(err)))
            continue
        stress = None
        if record.stress is not None:
            from ase.stress import voigt_6_to_full_3x3_stress

            stress = voigt_6_to_full_3x3_stress(np.asarray(record.stress))
        examples.append(Example(record.id, window, values[row], record.forces, stress))
    return examples, skipped


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the sorted ids: recorded in checkpoints to prove which data trained them."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def _to_batch(examples: Sequence[Example], dtype: torch.dtype, device: torch.device):
    batch = collate([e.window for e in examples], dtype).to(device)
    y = torch.as_tensor(np.stack([e.y for e in examples]), dtype=dtype, device=device)
    return batch, y


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on every trainable parameter except biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if "bias" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    """Replace ``path`` atomically with ``obj`` as JSON."""
    _write_text(json.dumps(obj, indent=2), path)


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), world


class Trainer:
    """Runs the recipe of ``TrainConfig`` on a model and a dataset split into train/val."""

    def __init__(
        self,
        model: Crystalformer,
        train: list[Example],
        val: list[Example],
        config: TrainConfig,
        out_dir: Path,
        *,
        device: torch.device,
        metadata: dict[str, Any],
        progress: bool = True,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        num_workers: int = 0,
    ) -> None:
        self.rank, self.world = _distributed()
        self.num_workers = num_workers
        self.model = model.to(device)
        self.device = device
        self.train_set, self.val_set = train, val
        self.config = config
        self.out_dir = out_dir
        self.metadata = metadata
        self.progress = progress and self.rank == 0
        self.on_epoch = on_epoch
        self.optimizer = torch.optim.AdamW(
            _decay_groups(model, config.weight_decay), lr=config.lr, betas=config.betas
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: config.lr_at(step) / config.lr
        )
        self.swa: torch.optim.swa_utils.AveragedModel | None = None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.step = 0
        self.best_val = float("inf")
        self.wall_time = 0.0
        self.history: list[dict[str, Any]] = []  # the log.jsonl lines of completed epochs
        weights = dict(config.task_weights)
        unknown = set(weights) - set(model.config.target_names)
        if unknown:
            raise ValueError(f"task weights for {sorted(unknown)}, which are not targets "
                             f"({model.config.target_names})")
        self.task_weights = torch.tensor([weights.get(n, 1.0) for n in model.config.target_names],
                                         dtype=model.dtype, device=device)
        self.network: nn.Module = model
        if self.world > 1:
            self.network = nn.parallel.DistributedDataParallel(model)

    # ------------------------------------------------------------------ state and files
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "swa": None if self.swa is None else self.swa.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "wall_time": self.wall_time,
            "train_config": json.dumps(self.config.to_dict()),
            "model_config": json.dumps(self.model.config.to_dict()),
            "log": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["swa"] is not None:
            self.swa = self._new_swa()
            self.swa.load_state_dict(state["swa"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_val = float(state["best_val"])
        self.wall_time = float(state["wall_time"])
        if "log" in state:
            self.history = json.loads(state["log"])
        else:  # a state written before the log moved into it: the log's first lines
            log_path = self.out_dir / LOG_NAME
            lines = log_path.read_text().splitlines()[: self.epoch] if log_path.is_file() else []
            self.history = [json.loads(line) for line in lines]

    def resume(self, path: Path) -> None:
        """Continue from the training state ``path`` (the run directory's ``state.pt``)."""
        # Load on the CPU: the shuffling generator's state must stay a CPU tensor; the
        # optimizer and model states are moved to the device by their load_state_dict.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved = TrainConfig.from_dict(json.loads(state["train_config"]))
        except Exception as err:
            # torch's own text for a refused pickle suggests weights_only=False: never do that.
            detail = "damaged, or not written by ase-crystalformer" if isinstance(
                err, pickle.UnpicklingError) else (str(err).strip().splitlines() or [""])[0]
            found = sorted(p.name for p in self.out_dir.iterdir())
            raise RunError(
                f"{path}: cannot read the training state ({type(err).__name__}: {detail}); "
                f"{self.out_dir} holds {found}; start the run again (--overwrite)"
            ) from err
        # Until SWA has begun, a run may be given other epochs/swa_epochs; nothing else may change.
        extendable = state["swa"] is None and int(state["epoch"]) <= self.config.epochs - self.config.swa_epochs
        comparable = (
            replace(saved, epochs=self.config.epochs, swa_epochs=self.config.swa_epochs) if extendable else saved
        )
        if comparable != self.config:
            raise ValueError(
                f"{path}: the run was started with a different training config; "
                f"saved {saved}, given {self.config}"
            )
        # Weights load into any model with the same tensors, a changed readout or activation
        # included: compare the architecture too (states before it was saved: the run's model).
        if "model_config" in state:
            built = ModelConfig.from_dict(json.loads(state["model_config"]))
        else:
            latest = self.out_dir / "latest.safetensors"
            built = read_checkpoint(latest)[0].config if latest.is_file() else self.model.config
        if built != self.model.config:
            raise ValueError(
                f"{path}: the run was started with a different model config; "
                f"saved {built}, given {self.model.config}"
            )
        self.load_state_dict(state)
        if self.rank == 0:  # drop the line of an epoch that was lost before its state was saved
            self._write_log()
        log.info("resumed %s at epoch %d, step %d", self.out_dir, self.epoch, self.step)

    def _write_log(self) -> None:
        _write_text("".join(json.dumps(line) + "\n" for line in self.history), self.out_dir / LOG_NAME)

    def _new_swa(self) -> torch.optim.swa_utils.AveragedModel:
        # Created from the current model so that frozen buffers (σ statistics, target
        # normalisation) are copied; only parameters are averaged.
        return torch.optim.swa_utils.AveragedModel(self.model)

    def _save_model(self, model: Crystalformer, name: str, extra: dict[str, Any]) -> None:
        meta = {**self.metadata, **extra, "epochs_run": self.epoch, "steps": self.step,
                "wall_time_s": round(self.wall_time, 1)}
        save_checkpoint(model, self.out_dir / name, meta)

    def swa_model(self) -> Crystalformer | None:
        return None if self.swa is None else self.swa.module

    # ------------------------------------------------------------------ the loop
    def _batches(self) -> list[list[int]]:
        n, size = len(self.train_set), self.config.batch_size
        order = torch.randperm(n, generator=self.generator).tolist()
        if n >= size:  # drop_last, as the original, unless the set is smaller than a batch
            return [order[k : k + size] for k in range(0, n - size + 1, size)]
        return [order]

    def _collate(self, indices: list[int]):
        # Runs in DataLoader workers when num_workers > 0: windows → padded CPU tensors.
        batch, y = _to_batch([self.train_set[i] for i in indices], self.model.dtype, torch.device("cpu"))
        return indices, batch, y

    def _loss(self, examples: list[Example], batch, y: torch.Tensor) -> torch.Tensor:
        c = self.config
        wants_forces = c.force_weight > 0 and all(e.forces is not None for e in examples)
        wants_stress = c.stress_weight > 0 and all(e.stress is not None for e in examples)
        if wants_forces or wants_stress:
            out = energy_forces_stress(
                self.model, batch, forces=wants_forces, stress=wants_stress, create_graph=True
            )
            outputs = out["outputs"]
        else:
            outputs = self.network(batch)
        target = (y - self.model.target_mean) / self.model.target_std
        # Each target's mean L1 over the structures that have its label, then their
        # weighted mean: a structure adds only its own labels (missing ones are NaN).
        known = torch.isfinite(target)
        error = (outputs - target.nan_to_num()).abs().where(known, 0.0)
        per_task = error.sum(0) / known.sum(0).clamp(min=1)
        loss = (self.task_weights * per_task).sum() / self.task_weights.sum().clamp(min=1e-12)
        if wants_forces:
            ref = torch.as_tensor(np.concatenate([e.forces for e in examples]), dtype=y.dtype, device=self.device)
            loss = loss + c.force_weight * (out["forces"] - ref).abs().mean()
        if wants_stress:
            ref = torch.as_tensor(np.stack([e.stress for e in examples]), dtype=y.dtype, device=self.device)
            loss = loss + c.stress_weight * (out["stress"] - ref).abs().mean()
        return loss

    def train_epoch(self) -> dict[str, float]:
        c = self.config
        self.network.train()
        in_swa = self.epoch >= c.epochs - c.swa_epochs and c.swa_epochs > 0
        batches = self._batches()
        loader = torch.utils.data.DataLoader(
            [indices[self.rank :: self.world] or indices[:1] for indices in batches],
            batch_size=None,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{c.epochs}", disable=not self.progress,
                   leave=False, unit="batch")
        total, seen, start = 0.0, 0, time.perf_counter()
        for indices, batch, y in bar:
            loss = self._loss([self.train_set[i] for i in indices], batch.to(self.device), y.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_norm)
            self.optimizer.step()
            self.step += 1
            if in_swa:
                if self.swa is None:
                    self.swa = self._new_swa()
                self.swa.update_parameters(self.model)
            else:
                self.scheduler.step()
            total += loss.item() * len(indices)
            seen += len(indices) * self.world
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                            structs_s=f"{rate:.0f}")
        return {"train_loss": total / max(seen, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "structures_per_s": seen / (time.perf_counter() - start)}

    def validate(self, model: Crystalformer | None = None) -> dict[str, float]:
        """Normalised L1 (the paper's val/loss; over several targets the task-weighted mean
        of each target's mean, over the targets with validation labels) and MAE per target
        in target units.

        Under DDP each rank predicts its share of the validation set and the error sums are
        all-reduced, so every rank gets the same numbers for a 1/world of the work.
        """
        model = model or self.model
        if not self.val_set:
            return {}
        model.eval()
        n_targets = len(model.config.targets)
        # per target: Σ|normalised error|, Σ|error|, n known
        sums = torch.zeros(3 * n_targets, dtype=torch.float64, device=self.device)
        shard = self.val_set[self.rank :: self.world]
        with torch.no_grad():
            for k in range(0, len(shard), self.config.eval_batch_size):
                batch, y = _to_batch(shard[k : k + self.config.eval_batch_size], model.dtype, self.device)
                out = model(batch)
                norm = (y - model.target_mean) / model.target_std
                known = torch.isfinite(norm)
                # MAE in the (transformed) training space, which is what the paper reports.
                error = (out * model.target_std + model.target_mean - y).abs().where(known, 0.0)
                sums[:n_targets] += (out - norm).abs().where(known, 0.0).sum(0).double()
                sums[n_targets : 2 * n_targets] += error.sum(0).double()
                sums[2 * n_targets :] += known.sum(0)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        norm_sum, error_sum, n = sums.view(3, n_targets)
        weights = self.task_weights.double() * (n > 0)
        per_task = norm_sum / n.clamp(min=1)
        total = float(weights.sum())
        result = {"val_loss": float((weights * per_task).sum()) / total if total else float("nan")}
        for t, spec in enumerate(model.config.targets):
            result[f"val_mae_{spec.name}"] = float(error_sum[t] / n[t]) if n[t] else float("nan")
        return result

    def fit(self) -> None:
        c = self.config
        while self.epoch < c.epochs:
            start = time.perf_counter()
            stats = self.train_epoch()
            self.epoch += 1
            val = self.validate()
            self.wall_time += time.perf_counter() - start
            improved = val.get("val_loss", -1.0) < self.best_val
            if improved:
                self.best_val = val["val_loss"]
            summary = {"epoch": self.epoch, "step": self.step, **stats, **val,
                       "best_val_loss": self.best_val, "wall_time_s": round(self.wall_time, 1)}
            self.history.append(summary)
            if self.rank == 0:
                # state.pt last: until it is replaced, the previous epoch is the one resumed.
                if improved or not self.val_set:
                    self._save_model(self.model, "best.safetensors", {"selected_by": "val_loss", **val})
                self._save_model(self.model, "latest.safetensors", val)
                if self.swa is not None:
                    self._save_model(self.swa.module, "swa.safetensors", {"swa_epochs": c.swa_epochs})
                self._write_log()
                _atomic_torch_save(self.state_dict(), self.out_dir / STATE_NAME)
                if self.on_epoch:
                    self.on_epoch(summary)
        if self.world > 1:  # the other ranks read the run's files only once rank 0 has written them
            torch.distributed.barrier()


def train(
    dataset: Dataset,
    targets: Sequence[TargetSpec],
    out_dir: str | Path,
    *,
    config: TrainConfig | None = None,
    model_config: ModelConfig | None = None,
    init_from: str | Path | Crystalformer | None = None,
    freeze_encoder: bool = False,
    head_from: Mapping[str, str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    command: str = "",
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Train (or fine-tune, with ``init_from``) on ``dataset``'s train split; return the report.

    ``head_from`` {target: base model's target}: start those outputs from the base model's
    (``_initial_model``), in target units unchanged by this run's normalisation.

    ``targets`` name dataset columns; an ``energy``-kind target learns total energy per atom
    (and forces/stress when their loss weights are > 0). ``out_dir`` is locked for the run;
    it must not hold another run unless ``resume`` (continue it) or ``overwrite`` (remove
    its files first). The report lists every skipped structure with its reason, those the
    loader could not read included.
    """
    config = config or TrainConfig()
    with run_directory(out_dir, resume=resume, overwrite=overwrite) as run:
        out = run.path
        torch.manual_seed(config.seed)
        if not dataset.splits.get("train"):
            raise DataError(f"dataset {dataset.name!r} has no training split")
        model, carried = _initial_model(targets, model_config, init_from, freeze_encoder, head_from)
        train_ex, refused = make_examples(dataset, dataset.splits["train"], model.config)
        val_ex, refused_val = make_examples(dataset, dataset.splits.get("val", []), model.config)
        skipped = [*dataset.skipped, *refused, *refused_val]
        for ident, reason in skipped:
            log.warning("skipped %s: %s", ident, reason)
        if not train_ex:
            raise DataError("no usable training structure")
        # Also on resume (bit for bit the same): the state's buffers then replace these.
        y = np.stack([e.y for e in train_ex])
        unlabelled = [s.name for s, col in zip(model.config.targets, y.T) if not np.isfinite(col).any()]
        if unlabelled:
            raise DataError(f"target(s) {unlabelled} have no label in the training split")
        mean, std = np.nanmean(y, axis=0), np.nanstd(y, axis=0)  # population std, per target
        model.target_mean.copy_(torch.as_tensor(mean))
        model.target_std.copy_(torch.as_tensor(np.where(std > 0, std, 1.0)))
        _renormalise_carried(model, carried)
        metadata = {
            "data": {"name": dataset.name, **dataset.provenance},
            "split_sizes": {k: len(v) for k, v in dataset.splits.items()},
            "train_ids_sha256": ids_digest([e.id for e in train_ex]),
            "val_ids_sha256": ids_digest([e.id for e in val_ex]),
            "n_train": len(train_ex),
            "n_skipped": len(refused) + len(refused_val),
            "domain": training_domain((e.window.numbers for e in train_ex), base=model.metadata.get("domain")),
            "train_config": config.to_dict(),
            "command": command,
            "hardware": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {device}",
            "init_from": str(init_from) if init_from is not None and not isinstance(init_from, nn.Module) else None,
            "head_from": dict(head_from) if head_from else None,
        }
        trainer = Trainer(model, train_ex, val_ex, config, out, device=resolve_device(device),
                          metadata=metadata, progress=progress, on_epoch=on_epoch,
                          num_workers=num_workers)
        if run.state is not None:
            trainer.resume(run.state)
        trainer.fit()
        report = {"epochs_run": trainer.epoch, "wall_time_s": round(trainer.wall_time, 1),
                  "n_train": len(train_ex), "skipped": [list(item) for item in skipped]}
        if trainer.rank == 0:
            write_json(report, out / "report.json")
        return report


def _initial_model(
    targets: Sequence[TargetSpec],
    model_config: ModelConfig | None,
    init_from: str | Path | Crystalformer | None,
    freeze_encoder: bool,
    head_from: Mapping[str, str] | None = None,
) -> tuple[Crystalformer, dict[int, tuple[float, float]]]:
    """A fresh model, or one whose encoder is pretrained, and with it the base model's
    normalisation (mean, std) of every head output carried over, by output index.

    The head is carried over whole when the targets match; ``head_from`` {new target: base
    target} carries single outputs (e.g. one task of a multi-task backbone) with the
    head's hidden layer, the other outputs starting fresh.
    """
    config = replace(model_config or ModelConfig(), targets=tuple(targets))
    if init_from is None:
        if freeze_encoder or head_from:
            raise ValueError("freeze_encoder and head_from need a pretrained model (init_from)")
        return Crystalformer(config), {}
    base = init_from if isinstance(init_from, Crystalformer) else read_checkpoint(_path(init_from))[0]
    config = replace(base.config, targets=tuple(targets))
    model = Crystalformer(config)
    state = base.state_dict()
    if base.config.targets == config.targets and not head_from:
        head_from = {t.name: t.name for t in config.targets}
    carried = _carried_outputs(base.config.targets, config.targets, head_from or {})
    keep = {k: v for k, v in state.items() if not k.startswith(("head.", "target_"))}
    if carried:  # the hidden layers whole, then the carried outputs' rows of the last layer
        last_layer = f"head.{len(model.head) - 1}."
        keep.update({k: v for k, v in state.items() if k.startswith("head.") and not k.startswith(last_layer)})
    if base.metadata.get("domain"):  # the encoder has also learned the base model's data
        model.metadata["domain"] = base.metadata["domain"]
    missing, unexpected = model.load_state_dict(keep, strict=False)
    if unexpected or any(not k.startswith(("head.", "target_")) for k in missing):
        raise ValueError(f"cannot fine-tune from {init_from}: encoder weights do not match")
    last = model.head[-1]
    with torch.no_grad():
        for new, old in carried.items():
            last.weight[new] = base.head[-1].weight[old]
            last.bias[new] = base.head[-1].bias[old]
    if freeze_encoder:
        for name, p in model.named_parameters():
            if not name.startswith("head."):
                p.requires_grad_(False)
    return model, {new: (float(base.target_mean[old]), float(base.target_std[old])) for new, old in carried.items()}


def _carried_outputs(
    base: Sequence[TargetSpec], new: Sequence[TargetSpec], head_from: Mapping[str, str]
) -> dict[int, int]:
    """{new output index: base output index} for ``head_from``; refuses names that do not
    exist and quantities learned in another transform or unit."""
    base_index = {t.name: k for k, t in enumerate(base)}
    new_index = {t.name: k for k, t in enumerate(new)}
    out = {}
    for target, source in head_from.items():
        if target not in new_index:
            raise ValueError(f"head_from: {target!r} is not a target of this run (targets: {list(new_index)})")
        if source not in base_index:
            raise ValueError(f"head_from: the base model has no output {source!r} (its targets: {list(base_index)})")
        a, b = new[new_index[target]], base[base_index[source]]
        if a.transform != b.transform or (a.unit and b.unit and a.unit != b.unit):
            raise ValueError(f"head_from: {target!r} ({a.transform}, {a.unit or 'no unit'}) cannot start from "
                             f"{source!r} ({b.transform}, {b.unit or 'no unit'})")
        out[new_index[target]] = base_index[source]
    return out


def _renormalise_carried(model: Crystalformer, carried: Mapping[int, tuple[float, float]]) -> None:
    """Rescale carried head outputs from the base model's normalisation (m, s) to this
    run's (m', s'), so that each predicts in target units what it predicted before:
    w' = w·s/s', b' = (s·b + m − m')/s'."""
    last = model.head[-1]
    with torch.no_grad():
        for k, (m, s) in carried.items():
            m_new, s_new = float(model.target_mean[k]), float(model.target_std[k])
            last.weight[k] *= s / s_new
            last.bias[k] = (s * last.bias[k] + m - m_new) / s_new


def _path(name_or_path: str | Path) -> Path:
    from .checkpoint import model_path

    return model_path(name_or_path)
