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
#: Where each attention head sums its Gaussian over periodic images (``reciprocal.py``).
Domain = Literal["real", "reciprocal", "alternating", "dual", "routed"]
DOMAINS: tuple[str, ...] = ("real", "reciprocal", "alternating", "dual", "routed")
#: How atom features become a crystal's outputs (``Crystalformer.readout``).
Readout = Literal["mean", "atoms"]
READOUTS: tuple[str, ...] = ("mean", "atoms")

#: Elements with a learned embedding: Z = 1 (H) ... 98 (Cf), as in the paper's one-hot.
MAX_ATOMIC_NUMBER = 98

#: Inclusive ranges of the integer fields of ``ModelConfig``: far above any useful model,
#: low enough that a config read from an untrusted checkpoint header cannot ask for a
#: network that takes minutes or gigabytes just to construct.
INT_RANGES = {
    "n_blocks": (1, 64), "d_model": (1, 4096), "n_heads": (1, 4096), "d_ff": (1, 16384),
    "d_head_mlp": (1, 4096), "n_rbf": (0, 1024),
}
#: Largest window radius (Å). Images per atom grow as cutoff³ (about 8× the 10 Å default's
#: at 20 Å), while the Gaussian weight beyond 10 Å is already below 3e-6 of the self image.
MAX_CUTOFF = 20.0
MAX_TARGETS = 64


def _finite(name: str, value: Any) -> float:
    """``value`` if it is a finite real number (not a bool); ValueError naming ``name``."""
    try:
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


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
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a target needs a non-empty name, got {self.name!r}")
        if not isinstance(self.unit, str):
            raise ValueError(f"target {self.name!r}: unit must be a string, got {self.unit!r}")
        if self.transform not in ("none", "log10"):
            raise ValueError(f"unknown target transform {self.transform!r}; use 'none' or 'log10'")
        if self.kind not in ("intensive", "energy"):
            raise ValueError(f"unknown target kind {self.kind!r}; use 'intensive' or 'energy'")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Crystalformer; the defaults are the paper's model.

    ``cutoff`` is the radius of the periodic window in Å: every image of every atom pair
    closer than this enters the attention. The Gaussian weight of an image at distance d is
    exp(-d²/2σ²) with σ < r0/√b = 1.98 Å, so an image outside the window weighs less than
    exp(-cutoff²/(2·1.98²)) relative to the self image (2.9e-6 at 10 Å). See
    ``docs/ARCHITECTURE.md`` for the bound on the whole tail.

    ``domain`` chooses real-space heads (the paper's model), reciprocal-space heads that sum
    wide Gaussians σ = reciprocal_scale·√ρ > reciprocal_scale·√b exactly as a Fourier series
    over all atoms of the crystal, or a mix: ``"alternating"`` layers (even layers real),
    ``"dual"`` (in every layer the first half of the heads real, the rest reciprocal) and
    ``"routed"`` (every head's α a mixture of both, by a learned per-atom gate). See ``reciprocal.py``.
    ``route_temperature`` multiplies the gate's logit: Adam moves a parameter by about lr per
    step whatever its gradient's scale, so at temperature 1 a gate moves a few hundredths in a
    16-epoch run and never commits (docs/results.md); a larger one lets it reach either space.

    ``activation_sharpness`` β makes every activation f(βx)/β: a smooth f with a large β
    stays close to ReLU (GELU within 0.17/β of it), so a potential can start from a ReLU
    backbone with its weights unchanged (``potential.from_backbone``).

    ``readout="mean"`` is the paper's: the head MLP on the mean of the atom features.
    ``"atoms"`` applies the head to every atom and averages its outputs, so that an energy
    target becomes a sum of per-atom energies, each a nonlinear function of its own atom's
    environment (the form of CHGNet's and MACE's energies): the choice for a potential.
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
    activation_sharpness: float = 1.0
    domain: Domain = "real"
    reciprocal_scale: float = 2.2
    route_temperature: float = 10.0
    readout: Readout = "mean"
    targets: tuple[TargetSpec, ...] = field(default_factory=lambda: (TargetSpec("target"),))

    def __post_init__(self) -> None:
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"{name}={value} is outside the supported range [{low}, {high}]")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("rbf_max", "r0", "rho_slope"):
            if _finite(name, getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < _finite("activation_sharpness", self.activation_sharpness) <= 1e4:
            raise ValueError(f"activation_sharpness must lie in (0, 1e4], got {self.activation_sharpness}")
        if not 0.0 < _finite("rho_lower_bound", self.rho_lower_bound) < 1.0:
            raise ValueError(f"rho_lower_bound must lie in (0, 1), got {self.rho_lower_bound}")
        if _finite("cutoff", self.cutoff) > MAX_CUTOFF:
            raise ValueError(f"cutoff={self.cutoff} Å is above the supported maximum of {MAX_CUTOFF} Å")
        if self.cutoff < 3.5 * self.sigma_max:
            raise ValueError(
                f"cutoff={self.cutoff} Å is below 3.5·σ_max = {3.5 * self.sigma_max:.2f} Å, "
                "the paper's own truncation; the window would cut off real attention weight"
            )
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; use one of {', '.join(DOMAINS)}")
        if self.domain == "dual" and self.n_heads % 2:
            raise ValueError(f"domain 'dual' splits the heads in half; n_heads={self.n_heads} is odd")
        if self.domain == "alternating" and self.n_blocks < 2:
            raise ValueError("domain 'alternating' needs n_blocks >= 2 (odd layers are the reciprocal ones)")
        if self.readout not in READOUTS:
            raise ValueError(f"unknown readout {self.readout!r}; use one of {', '.join(READOUTS)}")
        if self.reciprocal_scale <= 0:
            raise ValueError(f"reciprocal_scale must be positive, got {self.reciprocal_scale}")
        if _finite("route_temperature", self.route_temperature) <= 0:
            raise ValueError(f"route_temperature must be positive, got {self.route_temperature}")
        if self.activation not in ("relu", "gelu", "silu"):
            raise ValueError(f"unknown activation {self.activation!r}; use relu, gelu or silu")
        if not isinstance(self.targets, tuple) or not all(isinstance(t, TargetSpec) for t in self.targets):
            raise ValueError(f"targets must be a tuple of TargetSpec, got {self.targets!r}")
        if not 1 <= len(self.targets) <= MAX_TARGETS:
            raise ValueError(f"a model needs 1 to {MAX_TARGETS} targets, got {len(self.targets)}")
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
    def reciprocal_sigma_min(self) -> float:
        """Lower bound of the reciprocal heads' width σ = reciprocal_scale·√ρ, ρ > b (Å)."""
        return self.reciprocal_scale * math.sqrt(self.rho_lower_bound)

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = [asdict(t) for t in self.targets]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The inverse of ``to_dict``; ValueError for anything else (it may come from a file)."""
        if not isinstance(data, dict):
            raise ValueError(f"a model config is a JSON object, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        data = dict(data)
        if "targets" in data:
            targets = data["targets"]
            target_keys = {f.name for f in fields(TargetSpec)}
            if not isinstance(targets, list) or not all(
                isinstance(t, dict) and set(t) <= target_keys and "name" in t for t in targets
            ):
                raise ValueError(f"targets must be a list of objects with keys among {sorted(target_keys)}")
            data["targets"] = tuple(TargetSpec(**t) for t in targets)
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the defaults are the paper's MP settings.

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
