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
KAPPA/σ) ~8e-14 of the self pair's lattice sum, which is ≥ 1. That is for float64; in
lower precision the sphere is ``KAPPA_LOW`` = 6 (a dropped term < 1.5e-8, the whole tail
~7.5e-8 of the self sum, below float32's eps and its clamp floor below), with (6/8)³ ≈ 0.42
of the waves. The sphere does not depend
on the cell that describes the crystal, so the sum keeps the model's invariance to
supercells and basis changes.

**Guard.** The series is a positive function written as a sum of cosines; where it is tiny
(two atoms far apart, compared with σ) rounding and truncation leave an absolute error of
about eps times its value at r = 0 (the self pair), and it can even come out negative. We
therefore clamp the ratio to its r = 0 value at ``floor`` (1e-12 in float64, 16·eps in lower
precision), i.e. exp(α_ij) ≥ floor·exp(α_ii): a clamped pair keeps a weight below
``floor`` of the self pair's, where the true value is anyway, and log never sees ≤ 0.

**Cost.** All N_c² pairs of each crystal, through cos(k·(p_j − p_i)) = cos k·p_i cos k·p_j +
sin k·p_i sin k·p_j: one (N_c·H, 2K) @ (2K, N_c) product per crystal, O(N_c²·H·K) with
K ≈ 1.15·|V|/Å³ waves for the default σ_min; crystals of similar size share one padded,
batched product (``WaveBlock``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from ase.data import chemical_symbols
from ase.formula import Formula
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import MAX_SLOTS, BandedBasis, GaussianBasis, PeriodicAttention, WindowGeometry, _tiny
from .config import ModelConfig
from .errors import StructureError

#: σ_min·|k| of the largest reciprocal vector summed, in float64 and in lower precision
#: (see the module docstring).
KAPPA = 8.0
KAPPA_LOW = 6.0


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
class WaveBlock:
    """Crystals of similar size and wave count, padded to S atoms and K waves, so that one
    batched matmul serves them all (a loop over crystals cost more than the arithmetic of
    MP-sized cells).

    ``cosines`` holds cos k·(p_j − p_i) for every pair and wave, (C, S_i, S_j, K): it does not
    depend on the layer, so every layer's lattice sum is one batched product with its
    Gaussian weights. A crystal too large to hold them has ``waves`` instead, whose sums are
    products of the weighted waves of a chunk of query atoms with all its waves. Padded waves have
    |k|² = ``PAD_K2``, whose Gaussian weight is exactly 0 for every σ (so they drop out of
    every sum), padded atoms ``atom_mask`` False (no query attends to them).
    """

    k2: torch.Tensor  # (C, K) |k|², PAD_K2 on padding
    cosines: torch.Tensor | None  # (C, S, S, K), or None and:
    waves: torch.Tensor | None  # (C, S, 2K) [cos k·p_i, sin k·p_i]
    log_volume: torch.Tensor  # (C,) log |V|
    atom_mask: torch.Tensor  # (C, S) bool
    padding: bool  # whether any atom_mask is False

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, S, K)."""
        c, s = self.atom_mask.shape
        return c, s, self.k2.shape[1]


@dataclass
class ReciprocalGeometry:
    """Plane waves of every crystal in a batch, in blocks.

    The blocks' padded atom slots, block after block and crystal after crystal, are rows of
    one (Σ C·S, ...) layout: ``rows`` names the batch atom of each slot (N on padding) and
    ``slots`` the slot of each batch atom, so that padding every block, and undoing it, is
    one gather per tensor rather than several ops per block (and as many in backward).
    """

    blocks: list[WaveBlock]
    rows: torch.Tensor  # (Σ C·S,) long, batch atom per padded slot, N on padding
    slots: torch.Tensor  # (N,) long, padded slot per batch atom
    block_shapes: list[tuple[int, int]]  # (C, S) per block
    floor: float  # lower clamp of the series relative to its value at r = 0

    def padded(self, x: torch.Tensor, fill: float = 0.0) -> list[torch.Tensor]:
        """Per-atom x (N, ...) of the batch as one (C, S, ...) view per block, ``fill`` on padding."""
        extended = torch.cat([x, x.new_full((1, *x.shape[1:]), fill)])
        parts = extended.index_select(0, self.rows).split([c * s for c, s in self.block_shapes])
        return [p.view(c, s, *x.shape[1:]) for p, (c, s) in zip(parts, self.block_shapes)]

    def unpadded(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of ``padded``: per-block (C, S, ...) back to the batch's (N, ...)."""
        flat = [p.reshape(-1, *p.shape[2:]) for p in parts]
        return (flat[0] if len(flat) == 1 else torch.cat(flat)).index_select(0, self.slots)


@dataclass
class PairImages:
    """The real-space window of one ``WaveBlock``'s crystals, laid out as its padded atoms.

    Routed heads mix each pair's real-space lattice sum into α, so they need it per pair
    (i, j), summed over the pair's images in the window, rather than the real heads' one
    softmax over all images. Row i, slot m is an image of atom ``atom[c, i, m]`` (its place
    in the crystal; S on padding slots and rows) at squared distance ``d2``.
    """

    d2: torch.Tensor  # (C, S, M) Å², cutoff² on padding
    atom: torch.Tensor  # (C, S, M) long
    excess: torch.Tensor  # (C, S, M) d² minus the (detached) d² of the pair's nearest image, 0 on padding
    nearest: torch.Tensor  # (C, S, S) detached min d² of each pair's images, cutoff² without any
    empty: torch.Tensor  # (C, S, S) bool: pair (i, j) without an image in the window
    basis: BandedBasis | None  # radial bases of the (C·S, M) slots, for a block run in one piece
    rbf: GaussianBasis | None

    def bases(self, a: int, b: int) -> BandedBasis:
        """Radial bases of the slots of rows a..b−1, (C·r, M, K) in bands (needs ``rbf``)."""
        c, s, m = self.atom.shape
        if self.basis is not None and (a, b) == (0, s):
            return self.basis
        return BandedBasis.make(self.rbf, self.d2[:, a:b].reshape(-1, m), (self.atom[:, a:b] < s).reshape(-1, m))


@dataclass
class SpaceGeometry:
    """What the layers of a non-real domain need: the real window (None when no layer uses
    it), the reciprocal plane waves and, for routed layers, the window per wave block."""

    real: WindowGeometry | None
    reciprocal: ReciprocalGeometry
    images: list[PairImages] | None = None


def pair_images(
    d2: torch.Tensor, batch, geom: ReciprocalGeometry, rbf: GaussianBasis | None, cutoff: float
) -> list[PairImages]:
    """The window's images (squared distances d2 (N, M) of ``batch``'s slots, differentiable)
    regrouped as ``geom``'s wave blocks, with each pair's nearest image and radial bases."""
    rc2 = cutoff**2
    start = torch.cumsum(batch.n_atoms, 0) - batch.n_atoms
    position = torch.arange(len(d2), device=d2.device) - start[batch.crystal]  # place of each atom in its crystal
    atom_of_slot = torch.where(batch.mask, position[batch.neighbor], -1)
    out = []
    for block, dist, atom in zip(geom.blocks, geom.padded(torch.where(batch.mask, d2, rc2), fill=rc2),
                                 geom.padded(atom_of_slot, fill=-1)):
        c, s, _ = block.shape
        width = int((atom >= 0).sum(-1).max()) if atom.numel() else 0  # real slots come first in a row
        dist, atom = dist[:, :, :width], atom[:, :, :width]
        atom = torch.where(atom < 0, s, atom)
        nearest = dist.new_full((c, s, s + 1), rc2).scatter_reduce_(-1, atom, dist.detach(), "amin")
        count = torch.zeros(c, s, s + 1, dtype=torch.int32, device=d2.device)
        count.scatter_add_(-1, atom, torch.ones_like(atom, dtype=torch.int32))
        images = PairImages(dist, atom, dist - nearest.gather(-1, atom), nearest[..., :s], count[..., :s] == 0, None, rbf)
        if block.cosines is not None and rbf is not None:  # one piece: its bases once for every layer
            images.basis = images.bases(0, s)
        out.append(images)
    return out


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


#: Crystals share a block while their atoms and waves are at least these fractions of the
#: block's first (largest) and its (C, S, S, K) cosines stay within ``MAX_SLOTS`` entries;
#: a crystal larger than that is a block of its own, without stored cosines.
BLOCK_ATOM_FILL = 0.75
BLOCK_WAVE_FILL = 0.5
#: |k|² of a padded wave, Å⁻²: its Gaussian weight exp(−σ²|k|²/2) is far below the
#: threshold of ``_wave_weights`` for any σ ≥ σ_min, so it is exactly 0.
PAD_K2 = 1e4


def _group(sizes: list[int], waves: list[int]) -> list[list[int]]:
    """Crystal indices per block: sorted by size, then by wave count, largest first."""
    order = sorted(range(len(sizes)), key=lambda b: (-sizes[b], -waves[b]))
    groups: list[list[int]] = []
    for b in order:
        if groups:
            group = groups[-1]
            s, k = sizes[group[0]], max(max(waves[x] for x in group), waves[b])
            if (sizes[b] >= BLOCK_ATOM_FILL * s and waves[b] >= BLOCK_WAVE_FILL * k
                    and (len(group) + 1) * s * s * k <= MAX_SLOTS):
                group.append(b)
                continue
        groups.append([b])
    return groups


def reciprocal_geometry(batch, config: ModelConfig) -> ReciprocalGeometry:
    """Reciprocal window and plane waves of each crystal, differentiable in positions and
    cells (forces, stress); the window itself depends only on the cell."""
    sizes = batch.n_atoms.tolist()
    pbc = batch.pbc.cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for b in range(len(sizes)):
        numbers = batch.numbers[offsets[b] : offsets[b + 1]].tolist()
        _refuse_open(pbc[b], f"structure {b} of the batch ({Formula.from_list([chemical_symbols[z] for z in numbers])})", config.domain)
    cells = batch.cells
    k_max = (KAPPA if cells.dtype == torch.float64 else KAPPA_LOW) / config.reciprocal_sigma_min
    device = cells.device
    recip = 2 * math.pi * torch.linalg.inv(cells).transpose(1, 2)  # (B, 3, 3), rows b_l
    log_volume = torch.linalg.det(cells).abs().log()  # |V|: a left-handed cell has det < 0
    cells_np = cells.detach().cpu().double().numpy()
    windows = [reciprocal_window(cells_np[b], k_max) for b in range(len(sizes))]
    groups = _group(sizes, [len(m) for m in windows])
    n = len(batch.positions)
    rows = np.full(sum(len(g) * sizes[g[0]] for g in groups), n, dtype=np.int64)
    start = 0
    for group in groups:
        for b in group:
            rows[start : start + sizes[b]] = np.arange(offsets[b], offsets[b + 1])
            start += sizes[group[0]]
    slots = np.empty(n, dtype=np.int64)
    slots[rows[rows < n]] = np.flatnonzero(rows < n)
    floor = max(1e-12, 16 * torch.finfo(cells.dtype).eps)
    geom = ReciprocalGeometry([], torch.from_numpy(rows).to(device), torch.from_numpy(slots).to(device),
                              [(len(g), sizes[g[0]]) for g in groups], floor)
    padded_positions = geom.padded(batch.positions)
    for group, positions in zip(groups, padded_positions):
        c, s, k = len(group), sizes[group[0]], max(len(windows[b]) for b in group)
        m = np.zeros((c, k, 3))
        real_wave = np.zeros((c, k), dtype=bool)
        atom_mask = np.zeros((c, s), dtype=bool)
        for a, b in enumerate(group):
            m[a, : len(windows[b])] = windows[b]
            real_wave[a, : len(windows[b])] = True
            atom_mask[a, : sizes[b]] = True
        index = torch.tensor(group, device=device)
        kvec = torch.from_numpy(m).to(cells) @ recip.index_select(0, index)  # (C, K, 3)
        k2 = torch.where(torch.from_numpy(real_wave).to(device), (kvec * kvec).sum(-1), PAD_K2)
        phase = positions @ kvec.transpose(1, 2)  # (C, S, K)
        cos, sin = phase.cos(), phase.sin()
        if c * s * s * k <= MAX_SLOTS:
            # cos k·(p_j − p_i) = cos k·p_i cos k·p_j + sin k·p_i sin k·p_j, (C, i, j, K), in two
            # ops: measured faster than the cosine of the phase differences and than a product
            # over the pair vectors (an inner size of 3)
            cosines, waves = torch.addcmul(cos[:, :, None] * cos[:, None], sin[:, :, None], sin[:, None]), None
        else:
            cosines, waves = None, torch.cat([cos, sin], -1)
        geom.blocks.append(WaveBlock(k2, cosines, waves, log_volume.index_select(0, index),
                                     torch.from_numpy(atom_mask).to(device), not atom_mask.all()))
    return geom


def _wave_weights(sigma2: torch.Tensor, half_k2: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """2·exp(σ²·(−|k|²/2)) (C, r, H, K) from σ² (C, r, H) and −|k|²/2 (C, K): the weight of a
    wave of the half space in the series (its mirror −k has the same cosine), the 2 folded
    into the exponent, where it costs nothing.

    Weights below e^-30 (e^-80 in float64) of the k = 0 term are set to 0, as the radial
    bases' are: far below the window's own truncation, and denormal otherwise (x86 computes
    exp and products of denormals many times slower).
    """
    tiny = 2 * _tiny(sigma2.dtype)
    # an outer product: a broadcast, not a matmul
    exponent = torch.addcmul(sigma2.new_tensor(math.log(2)), sigma2[..., None], half_k2[:, None, None, :])
    if inplace:
        return F.threshold(exponent.clamp_min_(math.log(tiny / 2)).exp_(), tiny, 0.0, inplace=True)
    return F.threshold(exponent.clamp_min(math.log(tiny / 2)).exp(), tiny, 0.0)


class _WaveWeights(torch.autograd.Function):
    """``_wave_weights`` formed in place in one buffer, with its gradients written out as two
    batched products, where the op-by-op autograd chain makes several more passes over the
    (C, r, H, K) weights and several fresh buffers. A backward that must itself be
    differentiable (force training) recomputes the weights with recorded ops."""

    @staticmethod
    def forward(ctx, sigma2: torch.Tensor, half_k2: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = _wave_weights(sigma2, half_k2, inplace=True)
        ctx.save_for_backward(sigma2, half_k2, g)
        return g

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        sigma2, half_k2, g = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: g as a function of the inputs
            g = _wave_weights(sigma2, half_k2)
        c, r, h = sigma2.shape
        gg = (grad * g).reshape(c, r * h, -1)  # ∂/∂exponent, (C, r·H, K)
        grad_sigma2 = grad_k2 = None
        if ctx.needs_input_grad[0]:
            grad_sigma2 = torch.matmul(gg, half_k2[:, :, None]).view(c, r, h)
        if ctx.needs_input_grad[1]:
            grad_k2 = torch.matmul(sigma2.reshape(c, 1, r * h), gg).view(c, -1)
        return grad_sigma2, grad_k2


def _series(sigma2: torch.Tensor, block: WaveBlock, floor: float, start: int) -> torch.Tensor:
    """The Fourier series 1 + 2 Σ_k g_k cos k·(p_j − p_i), clamped below at ``floor`` times
    its value at r = 0, (C, r, H, S)."""
    c, r, h = sigma2.shape
    g = _WaveWeights.apply(sigma2, -0.5 * block.k2)  # (C, r, H, K) 2·g_k, exactly 0 on padded waves
    if block.cosines is not None:  # 1 + Σ 2g·cos in one product
        cosines = block.cosines[:, start : start + r]  # (C, r, S, K)
        series = torch.baddbmm(g.new_ones(()), g.reshape(c * r, h, -1),
                               cosines.reshape(c * r, *cosines.shape[2:]).transpose(1, 2))
    else:  # Σ_k 2g_k (cos k·p_i cos k·p_j + sin k·p_i sin k·p_j) without the (r, S, K) cosines
        k = block.k2.shape[1]
        rows = block.waves[:, start : start + r].view(c, r, 1, 2, k)
        weighted = (g[:, :, :, None, :] * rows).reshape(c, r * h, 2 * k)
        # in place: the product's backward does not need its own output
        series = (weighted @ block.waves.transpose(1, 2)).add_(1)
    series = series.view(c, r, h, -1)
    # The value at r = 0 is the diagonal j = i (every cosine 1): no pass over the (C, r, H, K) weights.
    at_zero = torch.diagonal(series, offset=start, dim1=1, dim2=3).transpose(1, 2)  # (C, r, H)
    return torch.maximum(series, (floor * at_zero)[..., None])


def log_lattice_sum(sigma2: torch.Tensor, block: WaveBlock, floor: float, start: int = 0) -> torch.Tensor:
    """α_ij = log Σ_n exp(−|p_j − p_i + nL|²/2σ_i²) per head, (C, r, H, S), for the query atoms
    i = start..start+r−1 of each crystal of the block, from their σ² (C, r, H)."""
    series = _series(sigma2, block, floor, start)
    log_front = 1.5 * torch.log(2 * math.pi * sigma2) - block.log_volume[:, None, None]
    return log_front[..., None] + series.log()


def reciprocal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma2: torch.Tensor, geom: ReciprocalGeometry
) -> torch.Tensor:
    """Σ_j softmax_j(q_i·k_j/√dh + α_ij) v_j over all atoms j of i's crystal, (N, H, dh).

    q, k, v (N, H, dh); sigma2 (N, H) the heads' σ² in Å². A crystal too large to store its
    cosines runs in chunks of query atoms, each holding at most ``MAX_SLOTS`` (atom, head,
    wave) entries, and checkpointed under autograd as the real-space path is: memory stays
    bounded, though time grows as N_c²·|V|.
    """
    out = []
    padded = zip(geom.blocks, *(geom.padded(t) for t in (q, k, v)), geom.padded(sigma2, fill=1.0))  # σ² 1: finite logs
    for block, qb, kb, vb, s2 in padded:
        c, n, kw = block.shape
        if block.cosines is not None:
            out.append(_block_rows(qb, kb, vb, s2, block, geom.floor, 0, n))
        else:
            rows = max(1, MAX_SLOTS // max(1, 2 * s2.shape[-1] * kw))
            run = partial(checkpoint, _block_rows, use_reentrant=False) if torch.is_grad_enabled() else _block_rows
            out.append(torch.cat([run(qb, kb, vb, s2, block, geom.floor, a, min(a + rows, n))
                                  for a in range(0, n, rows)], 1))
    return geom.unpadded(out)


def _block_rows(q, k, v, sigma2, block: WaveBlock, floor: float, a: int, b: int) -> torch.Tensor:
    """``reciprocal_attention`` of query rows a..b−1 of every crystal of the block, (C, b−a, H, dh)."""
    logits = torch.einsum("cihd,cjhd->cihj", q[:, a:b] / math.sqrt(q.shape[-1]), k)  # 1/√dh on the smaller q
    # α_ij minus the terms that do not depend on j (the prefactor of ``log_lattice_sum``),
    # which the softmax over j cancels exactly: two passes fewer over (C, r, H, S). In place:
    # the product's backward does not need its output.
    logits = logits.add_(_series(sigma2[:, a:b], block, floor, a).log())
    if block.padding:
        logits = logits.masked_fill_(~block.atom_mask[:, None, None, :], float("-inf"))
    return torch.einsum("cihj,cjhd->cihd", logits.softmax(-1), v)


def routed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, sigma2: torch.Tensor,
    gate_logit: torch.Tensor, geom: ReciprocalGeometry, images: list[PairImages],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routed heads: Σ_j a_ij v_j (N, H, dh), the real-space images' weighted radial bases
    (N, H, K) for β (None without bases) and the share of each head's attention that its
    real-space component carries (N, H), where each head's pair weight mixes the two
    lattice sums with a gate g = sigmoid(``gate_logit``) (N, H):

        exp(α_ij) = g_i Σ_n exp(γ_i d_ij(n)²) + (1 − g_i) Σ_n exp(−d_ij(n)²/2σ_i²),
        a_ij = softmax_j(q_i·k_j/√dh + α_ij),

    the first sum over the window's images (γ (N, H), as the real heads), the second over the
    whole lattice by its Fourier series (σ² (N, H), as the reciprocal heads). The mixture is
    of the sums, not of their logs: only a weight that is a sum over images, each image
    weighing the same whatever cell holds the crystal, keeps the model invariant to
    supercells (a pair (i, j) of the cell is several pairs of a supercell, whose weights
    must add up to its weight). β comes from the real component alone: slot weights
    exp(q_i·k_j/√dh)·g_i·exp(γ_i d²)/Z, the reciprocal heads' having no β.
    Chunked and checkpointed for large crystals as ``reciprocal_attention`` is.
    """
    values, mixed, fraction = [], [], []
    padded = zip(geom.blocks, images, *(geom.padded(t) for t in (q, k, v, gamma, gate_logit)),
                 geom.padded(sigma2, fill=1.0))
    for block, img, qb, kb, vb, gb, tb, s2 in padded:
        c, n, kw = block.shape
        if block.cosines is not None:
            parts = [_routed_rows(qb, kb, vb, gb, tb, s2, block, img, geom.floor, 0, n)]
        else:
            rows = max(1, MAX_SLOTS // max(1, 2 * s2.shape[-1] * max(kw, img.d2.shape[-1])))
            run = partial(checkpoint, _routed_rows, use_reentrant=False) if torch.is_grad_enabled() else _routed_rows
            parts = [run(qb, kb, vb, gb, tb, s2, block, img, geom.floor, a, min(a + rows, n)) for a in range(0, n, rows)]
        values.append(torch.cat([p[0] for p in parts], 1))
        fraction.append(torch.cat([p[2] for p in parts], 1))
        if parts[0][1] is not None:
            mixed.append(torch.cat([p[1] for p in parts], 1))
    return geom.unpadded(values), geom.unpadded(mixed) if mixed else None, geom.unpadded(fraction)


def _routed_rows(q, k, v, gamma, gate_logit, sigma2, block: WaveBlock, img: PairImages, floor: float, a: int, b: int):
    """``routed_attention`` of query rows a..b−1 of every crystal of the block: (C, r, H, dh),
    (C, r, H, K) or None, and (C, r, H)."""
    c, s, h = q.shape[0], q.shape[1], q.shape[2]
    r, m = b - a, img.d2.shape[-1]
    logits = torch.einsum("cihd,cjhd->cihj", q[:, a:b] / math.sqrt(q.shape[-1]), k)  # (C, r, H, S)
    # The real sum relative to each pair's nearest image, so that no sum underflows:
    # α_real = γ·d²_min + log Σ_n exp(γ (d²_n − d²_min)), each term ≤ 1, the nearest one 1.
    # Images below _tiny of their pair's nearest are dropped, as the real heads drop them.
    g = gamma[:, a:b]  # (C, r, H)
    exponent = g[..., None] * img.excess[:, a:b, None, :]  # (C, r, H, M), ≤ 0
    expo = F.threshold(exponent, math.log(_tiny(exponent.dtype)), float("-inf")).exp()
    index = img.atom[:, a:b, None, :].expand(c, r, h, m)
    empty = img.empty[:, a:b, None, :]
    # + 1 for a pair without images (no log 0), whose real sum is then 0:
    total = expo.new_zeros(c, r, h, s + 1).scatter_add(-1, index, expo)[..., :s] + empty
    alpha_real = (g[..., None] * img.nearest[:, a:b, None, :] + total.log()).masked_fill(empty, float("-inf"))
    t = gate_logit[:, a:b, :, None]
    real_part = F.logsigmoid(t) + alpha_real  # log(g·exp α_real)
    alpha = torch.logaddexp(real_part, F.logsigmoid(-t) + log_lattice_sum(sigma2[:, a:b], block, floor, a))
    logits = logits + alpha
    if block.padding:
        logits = logits.masked_fill(~block.atom_mask[:, None, None, :], float("-inf"))
    attn = logits.softmax(-1)
    values = torch.einsum("cihj,cjhd->cihd", attn, v)
    real_attn = attn * torch.exp(real_part - alpha)  # a_ij · g e^α_real / e^α
    fraction = real_attn.sum(-1).detach()
    if img.rbf is None:
        return values, None, fraction
    # slot weights a_ij·(g e^α_real / e^α)·π_ij(n), π = exp(γ d²_n − α_real)
    slot_weight = F.pad(real_attn / total, (0, 1)).gather(-1, index) * expo  # the extra column: 0 on padding slots
    return values, img.bases(a, b).contract(slot_weight.view(c * r, h, m)).view(c, r, h, -1), fraction


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
    rest reciprocal (without β); 'routed': every head's exp(α) is g·exp(α^real) +
    (1 − g)·exp(α^recip), a narrow and a wide Gaussian mixed, with one softmax over the atoms
    j and β from the real-space images (``routed_attention``); the gate
    g = sigmoid(τ·(q_i·u_h + c_h)) is learned per head and
    atom (u = c = 0 at start: an even mix; τ = ``config.route_temperature``); 'real': the
    plain real-space layer. The frozen standardisation that gives ρ is shared by all heads
    of the layer: real-space widths σ = r0/√ρ, reciprocal ones s·√ρ.
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
            self.gate_weight = nn.Parameter(torch.zeros(h, self.d_head))
            self.gate_bias = nn.Parameter(torch.zeros(h))
            self.route_temperature = config.route_temperature

    def route_logit(self, q: torch.Tensor) -> torch.Tensor:
        """τ·(q_i·u_h + c_h) per atom and head (N, H), routed layers only: the gate's logit."""
        return self.route_temperature * ((q * self.gate_weight).sum(-1) + self.gate_bias)

    def route(self, q: torch.Tensor) -> torch.Tensor:
        """Weight g of the real-space lattice sum per atom and head (N, H), routed layers only."""
        return torch.sigmoid(self.route_logit(q))

    def routed(self, q, k, v, rho, geom: SpaceGeometry):
        """``routed_attention`` of this layer's heads."""
        return routed_attention(q, k, v, -rho / (2 * self.r0**2), self.reciprocal_scale**2 * rho,
                                self.route_logit(q), geom.reciprocal, geom.images)

    def routing(self, x: torch.Tensor, geom: SpaceGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """What a routed layer does with its input x (N, d): the gate g (N, H) and the share of
        each head's attention carried by its real-space component (N, H), which also depends
        on how the two lattice sums compare (1: a real-space head, 0: a reciprocal one).
        Not used by ``forward``; for looking inside a trained model."""
        q, k, v = self._project(x)
        return self.route(q), self.routed(q, k, v, self.rho(q), geom)[2]

    def forward(self, x: torch.Tensor, geom: SpaceGeometry) -> torch.Tensor:
        """x (N, d) → (N, d)."""
        n, hr = x.shape[0], self.real_heads
        q, k, v = self._project(x)  # (N, H, dh) each
        rho = self.rho(q)  # (N, H)
        if self.kind == "routed":
            values, mixed, _ = self.routed(q, k, v, rho, geom)
            return self.out_proj(self.with_edges(values, mixed).reshape(n, -1))
        if hr:
            gamma = -rho[:, :hr] / (2 * self.r0**2)
            # no slice for a layer of real heads only: a slice's backward is a zero fill and a copy
            heads = [t if hr == t.shape[1] else t[:, :hr].contiguous() for t in (q, k, v, gamma)]
            real = self.real_values(*heads, geom.real)
        if self.kind == "real":
            return self.out_proj(real.reshape(n, -1))
        qr, kr, vr, rhor = (t[:, hr:] for t in (q, k, v, rho))
        reci = reciprocal_attention(qr, kr, vr, self.reciprocal_scale**2 * rhor, geom.reciprocal)
        values = torch.cat([real, reci], 1) if hr else reci
        return self.out_proj(values.reshape(n, -1))


def attention_for(config: ModelConfig, layer: int) -> nn.Module:
    """The attention module of block ``layer``: the plain real-space layer in the real domain."""
    if config.domain == "real":
        return PeriodicAttention(config)
    return MixedSpaceAttention(config, layer)


def uses_real_window(config: ModelConfig) -> bool:
    """Whether some layer runs the real heads' softmax over window images (routed layers
    take the window per pair instead: ``pair_images``)."""
    return any(layer_kind(config, layer) in ("real", "dual") for layer in range(config.n_blocks))
