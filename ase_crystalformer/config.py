"""Typed, frozen configuration of the model, saved with every checkpoint.

Everything that determines the network's shape or its numbers lives here; nothing is read
from module globals or environment variables. ``ModelConfig.to_dict``/``from_dict`` give a
JSON round trip that the checkpoint format relies on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Activation = Literal["relu", "gelu", "silu"]
Transform = Literal["none", "log10"]

#: Elements with a learned embedding: Z = 1 (H) ... 98 (Cf), as in the paper's one-hot.
MAX_ATOMIC_NUMBER = 98


@dataclass(frozen=True)
class TargetSpec:
    """One predicted quantity: its name, its unit and how it was transformed for training.

    ``transform="log10"`` means the network learns log10(y); predictions are returned as y.
    """

    name: str
    unit: str = ""
    transform: Transform = "none"
    #: "intensive" targets are per structure or per atom. An "energy" target is an energy
    #: per atom in eV/atom (total, or formation energy: both give the same forces) that the
    #: ASE calculator multiplies by the number of atoms and differentiates for forces/stress.
    #: (Training reads a target *named* ``energy`` as a total energy and divides it by N.)
    kind: Literal["intensive", "energy"] = "intensive"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a target needs a non-empty name")
        if self.transform not in ("none", "log10"):
            raise ValueError(f"unknown target transform {self.transform!r}; use 'none' or 'log10'")
        if self.kind not in ("intensive", "energy"):
            raise ValueError(f"unknown target kind {self.kind!r}; use 'intensive' or 'energy'")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Crystalformer; the defaults are the paper's model (spec §4, App. A).

    ``cutoff`` is the radius of the periodic window in Å: every image of every atom pair
    closer than this enters the attention. The Gaussian weight of an image at distance d is
    exp(-d²/2σ²) with σ < r0/√b = 1.98 Å, so an image outside the window weighs less than
    exp(-cutoff²/(2·1.98²)) relative to the self image (2.9e-6 at 10 Å). See
    ``docs/ARCHITECTURE.md`` for the bound on the whole tail.
    """

    n_blocks: int = 4
    d_model: int = 128
    n_heads: int = 8
    d_ff: int = 512
    d_head_mlp: int = 128
    n_rbf: int = 64
    rbf_max: float = 14.0
    r0: float = 1.4
    rho_lower_bound: float = 0.5
    rho_slope: float = 0.1
    cutoff: float = 10.0
    activation: Activation = "relu"
    targets: tuple[TargetSpec, ...] = field(default_factory=lambda: (TargetSpec("target"),))

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_blocks < 1 or self.n_rbf < 0:
            raise ValueError("n_blocks must be >= 1 and n_rbf >= 0")
        if not 0.0 < self.rho_lower_bound < 1.0:
            raise ValueError(f"rho_lower_bound must lie in (0, 1), got {self.rho_lower_bound}")
        if self.cutoff < 3.5 * self.sigma_max:
            raise ValueError(
                f"cutoff={self.cutoff} Å is below 3.5·σ_max = {3.5 * self.sigma_max:.2f} Å, "
                "the paper's own truncation; the window would cut off real attention weight"
            )
        if self.activation not in ("relu", "gelu", "silu"):
            raise ValueError(f"unknown activation {self.activation!r}; use relu, gelu or silu")
        if not self.targets:
            raise ValueError("a model needs at least one target")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate target names: {names}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def sigma_max(self) -> float:
        """Upper bound of the learned Gaussian width σ = r0/√ρ, ρ > b (Å)."""
        return self.r0 / math.sqrt(self.rho_lower_bound)

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = [asdict(t) for t in self.targets]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        data = dict(data)
        if "targets" in data:
            data["targets"] = tuple(TargetSpec(**t) for t in data["targets"])
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (spec §5); the defaults are the paper's MP settings.

    ``lr`` decays as lr·sqrt(T/(T + t)) with T = ``lr_decay_steps`` and t the optimizer
    steps taken; it is frozen during the last ``swa_epochs`` epochs, in which SWA averages
    the weights after every step. Losses are L1 on normalised targets; force and stress
    losses (eV/Å and eV/Å³, L1) are added with their weights when the data has them.
    """

    epochs: int = 500
    batch_size: int = 128
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1e-5
    lr_decay_steps: int = 4000
    clip_norm: float = 1.0
    swa_epochs: int = 50
    seed: int = 123
    force_weight: float = 0.0
    stress_weight: float = 0.0
    eval_batch_size: int = 128
    #: (target name, weight) pairs; a target not named weighs 1. The loss is the weighted
    #: mean over targets of each target's mean L1 over the structures that have its label.
    task_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if any(not w >= 0 for _, w in self.task_weights):
            raise ValueError(f"task weights must be >= 0, got {dict(self.task_weights)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0 <= self.swa_epochs <= self.epochs:
            raise ValueError(f"swa_epochs={self.swa_epochs} must lie in [0, epochs={self.epochs}]")
        if self.lr <= 0 or self.lr_decay_steps <= 0:
            raise ValueError("lr and lr_decay_steps must be positive")

    def lr_at(self, step: int) -> float:
        """Learning rate after ``step`` optimizer steps (before SWA freezes it)."""
        return self.lr * math.sqrt(self.lr_decay_steps / (self.lr_decay_steps + step))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["betas"] = tuple(data.get("betas", (0.9, 0.98)))
        data["task_weights"] = tuple((str(n), float(w)) for n, w in data.get("task_weights", ()))
        return cls(**data)
