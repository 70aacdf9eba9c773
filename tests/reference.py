"""Brute-force float64 reference of Crystalformer: every image in a very large box.

Written straight from the spec (Appendix B): α and β per pair over all images n of a box
that covers a sphere much larger than any Gaussian can reach, then the pair softmax.
Deliberately slow and obvious; the package's fast path must agree with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from ase import Atoms

from ase_crystalformer.attention import PeriodicAttention
from ase_crystalformer.model import Crystalformer
from ase_crystalformer.reciprocal import MixedSpaceAttention


def box_images(atoms: Atoms, radius: float) -> torch.Tensor:
    """All integer n with |n_l| ≤ ceil(radius/h_l) + 1 on periodic axes (W, 3)."""
    cell = np.asarray(atoms.cell)
    recip = np.linalg.pinv(cell).T  # rows b_l / 2π (pinv: zero vectors on open axes)
    ranges = []
    for axis in range(3):
        if atoms.pbc[axis]:
            r = math.ceil(radius * np.linalg.norm(recip[axis])) + 1
            ranges.append(torch.arange(-r, r + 1, dtype=torch.float64))
        else:
            ranges.append(torch.zeros(1, dtype=torch.float64))
    return torch.cartesian_prod(*ranges)


def reference_attention(
    attn: PeriodicAttention,
    x: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    images: torch.Tensor,
    extra_distance: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Layer output (N, d), α (N, N, H) and β (N, N, H, dh) for one crystal.

    ``extra_distance`` (N, N, W) is added to d² in the Gaussian only: 1e6 there removes an
    image, which lets the tests restrict the reference to the package's window.
    """
    n = x.shape[0]
    q, k, v = _projections(attn, x)
    d2 = _image_d2(positions, cell, images) + extra_distance
    out, alpha, beta = _heads(q, k, v, attn.gamma(q), d2, attn.rbf_proj)
    return attn.out_proj(out.reshape(n, -1)), alpha, beta


def _projections(attn, x):
    n, h, dh = x.shape[0], attn.n_heads, attn.d_head
    return (attn.q_proj(x).view(n, h, dh), attn.k_proj(x).view(n, h, dh), attn.v_proj(x).view(n, h, dh))


def _image_d2(positions, cell, images):
    r = positions[None, :, None, :] - positions[:, None, None, :] + (images @ cell)[None, None]  # (N, N, W, 3)
    return (r * r).sum(-1)  # (N, N, W)


def _heads(q, k, v, gamma, d2, rbf_proj):
    """Head outputs (N, h, dh), α (N, N, h), β: attention with α = log Σ_W exp(γ_i d²)."""
    n, h, dh = q.shape
    logits = gamma[:, None, None, :] * d2[..., None]  # (N, N, W, H)
    alpha = torch.logsumexp(logits, dim=2)  # (N, N, H)
    beta = None
    values = v[None].expand(n, n, h, dh)  # (N, N, H, dh) v_j
    if rbf_proj is not None:
        pi = torch.exp(logits - alpha[:, :, None, :])  # (N, N, W, H)
        k_rbf = rbf_proj.shape[-1]
        width = 14.0 / k_rbf
        centers = torch.arange(1, k_rbf + 1, dtype=q.dtype) * width
        dist = torch.sqrt(d2.clamp_min(1e-30))
        b = torch.exp(-0.5 * ((dist[..., None] - centers) / width) ** 2)  # (N, N, W, K)
        bbar = torch.einsum("ijwh,ijwk->ijhk", pi, b)
        beta = torch.einsum("ijhk,hdk->ijhd", bbar, rbf_proj)
        values = values + beta
    score = torch.einsum("ihd,jhd->ijh", q, k) / math.sqrt(dh) + alpha  # (N, N, H)
    a = torch.softmax(score, dim=1)
    return torch.einsum("ijh,ijhd->ihd", a, values), alpha, beta


def lattice_gaussian_sum(r: torch.Tensor, cell: np.ndarray, sigma: torch.Tensor, radius: float) -> torch.Tensor:
    """Σ_n exp(−|r + nL|²/2σ²) in real space over every image of a box holding a sphere of
    ``radius`` around each r, for displacements r (..., 3) and widths σ (...)."""
    lattice = torch.as_tensor(np.asarray(cell), dtype=r.dtype)
    frac = r @ torch.linalg.inv(lattice)
    r = (frac - torch.floor(frac)) @ lattice  # the same sum; inside the cell, as the box assumes
    images = box_images(Atoms(cell=cell, pbc=True), radius).to(r.dtype)
    d2 = ((r[..., None, :] + images @ lattice) ** 2).sum(-1)  # (..., W)
    return torch.exp(-d2 / (2 * sigma[..., None] ** 2)).sum(-1)


def reference_mixed_attention(attn, x, positions, cell, images, wide_radius: float, cutoff: float) -> torch.Tensor:
    """Layer output (N, d) of a ``reciprocal.MixedSpaceAttention`` layer for one crystal.

    Real-space heads as ``reference_attention`` over ``images``; reciprocal heads are the same
    attention without β and with width σ = s·√ρ, summed in *real space* over every image
    within ``wide_radius`` (at least 8σ of the widest head, checked).
    """
    n, hr = x.shape[0], attn.real_heads
    q, k, v = _projections(attn, x)
    rho = attn.rho(q)
    sigma_wide = attn.reciprocal_scale * rho.sqrt()
    assert wide_radius >= 8 * float(sigma_wide.detach().max()), "wide_radius too small for the widest head"
    wide_images = box_images(Atoms(cell=np.asarray(cell.detach()), pbc=True), wide_radius).to(x.dtype)
    wide_d2 = _image_d2(positions, cell, wide_images)
    real_gamma = -rho / (2 * attn.r0**2)
    wide_gamma = -1 / (2 * sigma_wide**2)
    d2 = _image_d2(positions, cell, images)
    if attn.kind == "real":
        out = _heads(q, k, v, real_gamma, d2, attn.rbf_proj)[0]
    elif attn.kind == "reciprocal":
        out = _heads(q, k, v, wide_gamma, wide_d2, None)[0]
    elif attn.kind == "dual":
        real = _heads(q[:, :hr], k[:, :hr], v[:, :hr], real_gamma[:, :hr], d2, attn.rbf_proj)[0]
        wide = _heads(q[:, hr:], k[:, hr:], v[:, hr:], wide_gamma[:, hr:], wide_d2, None)[0]
        out = torch.cat([real, wide], 1)
    else:  # routed: exp α = g·exp α_real + (1 − g)·exp α_wide, one softmax over j, β from the real images
        out = _routed_heads(q, k, v, real_gamma, wide_gamma, attn.route(q), d2, wide_d2, attn.rbf_proj, cutoff)
    return attn.out_proj(out.reshape(n, -1))


def _routed_heads(q, k, v, real_gamma, wide_gamma, gate, d2, wide_d2, rbf_proj, cutoff):
    """Routed head outputs (N, H, dh): exp(α) = g·Σ_n exp(γ d²) over the images within
    ``cutoff`` (the package's window) + (1 − g)·Σ_n exp(γ_wide d²) over all of them; β from
    the real component's images."""
    inside = d2 <= cutoff**2  # (N, N, W)
    real_logits = torch.where(inside[..., None], real_gamma[:, None, None, :] * d2[..., None], -math.inf)
    real_part = torch.log(gate)[:, None, :] + torch.logsumexp(real_logits, dim=2)  # (N, N, H) log(g·Σ)
    wide_part = torch.log(1 - gate)[:, None, :] + torch.logsumexp(wide_gamma[:, None, None, :] * wide_d2[..., None], dim=2)
    alpha = torch.logaddexp(real_part, wide_part)
    score = torch.einsum("ihd,jhd->ijh", q, k) / math.sqrt(q.shape[-1]) + alpha
    a = torch.softmax(score, dim=1)
    values = v[None].expand(q.shape[0], *v.shape)
    if rbf_proj is not None:
        # image weights of the real component, relative to the pair's whole weight
        pi = torch.exp(torch.log(gate)[:, None, None, :] + real_logits - alpha[:, :, None, :])  # (N, N, W, H)
        k_rbf = rbf_proj.shape[-1]
        width = 14.0 / k_rbf
        centers = torch.arange(1, k_rbf + 1, dtype=q.dtype) * width
        b = torch.exp(-0.5 * ((torch.sqrt(d2.clamp_min(1e-30))[..., None] - centers) / width) ** 2)
        values = values + torch.einsum("ijhk,hdk->ijhd", torch.einsum("ijwh,ijwk->ijhk", pi, b), rbf_proj)
    return torch.einsum("ijh,ijhd->ihd", a, values)


def reference_forward(
    model: Crystalformer, atoms: Atoms, radius: float = 22.0, positions=None, cell=None, wide_radius: float = 60.0
) -> torch.Tensor:
    """Normalised outputs (T,) of ``model`` on one crystal, via ``reference_attention`` (and
    ``reference_mixed_attention`` with images up to ``wide_radius`` for reciprocal heads)."""
    dtype = model.dtype
    if positions is None:
        positions = torch.tensor(atoms.positions, dtype=dtype)
    if cell is None:
        cell = torch.tensor(np.asarray(atoms.cell), dtype=dtype)
    images = box_images(atoms, radius).to(dtype)
    x = model.embedding(torch.tensor(atoms.numbers) - 1)
    for block in model.blocks:
        if isinstance(block.attention, MixedSpaceAttention):
            x = x + reference_mixed_attention(block.attention, x, positions, cell, images, wide_radius,
                                              model.config.cutoff)
        else:
            x = x + reference_attention(block.attention, x, positions, cell, images)[0]
        x = x + block.ffn(x)
    return model.head(x.mean(0))
