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
    n, h, dh = x.shape[0], attn.n_heads, attn.d_head
    q = attn.q_proj(x).view(n, h, dh)
    k = attn.k_proj(x).view(n, h, dh)
    v = attn.v_proj(x).view(n, h, dh)
    gamma = attn.gamma(q)  # (N, H)
    r = positions[None, :, None, :] - positions[:, None, None, :] + (images @ cell)[None, None]  # (N, N, W, 3)
    d2 = (r * r).sum(-1)  # (N, N, W)
    logits = gamma[:, None, None, :] * (d2 + extra_distance)[..., None]  # (N, N, W, H)
    alpha = torch.logsumexp(logits, dim=2)  # (N, N, H)
    beta = None
    values = v[None].expand(n, n, h, dh)  # (N, N, H, dh) v_j
    if attn.rbf_proj is not None:
        pi = torch.exp(logits - alpha[:, :, None, :])  # (N, N, W, H)
        k_rbf = attn.rbf_proj.shape[-1]
        width = 14.0 / k_rbf
        centers = torch.arange(1, k_rbf + 1, dtype=x.dtype) * width
        dist = torch.sqrt(d2.clamp_min(1e-30))
        b = torch.exp(-0.5 * ((dist[..., None] - centers) / width) ** 2)  # (N, N, W, K)
        bbar = torch.einsum("ijwh,ijwk->ijhk", pi, b)
        beta = torch.einsum("ijhk,hdk->ijhd", bbar, attn.rbf_proj)
        values = values + beta
    score = torch.einsum("ihd,jhd->ijh", q, k) / math.sqrt(dh) + alpha  # (N, N, H)
    a = torch.softmax(score, dim=1)
    out = torch.einsum("ijh,ijhd->ihd", a, values).reshape(n, -1)
    return attn.out_proj(out), alpha, beta


def reference_forward(model: Crystalformer, atoms: Atoms, radius: float = 22.0, positions=None, cell=None) -> torch.Tensor:
    """Normalised outputs (T,) of ``model`` on one crystal, via ``reference_attention``."""
    dtype = model.dtype
    if positions is None:
        positions = torch.tensor(atoms.positions, dtype=dtype)
    if cell is None:
        cell = torch.tensor(np.asarray(atoms.cell), dtype=dtype)
    images = box_images(atoms, radius).to(dtype)
    x = model.embedding(torch.tensor(atoms.numbers) - 1)
    for block in model.blocks:
        x = x + reference_attention(block.attention, x, positions, cell, images)[0]
        x = x + block.ffn(x)
    return model.head(x.mean(0))
