"""Reciprocal-space attention heads: wide Gaussians summed over the lattice as a Fourier series.

A head's spatial term is a Gaussian summed over every periodic image. By Poisson summation
that lattice sum equals a sum over the reciprocal lattice:

    Σ_n exp(−|r + nL|²/2σ²) = ((2πσ²)^{3/2}/|V|) Σ_m exp(−σ²|k_m|²/2) cos(k_m·r),

with k_m = 2π m·L⁻ᵀ and r = p_j − p_i. The left side converges fast for narrow Gaussians
(the real-space heads, σ < 1.98 Å, summed over the window of ``geometry.py``), the right
side for wide ones: reciprocal heads have σ = s·√ρ > s·√b = 1.556 Å (s =
``reciprocal_scale`` = 2.2 Å, b = 0.5) and no upper bound, so they see every atom of the
crystal and model long-range interactions. They use plain values v_j (no edge encoding β).

**Window.** Every k of the reciprocal lattice with σ_min·|k| ≤ ``KAPPA`` (8, a sphere in
k-space, found per crystal from its cell), of which one half-space is kept since the cosine
is even. A dropped term weighs < e^{−KAPPA²/2} = 1.3e-14 of the k = 0 term for any σ ≥
σ_min, and all dropped terms together (about the tail of a 3D Gaussian of width 1/σ beyond
KAPPA/σ) ~8e-14 of the self pair's lattice sum, which is ≥ 1. The sphere does not depend
on the cell that describes the crystal, so the sum keeps the model's invariance to
supercells and basis changes.

**Guard.** The series is a positive function written as a sum of cosines; where it is tiny
(two atoms far apart, compared with σ) rounding and truncation leave an absolute error of
about eps times its value at r = 0 (the self pair), and it can even come out negative. We
therefore clamp the ratio to its r = 0 value at ``floor`` (1e-12 in float64, 16·eps in lower
precision), i.e. exp(α_ij) ≥ floor·exp(α_ii): a clamped pair keeps a weight below
``floor`` of the self pair's, where the true value is anyway, and log never sees ≤ 0.

**Cost.** All N_c² pairs of each crystal, through cos(k·(p_j − p_i)) = cos k·p_i cos k·p_j +
sin k·p_i sin k·p_j: one (N_c·H, 2K) @ (2K, N_c) matmul per crystal and head group,
O(N_c²·H·K) with K ≈ 1.15·|V|/Å³ waves for the default σ_min.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from ase.data import chemical_symbols
from ase.formula import Formula
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import MAX_SLOTS, PeriodicAttention, WindowGeometry
from .config import ModelConfig
from .errors import StructureError

#: σ_min·|k| of the largest reciprocal vector summed (see the module docstring).
KAPPA = 8.0


def reciprocal_window(cell: np.ndarray, k_max: float) -> np.ndarray:
    """Integer m ≠ 0 of one half-space (first non-zero component positive) with
    |2π m·L⁻ᵀ| ≤ k_max, as (K, 3) int64, for a cell with lattice vectors as rows."""
    recip = 2 * np.pi * np.linalg.inv(cell).T  # rows b_l
    # m_l = k·a_l/2π, so |m_l| ≤ k_max·|a_l|/2π bounds the box that holds the sphere.
    r = np.floor(k_max * np.linalg.norm(cell, axis=1) / (2 * np.pi)).astype(np.int64)
    axes = [np.arange(0, r[0] + 1), np.arange(-r[1], r[1] + 1), np.arange(-r[2], r[2] + 1)]
    m = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    half = (m[:, 0] > 0) | ((m[:, 0] == 0) & ((m[:, 1] > 0) | ((m[:, 1] == 0) & (m[:, 2] > 0))))
    k = m @ recip
    return m[half & ((k * k).sum(1) <= k_max**2)]


@dataclass
class CrystalWaves:
    """One crystal's plane waves: |k|² (K,), [cos k·p_i, sin k·p_i] (n, 2K), log |V|."""

    k2: torch.Tensor
    waves: torch.Tensor
    log_volume: torch.Tensor


@dataclass
class ReciprocalGeometry:
    """Plane waves of every crystal in a batch (atoms of a crystal are contiguous)."""

    crystals: list[CrystalWaves]
    sizes: list[int]  # atoms per crystal
    floor: float  # lower clamp of the series relative to its value at r = 0


@dataclass
class SpaceGeometry:
    """What the layers of a non-real domain need: the real window (None when no layer uses
    it) and the reciprocal plane waves."""

    real: WindowGeometry | None
    reciprocal: ReciprocalGeometry


def _refuse_open(pbc: np.ndarray, label: str, domain: str) -> None:
    if not pbc.all():
        raise StructureError(
            f"{label}: pbc={pbc.tolist()}; reciprocal-space attention (domain {domain!r}) needs a "
            "cell periodic along all three axes (the lattice sum of a slab, wire or molecule is a "
            "different formula)"
        )


def check_periodic(config: ModelConfig, atoms_list, labels) -> None:
    """StructureError naming the first structure that is not 3D-periodic, for domains with
    reciprocal heads; nothing for the real domain."""
    if config.domain != "real":
        for atoms, label in zip(atoms_list, labels):
            _refuse_open(np.asarray(atoms.pbc, dtype=bool), label, config.domain)


def reciprocal_geometry(batch, config: ModelConfig) -> ReciprocalGeometry:
    """Reciprocal window and plane waves of each crystal, differentiable in positions and
    cells (forces, stress); the window itself depends only on the cell."""
    sizes = batch.n_atoms.tolist()
    pbc = batch.pbc.cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for b in range(len(sizes)):
        numbers = batch.numbers[offsets[b] : offsets[b + 1]].tolist()
        _refuse_open(pbc[b], f"structure {b} of the batch ({Formula.from_list([chemical_symbols[z] for z in numbers])})", config.domain)
    k_max = KAPPA / config.reciprocal_sigma_min
    cells = batch.cells
    recip = 2 * math.pi * torch.linalg.inv(cells).transpose(1, 2)  # (B, 3, 3), rows b_l
    log_volume = torch.linalg.det(cells).abs().log()  # |V|: a left-handed cell has det < 0
    cells_np = cells.detach().cpu().double().numpy()
    crystals = []
    for b, (p, rb, lv) in enumerate(zip(batch.positions.split(sizes), recip.unbind(0), log_volume.unbind(0))):
        m = torch.from_numpy(reciprocal_window(cells_np[b], k_max)).to(cells)
        kvec = m @ rb  # (K, 3)
        phase = p @ kvec.T  # (n, K)
        crystals.append(CrystalWaves((kvec * kvec).sum(-1), torch.cat([phase.cos(), phase.sin()], 1), lv))
    floor = max(1e-12, 16 * torch.finfo(cells.dtype).eps)
    return ReciprocalGeometry(crystals, sizes, floor)


def log_lattice_sum(sigma2: torch.Tensor, crystal: CrystalWaves, floor: float, start: int = 0) -> torch.Tensor:
    """α_ij = log Σ_n exp(−|p_j − p_i + nL|²/2σ_i²) per head, (r, H, n), for the query atoms
    i = start..start+r−1 of the crystal, from their σ² (r, H)."""
    r, h = sigma2.shape
    k = crystal.k2.shape[0]
    g = torch.exp(-0.5 * sigma2[..., None] * crystal.k2)  # (r, H, K)
    at_zero = 1 + 2 * g.sum(-1)  # (r, H): the series at r = 0, where every cosine is 1
    rows = crystal.waves[start : start + r].view(r, 1, 2, k)
    weighted = (g[:, :, None, :] * rows).reshape(r * h, 2 * k)
    series = 1 + 2 * (weighted @ crystal.waves.T).view(r, h, -1)
    log_front = 1.5 * torch.log(2 * math.pi * sigma2) - crystal.log_volume + at_zero.log()
    return log_front[..., None] + (series / at_zero[..., None]).clamp_min(floor).log()


def reciprocal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma2: torch.Tensor, geom: ReciprocalGeometry
) -> torch.Tensor:
    """Σ_j softmax_j(q_i·k_j/√dh + α_ij) v_j over all atoms j of i's crystal, (N, H, dh).

    q, k, v (N, H, dh); sigma2 (N, H) the heads' σ² in Å². A large crystal runs in chunks
    of query atoms, each holding at most ``MAX_SLOTS`` (atom, head, wave) entries, and
    checkpointed under autograd as the real-space path is: memory stays bounded, though
    time grows as N_c²·|V|.
    """
    out = []
    split = [t.split(geom.sizes) for t in (q, k, v, sigma2)]
    for crystal, qc, kc, vc, s2 in zip(geom.crystals, *split):
        n, h = s2.shape
        rows = max(1, MAX_SLOTS // max(1, 2 * h * crystal.k2.shape[0]))
        if n <= rows:
            out.append(_crystal_rows(qc, kc, vc, s2, crystal, geom.floor, 0, n))
            continue
        run = partial(checkpoint, _crystal_rows, use_reentrant=False) if torch.is_grad_enabled() else _crystal_rows
        out.extend(run(qc, kc, vc, s2, crystal, geom.floor, a, min(a + rows, n)) for a in range(0, n, rows))
    return torch.cat(out)


def _crystal_rows(q, k, v, sigma2, crystal: CrystalWaves, floor: float, a: int, b: int) -> torch.Tensor:
    """``reciprocal_attention`` of one crystal's query atoms a..b−1, (b−a, H, dh)."""
    logits = torch.einsum("ihd,jhd->ihj", q[a:b], k) / math.sqrt(q.shape[-1])
    logits = logits + log_lattice_sum(sigma2[a:b], crystal, floor, a)
    return torch.einsum("ihj,jhd->ihd", logits.softmax(-1), v)


def layer_kind(config: ModelConfig, layer: int) -> str:
    """'real', 'reciprocal', 'dual' or 'routed': the heads of block ``layer``."""
    if config.domain == "alternating":
        return "real" if layer % 2 == 0 else "reciprocal"
    return config.domain


def real_space_heads(config: ModelConfig, layer: int) -> int:
    """Heads of block ``layer`` that sum over the real-space window (and own a W_E)."""
    h = config.n_heads
    return {"real": h, "reciprocal": 0, "dual": h // 2, "routed": h}[layer_kind(config, layer)]


class MixedSpaceAttention(PeriodicAttention):
    """A periodic attention layer whose heads sum in real space, reciprocal space or both.

    ``kind`` 'reciprocal': every head reciprocal; 'dual': heads 0..H/2−1 real (with β), the
    rest reciprocal (without β); 'routed': every head computes both outputs and mixes them,
    g·o_real + (1 − g)·o_reciprocal with g = sigmoid(q_i·u_h + c_h) learned per head and atom
    (u = c = 0 at start: an even mix); 'real': the plain real-space layer. The frozen
    standardisation that gives ρ is shared by all heads of the layer.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config)
        h = config.n_heads
        self.kind = kind = layer_kind(config, layer)
        self.real_heads = real_space_heads(config, layer)
        self.reciprocal_scale = config.reciprocal_scale
        if self.real_heads < h:  # W_E only for the real-space heads
            self.rbf_proj = (
                nn.Parameter(torch.empty(self.real_heads, self.d_head, config.n_rbf))
                if config.n_rbf and self.real_heads
                else None
            )
        if kind == "routed":
            self.route_weight = nn.Parameter(torch.zeros(h, self.d_head))
            self.route_bias = nn.Parameter(torch.zeros(h))

    def route(self, q: torch.Tensor) -> torch.Tensor:
        """Weight of the real-space output per atom and head (N, H), routed layers only."""
        return torch.sigmoid((q * self.route_weight).sum(-1) + self.route_bias)

    def forward(self, x: torch.Tensor, geom: SpaceGeometry) -> torch.Tensor:
        """x (N, d) → (N, d)."""
        n, hr = x.shape[0], self.real_heads
        q, k, v = self._project(x)  # (N, H, dh) each
        rho = self.rho(q)  # (N, H)
        if hr:
            gamma = -rho[:, :hr] / (2 * self.r0**2)
            heads = [t[:, :hr].contiguous() for t in (q, k, v, gamma)]
            real = self.real_values(*heads, geom.real)
        if self.kind == "real":
            return self.out_proj(real.reshape(n, -1))
        lo = 0 if self.kind == "routed" else hr
        reci = reciprocal_attention(
            q[:, lo:], k[:, lo:], v[:, lo:], self.reciprocal_scale**2 * rho[:, lo:], geom.reciprocal
        )
        if self.kind == "routed":
            g = self.route(q)[..., None]
            values = g * real + (1 - g) * reci
        else:
            values = torch.cat([real, reci], 1) if hr else reci
        return self.out_proj(values.reshape(n, -1))


def attention_for(config: ModelConfig, layer: int) -> nn.Module:
    """The attention module of block ``layer``: the plain real-space layer in the real domain."""
    if config.domain == "real":
        return PeriodicAttention(config)
    return MixedSpaceAttention(config, layer)


def uses_real_window(config: ModelConfig) -> bool:
    return any(layer_kind(config, layer) != "reciprocal" for layer in range(config.n_blocks))
