"""Pseudo-finite periodic attention (spec §2), computed over the geometry-only window.

For query atom i and head h the paper's layer is

    o_i = Σ_j softmax_j(q_i·k_j/√d_h + α_ij) (v_j + β_ij),
    α_ij = log Σ_n exp(γ_i d_ij(n)²),   β_ij = W_E Σ_n π_ij(n) b(d_ij(n)),
    π_ij(n) = exp(γ_i d_ij(n)² − α_ij),

with γ_i = −ρ_i/(2 r0²) (σ_i = r0/√ρ_i). Multiplying out, a_ij·π_ij(n) is a single softmax
over all images (j, n) of the logits q_i·k_j/√d_h + γ_i d_ij(n)², so we compute that one
softmax over the window slots (N, M, H), which is numerically stable (max-subtracted) and
needs no per-pair log-sum-exp. Then

    Σ_j a_ij v_j       = Σ_pairs (Σ_n weights) v_j        (scatter to pairs, then gather v)
    Σ_j a_ij β_ij      = W_E · Σ_slots weight · b(d)       (one batched matmul (N,H,M)@(N,M,K))

so nothing of size (images × heads × K) is ever formed. ``encodings`` returns α and β per
pair, the spec's intermediate quantities, for tests and inspection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


@dataclass
class WindowGeometry:
    """What every layer needs from the window; computed once per batch by the model.

    The (N, M, K) radial bases are either precomputed (``basis``, shared by all layers) or,
    for windows too large to hold them, made from ``d2`` per row chunk by ``rbf``.
    """

    d2: torch.Tensor  # (N, M) squared image distances, Å²
    basis: torch.Tensor | None  # (N, M, K) Gaussian RBFs of the distance, or None
    mask: torch.Tensor  # (N, M) bool, real image slots
    neighbor: torch.Tensor  # (N, M) long, atom j of each slot
    pair: torch.Tensor  # (N, M) long, pair of each slot
    pair_i: torch.Tensor  # (P,) long
    pair_j: torch.Tensor  # (P,) long
    rbf: GaussianBasis | None = None  # makes the bases on demand when ``basis`` is None

    def basis_rows(self, a: int, b: int) -> torch.Tensor | None:
        """RBFs of query atoms a..b-1, (b-a, M, K); None when the model has K = 0."""
        if self.basis is not None:
            return self.basis[a:b]
        return self.rbf(self.d2[a:b]) if self.rbf is not None else None


class GaussianBasis(nn.Module):
    """K Gaussians of the distance, centred at k·r_max/K (k = 1..K) with width r_max/K."""

    def __init__(self, n_rbf: int, r_max: float) -> None:
        super().__init__()
        self.width = r_max / n_rbf
        self.register_buffer(
            "centers", torch.arange(1, n_rbf + 1, dtype=torch.float64) * self.width, persistent=False
        )

    def forward(self, d2: torch.Tensor) -> torch.Tensor:
        # sqrt'(0) is infinite: the self image has d² ≡ 0 with a zero gradient, so clamping
        # keeps its value (b(1e-15) = b(0) in any precision) and gives a zero, not NaN, gradient.
        d = d2.clamp_min(1e-30).sqrt()
        z = (d[..., None] - self.centers.to(d.dtype)) / self.width
        # Clamping at e^-80 changes nothing that matters and avoids underflowing exp(),
        # which runs several times slower on x86 CPUs (half the entries underflow here).
        return torch.exp(-0.5 * (z * z).clamp_max(160.0))  # (..., K)


class PeriodicAttention(nn.Module):
    """One multi-head periodic attention layer with per-atom, per-head Gaussian widths."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h, dh = config.d_model, config.n_heads, config.d_head
        self.n_heads, self.d_head = h, dh
        self.r0 = config.r0
        self.rho_lower_bound = config.rho_lower_bound
        self.rho_slope = config.rho_slope
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.sigma_weight = nn.Parameter(torch.empty(h, dh))  # w of spec §2.2
        self.rbf_proj = nn.Parameter(torch.empty(h, dh, config.n_rbf)) if config.n_rbf else None
        # Frozen standardisation of s = q·w (spec §2.2): set from the first training batch,
        # then constant, so that a prediction never depends on the batch it is in.
        self.register_buffer("sigma_shift", torch.zeros(()))
        self.register_buffer("sigma_scale", torch.ones(()))
        self.register_buffer("sigma_ready", torch.zeros((), dtype=torch.bool))

    def gamma(self, q: torch.Tensor) -> torch.Tensor:
        """γ = −ρ/(2 r0²) from the queries (N, H, dh); returns (N, H)."""
        return -self.rho(q) / (2 * self.r0**2)

    def rho(self, q: torch.Tensor) -> torch.Tensor:
        """ρ ∈ (b, ∞) per atom and head (N, H), from q·w under the frozen standardisation.

        Real-space heads use σ = r0/√ρ, reciprocal ones σ = s·√ρ (``reciprocal.py``); in a
        layer with both kinds the standardisation is shared by all heads.
        """
        s = (q * self.sigma_weight).sum(-1)  # (N, H)
        if self.training and not bool(self.sigma_ready):
            with torch.no_grad():
                self.sigma_shift.copy_(s.mean())
                self.sigma_scale.copy_(1.0 / s.std())
                self.sigma_ready.fill_(True)
        x = (s - self.sigma_shift) * self.sigma_scale
        b = self.rho_lower_bound
        return (1 - b) * F.elu(self.rho_slope * x / (1 - b)) + 1

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        shape = (n, self.n_heads, self.d_head)
        return self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)

    def forward(self, x: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
        """x (N, d) → (N, d)."""
        n = x.shape[0]
        q, k, v = self._project(x)  # (N, H, dh) each
        return self.out_proj(self.real_values(q, k, v, self.gamma(q), geom).reshape(n, -1))

    def real_values(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, geom: WindowGeometry
    ) -> torch.Tensor:
        """Head outputs Σ_j a_ij (v_j + β_ij) (N, h, dh) of the real-space heads given in q, k, v
        (the first h heads, h ≤ H: ``rbf_proj`` holds W_E of exactly those)."""
        values, mixed = window_attention(q, k, v, gamma, geom)
        if self.rbf_proj is not None:
            values = values + torch.einsum("nhk,hdk->nhd", mixed, self.rbf_proj)  # Σ_j a_ij β_ij
        return values

    def encodings(
        self, x: torch.Tensor, geom: WindowGeometry
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The spec's periodic encodings per pair: α (P, H) and β (P, H, dh) (None if K = 0).

        Not used by ``forward`` (which folds them into one softmax); here for tests and for
        looking inside a trained model.
        """
        h = self.n_heads
        q, _, _ = self._project(x)
        gamma = self.gamma(q)
        logits = gamma[:, None, :] * geom.d2[..., None]  # (N, M, H)
        logits = logits.masked_fill(~geom.mask[..., None], float("-inf"))
        index = geom.pair.reshape(-1, 1).expand(-1, h)  # (N·M, H)
        flat = logits.reshape(-1, h)
        peak = flat.new_full((len(geom.pair_i), h), float("-inf"))
        peak = peak.scatter_reduce(0, index, flat.detach(), "amax")  # (P, H)
        expo = torch.exp(flat - peak[geom.pair.reshape(-1)])  # (N·M, H), 0 on padding
        total = expo.new_zeros(peak.shape).index_add_(0, geom.pair.reshape(-1), expo)
        alpha = peak + total.log()  # (P, H)
        if self.rbf_proj is None:
            return alpha, None
        image_weight = expo / total[geom.pair.reshape(-1)]  # π (N·M, H)
        full = geom.basis_rows(0, len(geom.d2))
        basis = full.reshape(-1, full.shape[-1])  # (N·M, K)
        mean_basis = basis.new_zeros(len(geom.pair_i), h, basis.shape[-1])
        mean_basis.index_add_(0, geom.pair.reshape(-1), image_weight[..., None] * basis[:, None, :])
        beta = torch.einsum("phk,hdk->phd", mean_basis, self.rbf_proj)
        return alpha, beta


#: Image slots handled at once by the torch path; large cells are split into row chunks
#: so that each per-pair gather (P, H, dh) and the chunk's (rows, M, K) radial bases stay
#: below ~0.5 GiB in float32 whatever the cell size (about 1.6 GiB peak per chunk, see
#: docs/benchmarks.md). Windows with more slots get no precomputed bases.
MAX_SLOTS = 1 << 20


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    geom: WindowGeometry,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax over every image (j, n) in each atom's window, applied to values and bases.

    q, k, v (N, H, dh), gamma (N, H). Returns Σ_(j,n) w·v_j (N, H, dh) and Σ_(j,n) w·b(d)
    (N, H, K) (None without bases), with w = softmax of q_i·k_j/√dh + γ_i d_ij(n)².
    On CUDA with triton installed the fused kernels of ``triton_attention`` run; everywhere
    else ``torch_window_attention``, their reference.
    """
    if q.is_cuda:
        from . import triton_attention  # lazy: triton is an optional dependency

        if triton_attention.available(q, k, v, gamma, geom.d2):
            return triton_attention.window_attention(q, k, v, gamma, geom)
    return torch_window_attention(q, k, v, gamma, geom)


def torch_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    geom: WindowGeometry,
    max_slots: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``window_attention`` in plain torch (any device, twice differentiable).

    Rows (query atoms) are independent, so they run in chunks of ``max_slots`` slots
    (default ``MAX_SLOTS``). Under autograd each chunk is checkpointed: its gathers are
    recomputed in backward rather than kept, so forces and force training on a large cell
    hold one chunk's intermediates at a time instead of all of them.
    """
    n, m = geom.d2.shape
    rows = max(1, (max_slots or MAX_SLOTS) // max(m, 1))
    if n <= rows:
        return _window_rows(q, k, v, gamma, geom, 0, n)
    run = _window_rows
    if torch.is_grad_enabled():
        run = partial(checkpoint, _window_rows, use_reentrant=False)
    parts = [run(q, k, v, gamma, geom, a, min(a + rows, n)) for a in range(0, n, rows)]
    values = torch.cat([p[0] for p in parts])
    mixed = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
    return values, mixed


def _window_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, geom: WindowGeometry, a: int, b: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``window_attention`` for query atoms a..b-1; their pairs are contiguous (sorted by i)."""
    h, dh = q.shape[1], q.shape[2]
    p0, p1 = torch.searchsorted(geom.pair_i, torch.tensor([a, b], device=q.device)).tolist()
    pair_i, pair_j = geom.pair_i[p0:p1], geom.pair_j[p0:p1]
    pair = geom.pair[a:b] - p0  # (n, M) into this chunk's pairs
    qk = (q[pair_i] * k[pair_j]).sum(-1) / math.sqrt(dh)  # (Pc, H)
    logits = qk[pair] + gamma[a:b, None, :] * geom.d2[a:b, :, None]  # (n, M, H)
    logits = logits.masked_fill(~geom.mask[a:b, :, None], float("-inf"))
    weights = logits.softmax(dim=1)  # (n, M, H): a_ij·π_ij(n)

    pair_weight = weights.new_zeros(p1 - p0, h)  # (Pc, H) = a_ij
    pair_weight.index_add_(0, pair.reshape(-1), weights.reshape(-1, h))
    values = v.new_zeros(b - a, h, dh).index_add_(0, pair_i - a, pair_weight[..., None] * v[pair_j])
    basis = geom.basis_rows(a, b)  # (n, M, K)
    mixed = torch.bmm(weights.transpose(1, 2), basis) if basis is not None else None
    return values, mixed
