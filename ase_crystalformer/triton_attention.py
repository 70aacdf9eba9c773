"""Triton implementation of ``attention.window_attention``: same signature, same numbers.

The torch reference (``attention.torch_window_attention``) materialises logits and weights of
shape (N, M, H) several times over, plus per-pair copies of k and v. Here one program per
(atom i, head h) streams over i's M window slots with an online, max-subtracted softmax
(FlashAttention style), gathers k_j and v_j through ``geom.neighbor`` and accumulates the
D-dim value sum and the K-dim basis mix in registers; only values (N, H, D), mixed
(N, H, K) and one log-sum-exp per row (N, H) are written.

Backward (``WindowAttentionFunction``) recomputes the weights from the saved log-sum-exp:

* a query-side kernel per (i, h) gives ∂L/∂q and ∂L/∂γ and writes the weights w and the
  logit gradients ds per slot, (N, H, M) each (the size of the reference's saved softmax;
  nothing of size M·K);
* ∂L/∂d2 = Σ_h γ ds and ∂L/∂basis = Σ_h w ⊗ ∂L/∂mixed are two small torch reductions
  over heads, so forces and stress flow through d2 and the bases to positions and cell;
* a key-side kernel per (j, h) gathers ∂L/∂k_j and ∂L/∂v_j over the slots whose neighbour
  is j, listed by a stable sort of ``neighbor``. No atomics anywhere: every sum has a fixed
  order, so forward and backward are bitwise reproducible from run to run.

Numerics: all arithmetic is in the inputs' dtype (float32 or float64; no TF32, since the
kernels use no ``tl.dot``). q is scaled by 1/√D in torch before the kernels, so the scale
is exact in float64. A backward with ``create_graph=True`` (training on forces needs the
gradient of a gradient) recomputes through the torch reference path instead, which is
twice differentiable: correct, but with the memory of the torch path. That reference is
passed in (``reference``) rather than imported: this module imports nothing of the
package, so the import graph is one-way (``attention`` imports this module, lazily).

``available`` says whether this path can run; ``attention.window_attention`` dispatches
here on CUDA and falls back to the torch path (with one warning) if the kernels fail. With ``TRITON_INTERPRET=1`` set before the kernels module is first imported,
the Function also runs on CPU tensors (slowly): that is how the tests check it without a
GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import FunctionCtx

if TYPE_CHECKING:
    from .attention import WindowGeometry

#: The twice-differentiable reference, ``attention.torch_window_attention``'s signature.
Reference = Callable[..., "tuple[torch.Tensor, torch.Tensor | None]"]

_DTYPES = (torch.float32, torch.float64)


#: Environment variable that picks the attention path on CUDA: auto (Triton when it can
#: run) or torch (always the reference path, e.g. to rule the kernels out when debugging).
PATH_VARIABLE = "CRYSTALFORMER_ATTENTION"


def requested_path() -> str:
    """The attention path asked for in ``CRYSTALFORMER_ATTENTION``: 'auto' or 'torch'."""
    value = os.environ.get(PATH_VARIABLE, "auto").strip().lower() or "auto"
    if value not in ("auto", "torch"):
        raise ValueError(f"{PATH_VARIABLE} must be 'auto' or 'torch', got {value!r}")
    return value


def available(*tensors: torch.Tensor) -> bool:
    """True if the Triton path can take these tensors: triton installed, CUDA, fp32/fp64.

    Cheap (does not import triton), so the dispatcher asks on every call. CPU tensors are
    refused even under ``TRITON_INTERPRET=1``: the interpreter is for tests, not for use.
    ``CRYSTALFORMER_ATTENTION=torch`` turns the Triton path off, and so does a failure
    (``give_up``).
    """
    if _FAILURE or not tensors or not all(t.is_cuda and t.dtype in _DTYPES for t in tensors):
        return False
    return requested_path() != "torch" and importlib.util.find_spec("triton") is not None


#: The error that switched the Triton path off in this process (empty while it works).
_FAILURE: list[Exception] = []


def give_up(error: Exception) -> None:
    """Switch the Triton path off for this process after ``error``; warn the first time."""
    if not _FAILURE:
        warnings.warn(
            f"the Triton window attention failed ({type(error).__name__}: {error}); "
            "using the torch path from now on",
            RuntimeWarning,
            stacklevel=3,
        )
    _FAILURE.append(error)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _pow2(n: int) -> int:
    """Smallest power of two ≥ n (≥ 1); Triton block shapes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())


def _slot_block(m: int, block_m: int | None) -> int:
    """Slots per program step: 64 on a GPU (register budget), one big block interpreted.

    The interpreter runs one numpy call per Triton op, so fewer, larger steps are faster.
    """
    if block_m is not None:
        return _pow2(block_m)
    return max(16, min(1024, _pow2(m))) if _interpreting() else 64


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, geom: WindowGeometry
) -> None:
    n, h, _ = q.shape
    m = geom.d2.shape[1]
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one shape (N, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if gamma.shape != (n, h):
        raise ValueError(f"gamma must be (N, H) = {(n, h)}, got {tuple(gamma.shape)}")
    for name, t in (("d2", geom.d2), ("mask", geom.mask), ("neighbor", geom.neighbor)):
        if t.shape != (n, m):
            raise ValueError(f"geom.{name} must be (N, M) = {(n, m)}, got {tuple(t.shape)}")
    if geom.basis is not None and (geom.basis.dim() != 3 or geom.basis.shape[:2] != (n, m)):
        raise ValueError(
            f"geom.basis must be (N, M, K) with (N, M) = {(n, m)}, got {tuple(geom.basis.shape)}"
        )
    floats = [q, k, v, gamma, geom.d2] + ([geom.basis] if geom.basis is not None else [])
    if q.dtype not in _DTYPES or any(t.dtype != q.dtype for t in floats):
        raise TypeError(
            "the Triton window attention takes float32 or float64 tensors of one dtype; got "
            + ", ".join(str(t.dtype) for t in floats)
        )
    if not (q.is_cuda or _interpreting()):
        raise RuntimeError(
            "the Triton window attention needs CUDA tensors (or TRITON_INTERPRET=1 for tests); "
            "call attention.window_attention, which falls back to torch"
        )


class WindowAttentionFunction(torch.autograd.Function):
    """Fused window softmax; inputs and outputs as ``attention.window_attention``.

    apply(q, k, v, gamma, d2, basis | None, geom, block_m, reference) → (values, mixed) with
    q, k, v (N, H, D), gamma (N, H), d2 (N, M), basis (N, M, K); values (N, H, D), mixed
    (N, H, K), an empty (N, H, 0) when basis is None. The kernels read geom.mask and
    geom.neighbor; a create_graph backward also the pair lists (it runs ``reference``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gamma: torch.Tensor,
        d2: torch.Tensor,
        basis: torch.Tensor | None,
        geom: WindowGeometry,
        block_m: int | None,
        reference: Reference,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from .triton_attention_kernels import window_fwd_kernel

        n, h, d = q.shape
        m = d2.shape[1]
        kdim = basis.shape[2] if basis is not None else 0
        scale = 1.0 / math.sqrt(d)
        qs = (q * scale).contiguous()  # (N, H, D): logit = qs·k_j + γ d2
        mask_u8 = geom.mask.contiguous().view(torch.uint8)  # same bytes as bool: a plain int load
        neighbor = geom.neighbor.contiguous().long()
        basis_c = basis.contiguous() if basis is not None else qs  # dummy pointer if K = 0

        values = torch.empty_like(qs)  # (N, H, D)
        mixed = qs.new_empty(n, h, kdim)  # (N, H, K)
        lse = qs.new_empty(n, h)  # (N, H) log Σ_slots exp(logit)
        if n and h:
            window_fwd_kernel[(n * h,)](
                qs, k.contiguous(), v.contiguous(), gamma.contiguous(), d2.contiguous(),
                basis_c, mask_u8, neighbor, values, mixed, lse,
                h, m, d, kdim,
                HAS_BASIS=basis is not None, BLOCK_M=_slot_block(m, block_m),
                BLOCK_D=_pow2(d), BLOCK_K=_pow2(max(kdim, 1)),
            )
        # The inputs themselves are saved, so that a create_graph backward stays on the graph.
        ctx.save_for_backward(q, k, v, gamma, d2, basis, mask_u8, neighbor, values, mixed, lse)
        ctx.geom = geom
        ctx.block_m = block_m
        ctx.reference = reference
        ctx.scale = scale
        return values, mixed

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, gvalues: torch.Tensor | None, gmixed: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        grads = None
        if not torch.is_grad_enabled():  # else create_graph=True: differentiable gradients
            try:
                grads = _fused_backward(ctx, gvalues, gmixed)
            except Exception as error:
                give_up(error)
        if grads is None:
            grads = _differentiable_backward(ctx, gvalues, gmixed)
        need = ctx.needs_input_grad
        return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None, None)


def _fused_backward(
    ctx: Any, gvalues: torch.Tensor | None, gmixed: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for (q, k, v, gamma, d2, basis) from the two backward kernels."""
    from .triton_attention_kernels import window_bwd_key_kernel, window_bwd_query_kernel

    q, k, v, gamma, d2, basis, mask_u8, neighbor, values, mixed, lse = ctx.saved_tensors
    n, h, d = q.shape
    m = d2.shape[1]
    kdim = mixed.shape[2]
    has_basis = basis is not None
    qs = (q * ctx.scale).contiguous()
    k, v, gamma, d2 = k.contiguous(), v.contiguous(), gamma.contiguous(), d2.contiguous()
    gvalues = torch.zeros_like(values) if gvalues is None else gvalues.contiguous()
    delta = (gvalues * values).sum(-1)  # (N, H) δ = Σ_m w_m ∂L/∂w_m
    if has_basis:
        gmixed = torch.zeros_like(mixed) if gmixed is None else gmixed.contiguous()
        delta = delta + (gmixed * mixed).sum(-1)
    else:
        gmixed = values  # dummy pointer, never read
    delta = delta.contiguous()

    dqs = torch.empty_like(qs)
    dgamma = torch.empty_like(gamma)
    weight = qs.new_empty(n, h, m)  # (N, H, M) softmax weights w
    dlogit = qs.new_empty(n, h, m)  # (N, H, M) ∂L/∂logit
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)  # all six are empty tensors, so need no fill, when N·H = 0
    block = _slot_block(m, ctx.block_m)
    if n and h:
        window_bwd_query_kernel[(n * h,)](
            qs, k, v, gamma, d2, basis.contiguous() if has_basis else qs, mask_u8, neighbor,
            lse, delta, gvalues, gmixed,
            dqs, dgamma, weight, dlogit,
            h, m, d, kdim,
            HAS_BASIS=has_basis, BLOCK_M=block, BLOCK_D=_pow2(d), BLOCK_K=_pow2(max(kdim, 1)),
        )
        # Slots grouped by neighbour j; padded slots get the key n and sort past the end.
        key = torch.where(mask_u8.bool(), neighbor, n).reshape(-1)  # (N·M,)
        order = torch.argsort(key, stable=True)  # (N·M,) flat slot index i·M + m
        offsets = torch.zeros(n + 1, dtype=torch.int64, device=q.device)  # (N + 1,) CSR
        torch.cumsum(torch.bincount(key, minlength=n + 1)[:n], 0, out=offsets[1:])
        window_bwd_key_kernel[(n * h,)](
            qs, gvalues, weight, dlogit, order, offsets,
            dk, dv,
            h, m, d,
            BLOCK_E=block, BLOCK_D=_pow2(d),
        )

    # The slot gradients cost (N, M) and (N, M, K): only when d2 / basis need them (forces).
    need = ctx.needs_input_grad
    dq = dqs * ctx.scale
    dd2 = (dlogit * gamma[:, :, None]).sum(1) if need[4] else None  # (N, M) Σ_h γ ds
    dbasis = None
    if has_basis and need[5]:
        dbasis = torch.bmm(weight.transpose(1, 2), gmixed)  # (N, M, H)@(N, H, K)
    return dq, dk, dv, dgamma, dd2, dbasis


def _differentiable_backward(
    ctx: Any, gvalues: torch.Tensor | None, gmixed: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """Gradients that autograd can differentiate again (backward with create_graph=True)."""
    saved = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:6]):
        return (None,) * 6
    with torch.enable_grad():
        # Fresh view nodes: the gradient w.r.t. d2 must not also run through basis = b(d2)
        # (and so on), which autograd.grad would do for the saved, related tensors.
        inputs = tuple(t.view_as(t) if t is not None else None for t in saved[:6])
        q, k, v, gamma, d2, basis = inputs
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need and t is not None]
        # The torch reference path is twice differentiable; rare (force training), so its
        # per-pair memory is acceptable here.
        geom = replace(ctx.geom, d2=d2, basis=basis, rbf=None, layout=None)
        values, mixed = ctx.reference(q, k, v, gamma, geom)
        outputs, grads_out = [values], [gvalues if gvalues is not None else torch.zeros_like(values)]
        if mixed is not None and gmixed is not None:
            outputs.append(mixed)
            grads_out.append(gmixed)
        grads = iter(
            torch.autograd.grad(outputs, wanted, grads_out, create_graph=True, allow_unused=True)
        )
    return tuple(
        next(grads) if need and t is not None else None
        for t, need in zip(inputs, ctx.needs_input_grad)
    )


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    geom: WindowGeometry,
    *,
    reference: Reference,
    block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attention.window_attention`` computed by the Triton kernels (CUDA, or interpreted).

    q, k, v (N, H, D), gamma (N, H) → values (N, H, D), mixed (N, H, K) or None. The
    kernels read geom.d2, geom.basis, geom.mask and geom.neighbor. ``reference`` is the
    torch path (``attention.torch_window_attention``), which a create_graph backward runs.
    ``block_m`` overrides the slots per program step (tests use small blocks to exercise
    the online softmax across steps).
    """
    if geom.basis is None and geom.rbf is not None:  # the kernels read one whole basis tensor
        geom = replace(geom, basis=geom.rbf(geom.d2))
    _check(q, k, v, gamma, geom)
    values, mixed = WindowAttentionFunction.apply(
        q, k, v, gamma, geom.d2, geom.basis, geom, block_m, reference
    )
    return values, (mixed if geom.basis is not None else None)
