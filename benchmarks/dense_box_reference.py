"""The dense box-window Crystalformer of the original code: the baseline the benchmarks time us against.

This is the original model's computation (its "geometry-only" box window and the one-layer reference forward of
the paper's appendix) written directly in torch, with the same parameters as ``Crystalformer`` (it
*is* a ``Crystalformer`` subclass, so ``load_state_dict(model.state_dict())`` works and the
same weights can be timed both ways):

* edges are all E = Σ_c N_c² ordered atom pairs of each crystal (the original's layout);
* each crystal gets the box of images |n_l| ≤ R_l = max(ceil((c_max + 0.01)/h_l), 2),
  with h_l its lattice plane spacings and c_max = 3.5·σ_max = 6.93 Å, shared by all
  layers and heads; d² (E, W) is computed once per batch (edges grouped by box, no padding);
* per layer, α = log Σ_n exp(γ d²) and b̄ = Σ_n π(n) b(d) stream over chunks of images:
  (E, H, W_c) logits and a (E, W_c, K) RBF block per chunk, stabilised by D = min d²,
  each chunk under ``torch.utils.checkpoint`` so that nothing of size E·W·K is kept
  (``cache_basis=True`` instead computes the (E, W, K) RBFs once per batch and keeps them:
  more memory, no recomputation; the faster of the two dense variants);
* then a softmax over j of q·k/√d + α and o_i = Σ_j a_ij (v_j + W_E b̄_ij).

It differs from our model only in the window (a box instead of the cutoff sphere), so the
two agree to the weight of the images that one window has and the other has not (1e-10
relative in float64 on bulk crystals). Fully periodic crystals only (the box needs three
lattice vectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ase_crystalformer import Crystalformer, ModelConfig
from ase_crystalformer.attention import PeriodicAttention
from ase_crystalformer.geometry import Batch


@dataclass
class BoxGroup:
    """Edges of the crystals that share one box shape, and their image distances."""

    edges: torch.Tensor  # (E_g,) long, index into the batch's edge list
    d2: torch.Tensor  # (E_g, W_g) squared distances of every box image
    d2_min: torch.Tensor  # (E_g,) the stabiliser D (constant: no gradient needed)
    basis: torch.Tensor | None  # (E_g, W_g, K) RBFs when cached, else None


@dataclass
class BoxGeometry:
    edge_i: torch.Tensor  # (E,) long, query atom (edges of one i are contiguous)
    edge_j: torch.Tensor  # (E,) long
    groups: list[BoxGroup]
    n_images: int  # Σ_g E_g·W_g, the work of one periodic encoding per head


def box_ranges(cells: torch.Tensor, c_max: float, minimum: int = 2) -> torch.Tensor:
    """R_l = max(ceil((c_max + 0.01)/h_l), minimum) per crystal, (B, 3) long."""
    volume = torch.linalg.det(cells).abs()  # (B,)
    cross = torch.cross(cells.roll(-1, dims=1), cells.roll(-2, dims=1), dim=2)  # (B, 3, 3)
    spacing = volume[:, None] / cross.norm(dim=2)  # (B, 3) h_l
    return torch.ceil((c_max + 0.01) / spacing).long().clamp_min(minimum)


def box_geometry(
    batch: Batch, c_max: float, basis: torch.nn.Module | None = None
) -> BoxGeometry:
    """All-pairs edges and box-image distances of a batch (positions wrapped into the cell).

    With ``basis`` the RBFs of every box image are computed here, once for all layers.
    """
    cells = batch.cells  # (B, 3, 3) rows are lattice vectors
    cell_of_atom = cells[batch.crystal]  # (N, 3, 3)
    frac = torch.linalg.solve(cell_of_atom.transpose(1, 2), batch.positions[..., None])[..., 0]
    wrapped = torch.bmm((frac - frac.floor())[:, None, :], cell_of_atom)[:, 0]  # (N, 3)

    n = batch.n_atoms  # (B,)
    first_atom = torch.cumsum(n, 0) - n  # (B,)
    n_edges = n * n
    crystal_of_edge = torch.repeat_interleave(torch.arange(len(n), device=n.device), n_edges)
    local = torch.arange(int(n_edges.sum()), device=n.device) - (
        torch.cumsum(n_edges, 0) - n_edges
    )[crystal_of_edge]
    size = n[crystal_of_edge]
    edge_i = first_atom[crystal_of_edge] + local // size  # (E,)
    edge_j = first_atom[crystal_of_edge] + local % size  # (E,)
    r0 = wrapped[edge_j] - wrapped[edge_i]  # (E, 3)

    ranges = box_ranges(cells.detach(), c_max)  # (B, 3)
    groups, n_images = [], 0
    for box in torch.unique(ranges, dim=0):
        crystals = torch.nonzero((ranges == box).all(dim=1))[:, 0]  # crystals with this box
        axes = [torch.arange(-int(r), int(r) + 1, device=cells.device) for r in box]
        shifts = torch.cartesian_prod(*axes).to(cells.dtype)  # (W_g, 3)
        slot_of_crystal = torch.full((len(n),), -1, dtype=torch.long, device=n.device)
        slot_of_crystal[crystals] = torch.arange(len(crystals), device=n.device)
        edges = torch.nonzero(slot_of_crystal[crystal_of_edge] >= 0)[:, 0]  # (E_g,)
        translation = torch.einsum("wl,clx->cwx", shifts, cells[crystals])  # (C_g, W_g, 3)
        r = r0[edges, None, :] + translation[slot_of_crystal[crystal_of_edge[edges]]]
        d2 = (r * r).sum(-1)  # (E_g, W_g)
        rbf = basis(d2) if basis is not None else None  # (E_g, W_g, K)
        groups.append(BoxGroup(edges, d2, d2.detach().amin(dim=1), rbf))
        n_images += d2.numel()
    return BoxGeometry(edge_i, edge_j, groups, n_images)


class DenseBoxCrystalformer(Crystalformer):
    """``Crystalformer`` with the original dense box-window attention (same parameters).

    ``chunk`` is the number of box images per streamed step of the periodic encoding;
    ``cache_basis`` keeps the RBFs of all box images for the whole batch (see module doc).
    """

    def __init__(
        self, config: ModelConfig | None = None, *, chunk: int = 64, cache_basis: bool = False
    ) -> None:
        super().__init__(config)
        self.chunk = chunk
        self.cache_basis = cache_basis
        self.c_max = 3.5 * self.config.sigma_max  # 6.93 Å for the paper's r0 and b

    def atom_features(self, batch: Batch) -> torch.Tensor:
        geo = box_geometry(batch, self.c_max, self.basis if self.cache_basis else None)
        x = self.embedding(batch.numbers - 1)  # (N, d)
        for block in self.blocks:
            x = x + self._attention(block.attention, x, geo)
            x = x + block.ffn(x)
        return x

    def _image_sums(
        self,
        gamma_e: torch.Tensor,
        d2: torch.Tensor,
        d2_min: torch.Tensor,
        rbf: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """S = Σ_n exp(γ(d² − D)) (E, H) and Σ_n exp(γ(d² − D)) b(d) (E, H, K) of one chunk."""
        w = torch.exp(gamma_e[:, :, None] * (d2 - d2_min[:, None])[:, None, :])  # (E, H, W_c)
        if self.basis is None:
            return w.sum(-1), None
        rbf = self.basis(d2) if rbf is None else rbf  # (E, W_c, K)
        return w.sum(-1), torch.bmm(w, rbf)  # (E, H), (E, H, W_c)@(E, W_c, K)

    def _encodings(
        self, gamma: torch.Tensor, geo: BoxGeometry
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """α (E, H) and b̄ (E, H, K) over each edge's box, streamed in chunks of images."""
        n_edges, h = len(geo.edge_i), gamma.shape[1]
        k = self.config.n_rbf
        alpha = gamma.new_zeros(n_edges, h)
        mean_basis = gamma.new_zeros(n_edges, h, k) if k else None
        gamma_edge = gamma[geo.edge_i]  # (E, H)
        for group in geo.groups:
            g = gamma_edge[group.edges]  # (E_g, H)
            total = g.new_zeros(g.shape)
            weighted = g.new_zeros(*g.shape, k) if k else None
            for start in range(0, group.d2.shape[1], self.chunk):
                d2 = group.d2[:, start : start + self.chunk]  # (E_g, W_c)
                if group.basis is not None:
                    rbf = group.basis[:, start : start + self.chunk]  # (E_g, W_c, K)
                    s, sb = self._image_sums(g, d2, group.d2_min, rbf)
                elif torch.is_grad_enabled():
                    s, sb = checkpoint(self._image_sums, g, d2, group.d2_min, use_reentrant=False)
                else:
                    s, sb = self._image_sums(g, d2, group.d2_min)
                total = total + s
                if k:
                    weighted = weighted + sb
            alpha = alpha.index_copy(0, group.edges, g * group.d2_min[:, None] + total.log())
            if k:
                mean_basis = mean_basis.index_copy(0, group.edges, weighted / total[..., None])
        return alpha, mean_basis

    def _attention(self, attn: PeriodicAttention, x: torch.Tensor, geo: BoxGeometry) -> torch.Tensor:
        """One periodic attention layer as in Appendix B; x (N, d) → (N, d)."""
        n = x.shape[0]
        q, k, v = attn._project(x)  # (N, H, dh)
        alpha, mean_basis = self._encodings(attn.gamma(q), geo)  # (E, H), (E, H, K)
        i, j = geo.edge_i, geo.edge_j
        logits = (q[i] * k[j]).sum(-1) / math.sqrt(attn.d_head) + alpha  # (E, H)
        index = i[:, None].expand_as(logits)
        peak = logits.new_full((n, attn.n_heads), float("-inf"))
        peak = peak.scatter_reduce(0, index, logits.detach(), "amax")  # (N, H)
        expo = torch.exp(logits - peak[i])  # (E, H)
        weights = expo / expo.new_zeros(n, attn.n_heads).index_add_(0, i, expo)[i]  # a_ij
        values = v[j]  # (E, H, dh)
        if mean_basis is not None:
            values = values + torch.einsum("ehk,hdk->ehd", mean_basis, attn.rbf_proj)  # + β
        out = values.new_zeros(n, attn.n_heads, attn.d_head).index_add_(
            0, i, weights[..., None] * values
        )
        return attn.out_proj(out.reshape(n, -1))
