"""Pseudo-finite periodic attention, computed over the geometry-only window.

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
pair, the paper's intermediate quantities, for tests and inspection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .linear import Linear


@dataclass
class WindowGeometry:
    """What every layer needs from the window; computed once per batch by the model.

    The padded (N, M) tensors describe the window. ``layout`` (made by ``row_layout``)
    regroups the query atoms by window size for the torch path and, in the model, carries
    the per-group distances and radial bases; without one the torch path makes it. The
    (N, M, K) ``basis`` is only formed for the Triton kernels (and tests); otherwise bases
    come from the layout or from ``rbf``.
    """

    d2: torch.Tensor  # (N, M) squared image distances, Å²
    basis: torch.Tensor | None  # (N, M, K) Gaussian RBFs of the distance, or None
    mask: torch.Tensor  # (N, M) bool, real image slots
    neighbor: torch.Tensor  # (N, M) long, atom j of each slot
    pair: torch.Tensor  # (N, M) long, pair of each slot
    pair_i: torch.Tensor  # (P,) long, sorted
    pair_j: torch.Tensor  # (P,) long
    rbf: GaussianBasis | None = None  # makes the bases on demand when ``basis`` is None
    layout: RowLayout | None = None
    crystal: torch.Tensor | None = None  # (N,) long, crystal of each atom (lets the torch path use CrystalBlocks)

    def basis_rows(self, a: int, b: int) -> torch.Tensor | None:
        """RBFs of query atoms a..b-1, (b-a, M, K); None when the model has K = 0."""
        if self.basis is not None:
            return self.basis[a:b]
        return self.rbf(self.d2[a:b]) if self.rbf is not None else None


@dataclass
class RowGroup:
    """Query atoms of similar window size, padded only to the longest of them.

    Each slot indexes the pair (i, j) it belongs to: with ``pair``, a row of the chunk's
    (Pc, H) pair list; with ``blocks`` (the chunk's ``CrystalBlocks``), entry (i, j) of
    its crystal's (H, S, S) score matrix. Padded slots point one past the end, at an
    extra entry whose logit is −inf, so no mask is applied per layer.
    """

    start: int  # rows start..stop-1 of the chunk
    stop: int
    d2: torch.Tensor  # (n, m)
    pair: torch.Tensor  # (n, m) long: chunk pair of each slot (Pc on padding); with blocks, position
    # of the slot's atom j in its crystal (−1 on padding)
    basis: BandedBasis | None = None  # when precomputed
    blocks: CrystalBlocks | None = None
    row_base: torch.Tensor | None = None  # (n,) with blocks: one-head score entry of the row's crystal
    row_stride: torch.Tensor | None = None  # (n,) with blocks: S of the row's crystal
    row_offset: torch.Tensor | None = None  # (n,) with blocks: i·S, i the row's place in its crystal
    _flat: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def flat_index(self, heads: int) -> torch.Tensor:
        """(n, H, m) index into the chunk's flattened scores (made once per H)."""
        if heads not in self._flat:
            h = torch.arange(heads, device=self.pair.device)
            if self.blocks is None:
                self._flat[heads] = self.pair[:, None, :] * heads + h[None, :, None]
            else:
                # Crystal c's scores are (H, S, S), starting at H × its one-head entry.
                s = self.row_stride[:, None, None]
                base = heads * self.row_base[:, None, None] + (self.row_offset[:, None, None] + h[None, :, None] * s * s)
                index = base + self.pair[:, None, :]
                self._flat[heads] = torch.where(self.pair[:, None, :] < 0, heads * self.blocks.entries, index)
        return self._flat[heads]


#: Slot ranges per row group for ``BandedBasis``: each range only needs the radial bases
#: that are nonzero somewhere in it (about half of the (n, m, K) entries on MP batches).
#: Groups of fewer than BAND_MIN_SLOTS slots (a few small crystals) keep one range: there
#: the operation count, not the arithmetic, sets the time.
BAND_PARTS = 4
BAND_MIN_SLOTS = 1 << 14


@dataclass
class BandedBasis:
    """The radial bases of a row group, (n, m, K), stored as the bands that are nonzero.

    Slots of a row are sorted by distance (``geometry.build_window``), so a range of slot
    positions spans a narrow range of distances across the group's rows, and the Gaussian of
    centre c_k is exactly 0 (``GaussianBasis``'s threshold) outside |d − c_k| < ~7.75 widths:
    range p0..p1 stores only the bases k0..k1−1 that are not 0 for some slot in it.
    ``contract`` gives the same Σ_slots w·b(d) as one (n, H, m) @ (n, m, K) product, without
    reading (or making) the zeros.
    """

    parts: list[tuple[int, int, int, int, torch.Tensor]]  # p0, p1, k0, k1, (n, p1−p0, k1−k0)
    n_rbf: int

    @classmethod
    def make(cls, rbf: GaussianBasis, d2: torch.Tensor, mask: torch.Tensor) -> BandedBasis:
        """Bases of the slots (n, m) with squared distances d2; ``mask`` the real slots (the
        bands are sized from these; padded slots get finite values in them)."""
        n, m = d2.shape
        pieces = BAND_PARTS if n * m >= BAND_MIN_SLOTS else 1
        edges = sorted({round(m * t / pieces) for t in range(pieces + 1)})
        d = d2.detach().clamp_min(0).sqrt()
        lows = torch.where(mask, d, float("inf")).amin(0).tolist() if n else [math.inf] * m  # per slot position
        highs = torch.where(mask, d, float("-inf")).amax(0).tolist() if n else [-math.inf] * m
        parts = []
        for a, b in zip(edges, edges[1:]):
            low, high = min(lows[a:b]), max(highs[a:b])
            if high < low:  # padding only: no weight ever reaches these slots
                continue
            k0, k1 = rbf.band(low, high, d2.dtype)
            parts.append((a, b, k0, k1, rbf(d2[:, a:b], k0, k1)))
        return cls(parts, len(rbf.centers))

    def contract(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_slots weights·b(d), (n, H, K), from weights (n, H, m)."""
        # One split rather than a slice per range: under autograd each slice's backward
        # writes a zero-filled (n, H, m) gradient and they are summed; split's is one cat.
        bounds = sorted({0, weights.shape[2], *(x for part in self.parts for x in part[:2])})
        pieces = torch.split(weights, [b - a for a, b in zip(bounds, bounds[1:])], dim=2)
        start = dict(zip(bounds, pieces))
        out = [F.pad(torch.bmm(start[a], basis), (k0, self.n_rbf - k1))
               for a, b, k0, k1, basis in self.parts]
        if not out:
            return weights.new_zeros(weights.shape[0], weights.shape[1], self.n_rbf)
        return out[0] if len(out) == 1 else torch.stack(out).sum(0)


@dataclass
class CrystalBlocks:
    """The chunk's crystals as dense blocks: crystals of similar size padded to a common S.

    With all pairs (i, j) of a crystal present, as in every cell that fits in the window
    a few times, one (H, S, S) matmul per block gives every q_i·k_j, and one more every
    Σ_j a_ij v_j, which costs far less than gathering q and k for each pair separately.
    Atoms are laid out block by block, crystal by crystal, in ``C_b·S_b`` slots per block.
    """

    sizes: list[int]  # S_b
    counts: list[int]  # C_b
    slot: torch.Tensor | None  # (N,) long, slot of each atom; None when slots are the atoms in order
    row_slot: torch.Tensor | None  # (n_c,) long, slot of each chunk row; None when the same as the rows
    position: torch.Tensor  # (N,) long, each atom's place in its crystal
    size_of: torch.Tensor  # (B,) long, S of each crystal's block
    entry_of: torch.Tensor  # (B,) long, one-head score entry of each crystal's (0, 0)

    @property
    def entries(self) -> int:
        """Score entries per head, Σ_b C_b·S_b²."""
        return sum(c * s * s for c, s in zip(self.counts, self.sizes, strict=True))

    def padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-atom x (N, H, d) as one (C_b, H, S_b, d) tensor per block (zeros on padding)."""
        if self.slot is not None:
            total = sum(c * s for c, s in zip(self.counts, self.sizes, strict=True))
            x = x.new_zeros(total, *x.shape[1:]).index_copy(0, self.slot, x)
        out, a = [], 0
        for c, s in zip(self.counts, self.sizes, strict=True):
            out.append(x[a : a + c * s].view(c, s, *x.shape[1:]).transpose(1, 2))
            a += c * s
        return out

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q_i·k_j/√dh of every pair in every block, flattened, + a −inf entry at the end."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        parts = [torch.matmul(qb * scale, kb.transpose(-1, -2)).reshape(-1)
                 for qb, kb in zip(self.padded(q), self.padded(k), strict=True)]
        return torch.cat([*parts, q.new_full((1,), float("-inf"))])

    def values(self, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Σ_j a_ij v_j (n_c, H, dh) of the chunk rows, from the flattened pair weights."""
        heads, out, e = v.shape[1], [], 0
        for c, s, vb in zip(self.counts, self.sizes, self.padded(v), strict=True):
            a = weight[e : e + c * heads * s * s].view(c, heads, s, s)
            out.append(torch.matmul(a, vb).transpose(1, 2).reshape(c * s, heads, -1))
            e += c * heads * s * s
        x = out[0] if len(out) == 1 else torch.cat(out)
        return x if self.row_slot is None else x.index_select(0, self.row_slot)


@dataclass
class RowChunk:
    """Query atoms handled at once (one checkpointed unit under autograd) and their pairs."""

    rows: torch.Tensor  # (n_c,) long, the atoms, longest windows first
    pair_i: torch.Tensor | None  # (Pc,) long, atom i of each pair of these rows (None with blocks)
    pair_j: torch.Tensor | None  # (Pc,) long
    pair_row: torch.Tensor | None  # (Pc,) long, position of pair_i in ``rows``
    groups: list[RowGroup]
    blocks: CrystalBlocks | None = None


@dataclass
class RowLayout:
    """The window's query atoms sorted by window size, in chunks and groups.

    Padding every atom to the longest window of the batch wastes more than half of the
    slots of a typical batch; each group is padded only to its own longest window.
    """

    chunks: list[RowChunk]
    inverse: torch.Tensor | None  # (N,) long: row of atom i in the chunks; None if in order


#: Rows are grouped while their windows are at least this fraction of the group's first,
#: and a group has at least GROUP_ROWS rows (fewer, larger operations for small inputs).
GROUP_FILL = 0.85
GROUP_ROWS = 32


def row_layout(
    d2: torch.Tensor,
    mask: torch.Tensor,
    pair: torch.Tensor,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    max_slots: int | None = None,
    rbf: GaussianBasis | None = None,
    crystal: torch.Tensor | None = None,
    neighbor: torch.Tensor | None = None,
) -> RowLayout:
    """Sort query atoms by window size; chunks of at most ``max_slots`` padded slots
    (``PAIR_SLOTS`` where the pair lists are used).

    With ``rbf`` the groups' bases are made here, once for all layers. With ``crystal``
    and ``neighbor`` (atom j of each slot), a window in one chunk whose crystals are dense
    in pairs gets ``CrystalBlocks``.
    """
    n, m = mask.shape
    device = mask.device
    budget = max(max_slots or MAX_SLOTS, 1)
    slots = torch.arange(1, m + 1, device=device)
    width = (mask * slots).amax(1) if m else mask.new_zeros(n, dtype=torch.long)  # (N,)
    widths = width.tolist()
    in_order = n <= GROUP_ROWS or min(widths) >= GROUP_FILL * max(widths)  # one group: no sorting
    if in_order:
        order = torch.arange(n, device=device)
    else:
        order = torch.argsort(width, descending=True, stable=True)
        widths = width[order].tolist()

    def bounds(budget: int) -> list[tuple[int, int]]:
        out, a = [], 0
        while a < n:
            b = a + max(1, budget // max(max(widths) if in_order else widths[a], 1))
            out.append((a, min(b, n)))
            a = b
        return out

    chunk_bounds, blocks = bounds(budget), None
    if crystal is not None and neighbor is not None and len(chunk_bounds) == 1:
        blocks = _crystal_blocks(crystal, len(pair_i), None if in_order else order)
    if blocks is not None:
        chunks = [_block_chunk(d2, mask, neighbor, crystal, order, widths, blocks, rbf)]
    else:
        if budget > PAIR_SLOTS:
            chunk_bounds = bounds(PAIR_SLOTS)
        counts = torch.bincount(pair_i, minlength=n)  # pairs of each atom (sorted by i)
        starts = torch.cumsum(counts, 0) - counts
        chunks = [_row_chunk(d2, mask, pair, pair_i, pair_j, order[a:b], widths[a:b], counts, starts, rbf)
                  for a, b in chunk_bounds]
    if in_order:
        inverse = None
    else:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=device)
    return RowLayout(chunks, inverse)


def _groups(widths: list[int]) -> list[tuple[int, int, int]]:
    """(start, stop, width) of each row group of rows sorted by window size."""
    groups, s = [], 0
    while s < len(widths):
        e = s + 1
        while e < len(widths) and (e - s < GROUP_ROWS or widths[e] >= GROUP_FILL * widths[s]):
            e += 1
        groups.append((s, e, max(max(widths[s:e]), 1)))
        s = e
    return groups


def _row_chunk(
    d2: torch.Tensor,
    mask: torch.Tensor,
    pair: torch.Tensor,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    rows: torch.Tensor,
    widths: list[int],
    counts: torch.Tensor,
    starts: torch.Tensor,
    rbf: GaussianBasis | None,
) -> RowChunk:
    """The chunk of ``rows`` (sorted by window size, ``widths``): its pairs and groups."""
    device = rows.device
    count = counts[rows]  # (n_c,) pairs per row
    local = torch.cumsum(count, 0) - count  # first chunk pair of each row
    n_pairs = int(count.sum())
    ids = torch.repeat_interleave(starts[rows] - local, count) + torch.arange(n_pairs, device=device)
    pair_row = torch.repeat_interleave(torch.arange(len(rows), device=device), count)
    groups = []
    for s, e, w in _groups(widths):
        r = rows[s:e]
        local_pair = pair[r, :w] - (starts[r] - local[s:e])[:, None]
        local_pair = torch.where(mask[r, :w], local_pair, n_pairs)
        g2 = d2[r, :w]
        groups.append(RowGroup(s, e, g2, local_pair,
                               BandedBasis.make(rbf, g2, mask[r, :w]) if rbf is not None else None))
    return RowChunk(rows, pair_i[ids], pair_j[ids], pair_row, groups)


#: Crystals share a block while their size is at least this fraction of the block's
#: largest (each block's S² then wastes at most ~1.8×), and blocks are used while their
#: score entries are at most BLOCK_ENTRIES_PER_PAIR × the pairs (+ BLOCK_ENTRIES_FREE):
#: large cells, whose atoms see only part of the cell, keep the pair list.
BLOCK_FILL = 0.75
BLOCK_ENTRIES_PER_PAIR = 4
BLOCK_ENTRIES_FREE = 4096


def _crystal_blocks(crystal: torch.Tensor, n_pairs: int, rows: torch.Tensor | None) -> CrystalBlocks | None:
    """Crystals in blocks of similar size (None when too sparse in pairs); ``rows``: the
    chunk's rows when not the atoms in order."""
    device = crystal.device
    n_atoms = torch.bincount(crystal)
    atoms_of = n_atoms.tolist()
    sizes: list[int] = []
    counts: list[int] = []
    size_of, slot_of, entry_of = [0] * len(atoms_of), [0] * len(atoms_of), [0] * len(atoms_of)
    slots = entries = 0
    order = sorted(range(len(atoms_of)), key=lambda c: -atoms_of[c])  # stable: ties in order
    for c in order:
        if not sizes or atoms_of[c] < BLOCK_FILL * sizes[-1]:
            sizes.append(atoms_of[c])
            counts.append(0)
        counts[-1] += 1
        size_of[c], slot_of[c], entry_of[c] = sizes[-1], slots, entries
        slots += sizes[-1]
        entries += sizes[-1] ** 2
    if entries > BLOCK_ENTRIES_PER_PAIR * n_pairs + BLOCK_ENTRIES_FREE:
        return None
    start = torch.cumsum(n_atoms, 0) - n_atoms
    position = torch.arange(len(crystal), device=device) - start[crystal]  # atom's place in its crystal
    slot = None
    if order != sorted(order) or size_of != atoms_of:  # otherwise slots are the atoms in order
        slot = torch.tensor(slot_of, device=device)[crystal] + position
    row_slot = slot if rows is None else rows if slot is None else slot[rows]
    return CrystalBlocks(sizes, counts, slot, row_slot, position,
                         torch.tensor(size_of, device=device), torch.tensor(entry_of, device=device))


def _block_chunk(
    d2: torch.Tensor,
    mask: torch.Tensor,
    neighbor: torch.Tensor,
    crystal: torch.Tensor,
    rows: torch.Tensor,
    widths: list[int],
    blocks: CrystalBlocks,
    rbf: GaussianBasis | None,
) -> RowChunk:
    """The one chunk of a window with ``blocks``: each slot indexes its (i, j) block entry."""
    groups = []
    for s, e, w in _groups(widths):
        r = rows[s:e]
        c = crystal[r]
        j = torch.where(mask[r, :w], blocks.position[neighbor[r, :w]], -1)
        stride = blocks.size_of[c]
        g2 = d2[r, :w]
        groups.append(RowGroup(s, e, g2, j, BandedBasis.make(rbf, g2, mask[r, :w]) if rbf is not None else None, blocks,
                               blocks.entry_of[c], stride, blocks.position[r] * stride))
    return RowChunk(rows, None, None, None, groups, blocks)


class GaussianBasis(nn.Module):
    """K Gaussians of the distance, centred at k·r_max/K (k = 1..K) with width r_max/K.

    Entries below e^-30 (float32; e^-80 in float64) are set to exactly 0: they are below
    the precision of every sum they enter (each row also holds an entry ≥ e^-1/2), and
    tiny but nonzero values made the products of backward denormal, which x86 CPUs compute
    many times slower. The bases are formed in place in one buffer, and their first and
    second derivatives in d are written out (``_Gaussians``) instead of recorded op by op:
    forces and force training need both, and autograd's chain over seven (…, K) operations
    cost several times more.
    """

    def __init__(self, n_rbf: int, r_max: float) -> None:
        super().__init__()
        self.width = r_max / n_rbf
        self.register_buffer(
            "centers", torch.arange(1, n_rbf + 1, dtype=torch.float64) * self.width, persistent=False
        )

    def forward(self, d2: torch.Tensor, k0: int = 0, k1: int | None = None) -> torch.Tensor:
        """Bases k0..k1−1 (all by default) of the distances √d2, (…, k1−k0)."""
        # sqrt'(0) is infinite: the self image has d² ≡ 0 with a zero gradient, so clamping
        # keeps its value (b(1e-15) = b(0) in any precision) and gives a zero, not NaN, gradient.
        d = d2.clamp_min(1e-30).sqrt()
        centers = self.centers[k0:k1].to(d.dtype)
        if torch.is_grad_enabled() and d.requires_grad:
            return _Gaussians.apply(d, centers, self.width)
        return _gaussians(d, centers, self.width)

    def band(self, low: float, high: float, dtype: torch.dtype) -> tuple[int, int]:
        """k0, k1 such that every basis outside k0..k1−1 is exactly 0 (below the threshold
        of ``_gaussians`` in ``dtype``) at every distance in [low, high] Å."""
        # exp(−z²/2) < tiny for |z| ≥ √(−2 log tiny); a little more for rounding
        reach = math.sqrt(-2 * math.log(_tiny(dtype))) * self.width + 1e-6 * max(high, 1.0)
        k0 = max(0, math.floor((low - reach) / self.width) - 1)
        k1 = min(len(self.centers), math.ceil((high + reach) / self.width))
        return k0, max(k0, k1)


def _tiny(dtype: torch.dtype) -> float:
    """Below this, basis entries and attention weights are set to 0 (denormal-free products)."""
    return 2.0 * math.exp(-(80.0 if dtype == torch.float64 else 30.0))


def _gaussians(d: torch.Tensor, centers: torch.Tensor, width: float) -> torch.Tensor:
    """exp(−z²/2), z = (d − c)/w, (…, K), without autograd; tiny entries exactly 0."""
    tiny = _tiny(d.dtype)
    with torch.no_grad():
        z = d[..., None] - centers
        # Clamping the exponent first keeps exp() off its slow underflow path; entries at
        # the clamp are then zeroed.
        z.div_(width)
        z.mul_(z).mul_(-0.5).clamp_min_(math.log(tiny / 2)).exp_()
        return F.threshold(z, tiny, 0.0, inplace=True)


class _Gaussians(torch.autograd.Function):
    """b(d) = exp(−(d − c)²/2w²) with b' = −(d − c)/w² · b (``_GaussiansGrad``)."""

    @staticmethod
    def forward(ctx: Any, d: torch.Tensor, centers: torch.Tensor, width: float) -> torch.Tensor:  # type: ignore[override]
        b = _gaussians(d, centers, width)
        ctx.save_for_backward(d, b)
        ctx.centers, ctx.width = centers, width
        return b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        d, b = ctx.saved_tensors
        # b enters as a constant: _GaussiansGrad's d-derivative already includes b's.
        return _GaussiansGrad.apply(d, b.detach(), grad, ctx.centers, ctx.width), None, None


class _GaussiansGrad(torch.autograd.Function):
    """Σ_k g_k b_k'(d), differentiable once more (forces → force-training gradients)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, d: torch.Tensor, b: torch.Tensor, g: torch.Tensor, centers: torch.Tensor, width: float
    ) -> torch.Tensor:
        ctx.save_for_backward(d, b, g)
        ctx.centers, ctx.width = centers, width
        t = d[..., None] - centers  # (…, K)
        return t.mul_(b).mul_(g).sum(-1).mul_(-1.0 / width**2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        d, b, g = ctx.saved_tensors
        w2 = ctx.width**2
        t = d[..., None] - ctx.centers  # (…, K)
        grad_d = grad_g = None
        if ctx.needs_input_grad[2]:  # ∂/∂g = b'(d)
            grad_g = (t * b).mul_(gg[..., None] * (-1.0 / w2))
        if ctx.needs_input_grad[0]:  # ∂/∂d = Σ_k g_k b_k''(d), b'' = ((d − c)²/w² − 1)·b/w²
            t.mul_(t).div_(w2).sub_(1.0).mul_(b).mul_(g)
            grad_d = t.sum(-1).mul_(gg / w2)
        return grad_d, None, grad_g, None, None


class PeriodicAttention(nn.Module):
    """One multi-head periodic attention layer with per-atom, per-head Gaussian widths."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h, dh = config.d_model, config.n_heads, config.d_head
        self.n_heads, self.d_head = h, dh
        self.r0 = config.r0
        self.rho_lower_bound = config.rho_lower_bound
        self.rho_slope = config.rho_slope
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)
        self.sigma_weight = nn.Parameter(torch.empty(h, dh))  # w: s = q·w sets each atom's σ
        self.rbf_proj = nn.Parameter(torch.empty(h, dh, config.n_rbf)) if config.n_rbf else None
        # Frozen standardisation of s = q·w: set from the first training batch,
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
        return self.with_edges(*window_attention(q, k, v, gamma, geom))

    def with_edges(self, values: torch.Tensor, mixed: torch.Tensor | None) -> torch.Tensor:
        """Σ_j a_ij v_j (N, h, dh) plus Σ_j a_ij β_ij = W_E Σ_images weight·b(d), from the
        weighted radial bases ``mixed`` (N, h, K) (None without bases)."""
        if self.rbf_proj is None:
            return values
        beta = torch.bmm(mixed.transpose(0, 1), self.rbf_proj.transpose(1, 2))  # (h, N, K) @ (h, K, dh)
        return values + beta.transpose(0, 1)

    def encodings(
        self, x: torch.Tensor, geom: WindowGeometry
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The paper's periodic encodings per pair: α (P, H) and β (P, H, dh) (None if K = 0).

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


#: Image slots handled at once by the torch path; large windows are split into row chunks
#: so that the chunk's (rows, M, K) radial bases stay below ~0.25 GiB in float32 whatever
#: the cell size. Windows with more slots get no precomputed bases.
MAX_SLOTS = 1 << 20
#: Slots per chunk where the pair lists are used (large cells): each per-pair gather
#: (P, H, dh) is about as large as the chunk's slots × d, so these chunks are smaller.
#: 2¹⁴ rather than 2¹⁶: peak RSS of energy + forces + stress on 2k–7k-atom cells fell
#: 1.3–2.2× under glibc's default malloc at no cost in time (docs/benchmarks.md).
PAIR_SLOTS = 1 << 14


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
    The one place that picks the path: on CUDA with triton installed the fused kernels of
    ``triton_attention`` run; everywhere else, and if they fail to compile or launch
    (one ``RuntimeWarning``, then the torch path for the rest of the process),
    ``torch_window_attention``, their reference.
    """
    from . import triton_attention  # lazy: cheap, and imports nothing of this package

    if triton_attention.available(q, k, v, gamma, geom.d2):
        try:
            return triton_attention.window_attention(q, k, v, gamma, geom, reference=torch_window_attention)
        except Exception as error:
            triton_attention.give_up(error)
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

    Query atoms run sorted by window size, in chunks of at most ``max_slots`` padded slots
    (default ``MAX_SLOTS``; a given ``max_slots`` makes a fresh layout). Under autograd
    several chunks are checkpointed: their gathers are recomputed in backward rather than
    kept, so forces and force training on a large cell hold one chunk's intermediates at a
    time instead of all of them. Logits are laid out (rows, H, slots), so that the softmax
    runs over contiguous memory and feeds the basis matmul without a transpose.
    """
    layout = geom.layout if max_slots is None else None
    if layout is None:
        layout = row_layout(geom.d2, geom.mask, geom.pair, geom.pair_i, geom.pair_j, max_slots,
                            crystal=geom.crystal, neighbor=geom.neighbor)
    basis = geom.basis
    run = partial(_chunk_attention, q, k, v, gamma, basis=basis, rbf=geom.rbf)
    if len(layout.chunks) > 1 and torch.is_grad_enabled():
        run = partial(checkpoint, run, use_reentrant=False)
    parts = [run(c) for c in layout.chunks]
    values = _unsort([p[0] for p in parts], layout.inverse)
    mixed = _unsort([p[1] for p in parts], layout.inverse) if parts[0][1] is not None else None
    return values, mixed


def _unsort(parts: list[torch.Tensor], inverse: torch.Tensor | None) -> torch.Tensor:
    """The chunks' rows, concatenated, back in the atoms' order."""
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    return x if inverse is None else x.index_select(0, inverse)


def _chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    chunk: RowChunk,
    basis: torch.Tensor | None,
    rbf: GaussianBasis | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``window_attention`` for the rows of one chunk, in chunk order."""
    h, dh = q.shape[1], q.shape[2]
    if chunk.blocks is not None:
        qk = chunk.blocks.scores(q, k)  # (H·entries + 1,)
    else:
        qk = (q.index_select(0, chunk.pair_i) * k.index_select(0, chunk.pair_j)).sum(-1) / math.sqrt(dh)  # (Pc, H)
        qk = torch.cat([qk, qk.new_full((1, h), float("-inf"))]).view(-1)  # + the padding pair
    pair_weight = torch.zeros_like(qk)  # Σ_n weights = a_ij, laid out as qk
    gamma = gamma.index_select(0, chunk.rows)
    mixed = []
    for g in chunk.groups:
        index = g.flat_index(h)  # (n, H, m)
        logits = torch.addcmul(
            qk.gather(0, index.view(-1)).view(index.shape), gamma[g.start : g.stop, :, None], g.d2[:, None, :]
        )
        # (n, H, m): a_ij·π_ij(n); weights below e^-30 (e^-80 in float64) are zeroed for the
        # same reason as the bases' tiny entries (they sum to 1, so this is below round-off).
        weights = F.threshold(
            logits.softmax(dim=-1), _tiny(logits.dtype), 0.0, inplace=not torch.is_grad_enabled()
        )
        pair_weight = pair_weight.scatter_add(0, index.view(-1), weights.view(-1))
        if g.basis is not None:
            mixed.append(g.basis.contract(weights))  # (n, H, K)
        elif basis is not None:  # one whole (N, M, K) basis was given
            mixed.append(torch.bmm(weights, basis[chunk.rows[g.start : g.stop], : g.d2.shape[1]]))
        elif rbf is not None:  # a window too large to keep its bases: made per chunk
            real = g.pair >= 0 if chunk.blocks is not None else g.pair < len(chunk.pair_i)
            mixed.append(BandedBasis.make(rbf, g.d2, real).contract(weights))
    mixed_out = (mixed[0] if len(mixed) == 1 else torch.cat(mixed)) if mixed else None
    if chunk.blocks is not None:
        return chunk.blocks.values(pair_weight, v), mixed_out
    pair_weight = pair_weight.view(-1, h)[:-1]
    values = v.new_zeros(len(chunk.rows), h, dh).index_add_(
        0, chunk.pair_row, pair_weight[..., None] * v.index_select(0, chunk.pair_j)
    )
    return values, mixed_out
