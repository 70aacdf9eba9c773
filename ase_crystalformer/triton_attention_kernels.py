"""``@triton.jit`` kernels of the window attention; launches and autograd live in ``triton_attention``.

This module imports ``triton`` unconditionally, so only ``triton_attention`` imports it, and
only when a kernel is about to run. ``TRITON_INTERPRET=1`` must be set before the first
import for the kernels to run on CPU tensors (Triton reads it when the decorators run).

Layout (all contiguous, one crystal batch): q, k, v (N, H, D) with q pre-scaled by 1/√D,
gamma (N, H), d2 and mask and neighbor (N, M), basis (N, M, K). One program owns one
(atom, head) row in the forward and the query-side backward, or one (key atom, head) in
the key-side backward; it streams over that row's slots in blocks of BLOCK_M (BLOCK_E).
Indices that are multiplied by M·K are int64, so no batch size overflows int32 offsets.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def window_fwd_kernel(
    q_ptr, k_ptr, v_ptr, gamma_ptr, d2_ptr, basis_ptr, mask_ptr, nbr_ptr,
    values_ptr, mixed_ptr, lse_ptr,
    H, M, D, K,
    HAS_BASIS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """values = Σ_m w_m v_j(m), mixed = Σ_m w_m b_m, lse = log Σ_m exp(s_m) for one (i, h).

    Online softmax: a running max ``m_run`` rescales the running sums whenever it grows, so
    every exp is ≤ 1 and nothing of size M is kept. An all-masked block leaves the state
    unchanged (``m_safe`` keeps exp(−inf − −inf) from producing NaN).
    """
    row = tl.program_id(0).to(tl.int64)  # i·H + h
    i = row // H
    h = row % H
    dtype = q_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + row * D + offs_d, mask=dmask, other=0.0)  # (BD,)
    g = tl.load(gamma_ptr + row)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K

    m_run = tl.full((), float("-inf"), dtype)
    l_run = tl.full((), 0.0, dtype)
    acc_v = tl.zeros((BLOCK_D,), dtype)
    acc_b = tl.zeros((BLOCK_K,), dtype)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        slot = i * M + offs_m  # (BM,) flat slot index
        valid = (offs_m < M) & (tl.load(mask_ptr + slot, mask=offs_m < M, other=0) != 0)
        j = tl.load(nbr_ptr + slot, mask=valid, other=0)  # (BM,) int64
        dist2 = tl.load(d2_ptr + slot, mask=valid, other=0.0)
        kv_off = (j * H + h)[:, None] * D + offs_d[None, :]  # (BM, BD)
        kv_mask = valid[:, None] & dmask[None, :]
        kj = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.sum(kj * q[None, :], axis=1) + g * dist2  # (BM,) logits
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        p = tl.exp(s - m_safe)  # (BM,), 0 on masked slots
        l_run = l_run * alpha + tl.sum(p, axis=0)
        vj = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        acc_v = acc_v * alpha + tl.sum(p[:, None] * vj, axis=0)
        if HAS_BASIS:
            b = tl.load(
                basis_ptr + slot[:, None] * K + offs_k[None, :],
                mask=valid[:, None] & kmask[None, :],
                other=0.0,
            )  # (BM, BK)
            acc_b = acc_b * alpha + tl.sum(p[:, None] * b, axis=0)
        m_run = m_new
    tl.store(values_ptr + row * D + offs_d, acc_v / l_run, mask=dmask)
    if HAS_BASIS:
        tl.store(mixed_ptr + row * K + offs_k, acc_b / l_run, mask=kmask)
    tl.store(lse_ptr + row, m_run + tl.log(l_run))


@triton.jit
def window_bwd_query_kernel(
    q_ptr, k_ptr, v_ptr, gamma_ptr, d2_ptr, basis_ptr, mask_ptr, nbr_ptr,
    lse_ptr, delta_ptr, gvalues_ptr, gmixed_ptr,
    dq_ptr, dgamma_ptr, w_ptr, ds_ptr,
    H, M, D, K,
    HAS_BASIS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Query-side backward of one (i, h): recompute w_m, then ds_m = w_m (u_m − δ).

    u_m = gv·v_j(m) + gm·b_m is ∂L/∂w_m and δ = Σ_m w_m u_m = gv·values + gm·mixed (given).
    Accumulates ∂L/∂q (scaled q) = Σ_m ds_m k_j and ∂L/∂γ = Σ_m ds_m d2_m in registers and
    writes w and ds per slot (N, H, M), which the key-side kernel and the slot gradients
    (∂L/∂d2, ∂L/∂basis, summed over heads in torch) read.
    """
    row = tl.program_id(0).to(tl.int64)
    i = row // H
    h = row % H
    dtype = q_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + row * D + offs_d, mask=dmask, other=0.0)
    gv = tl.load(gvalues_ptr + row * D + offs_d, mask=dmask, other=0.0)
    g = tl.load(gamma_ptr + row)
    lse = tl.load(lse_ptr + row)
    delta = tl.load(delta_ptr + row)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    if HAS_BASIS:
        gm = tl.load(gmixed_ptr + row * K + offs_k, mask=kmask, other=0.0)  # (BK,)

    dq = tl.zeros((BLOCK_D,), dtype)
    dg = tl.full((), 0.0, dtype)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        in_row = offs_m < M
        slot = i * M + offs_m
        valid = in_row & (tl.load(mask_ptr + slot, mask=in_row, other=0) != 0)
        j = tl.load(nbr_ptr + slot, mask=valid, other=0)
        dist2 = tl.load(d2_ptr + slot, mask=valid, other=0.0)
        kv_off = (j * H + h)[:, None] * D + offs_d[None, :]
        kv_mask = valid[:, None] & dmask[None, :]
        kj = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        vj = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.sum(kj * q[None, :], axis=1) + g * dist2
        w = tl.where(valid, tl.exp(s - lse), 0.0)  # (BM,) softmax weights
        u = tl.sum(vj * gv[None, :], axis=1)
        if HAS_BASIS:
            b = tl.load(
                basis_ptr + slot[:, None] * K + offs_k[None, :],
                mask=valid[:, None] & kmask[None, :],
                other=0.0,
            )
            u += tl.sum(b * gm[None, :], axis=1)
        ds = w * (u - delta)  # (BM,) ∂L/∂logit
        dq += tl.sum(ds[:, None] * kj, axis=0)
        dg += tl.sum(ds * dist2, axis=0)
        out = (i * H + h) * M + offs_m
        tl.store(w_ptr + out, w, mask=in_row)
        tl.store(ds_ptr + out, ds, mask=in_row)
    tl.store(dq_ptr + row * D + offs_d, dq, mask=dmask)
    tl.store(dgamma_ptr + row, dg)


@triton.jit
def window_bwd_key_kernel(
    q_ptr, gvalues_ptr, w_ptr, ds_ptr, order_ptr, offsets_ptr,
    dk_ptr, dv_ptr,
    H, M, D,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Key-side backward of one (j, h): ∂L/∂k_j = Σ ds q_i, ∂L/∂v_j = Σ w gv_i.

    The sums run over every slot (i, m) whose neighbour is j. ``order`` lists the flat slot
    indices i·M + m grouped by neighbour (a stable sort, so a fixed order) and
    ``offsets[j]:offsets[j+1]`` is j's segment: a gather, not an atomic scatter, so the
    result is bitwise reproducible.
    """
    row = tl.program_id(0).to(tl.int64)  # j·H + h
    jj = row // H
    h = row % H
    dtype = q_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    begin = tl.load(offsets_ptr + jj)
    end = tl.load(offsets_ptr + jj + 1)
    dk = tl.zeros((BLOCK_D,), dtype)
    dv = tl.zeros((BLOCK_D,), dtype)
    for start in range(begin, end, BLOCK_E):
        offs_e = start + tl.arange(0, BLOCK_E)
        valid = offs_e < end
        slot = tl.load(order_ptr + offs_e, mask=valid, other=0)  # (BE,) i·M + m
        i = slot // M
        per_head = (i * H + h) * M + slot % M
        ds = tl.load(ds_ptr + per_head, mask=valid, other=0.0)
        w = tl.load(w_ptr + per_head, mask=valid, other=0.0)
        qi_off = (i * H + h)[:, None] * D + offs_d[None, :]
        qi_mask = valid[:, None] & dmask[None, :]
        qi = tl.load(q_ptr + qi_off, mask=qi_mask, other=0.0)
        gvi = tl.load(gvalues_ptr + qi_off, mask=qi_mask, other=0.0)
        dk += tl.sum(ds[:, None] * qi, axis=0)
        dv += tl.sum(w[:, None] * gvi, axis=0)
    tl.store(dk_ptr + row * D + offs_d, dk, mask=dmask)
    tl.store(dv_ptr + row * D + offs_d, dv, mask=dmask)
