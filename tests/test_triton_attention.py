"""The Triton window attention against its torch reference, outputs and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET``
is set here, before the kernels module is imported); with one they run compiled on CUDA
and the reference runs on CPU. Geometries are real: ase structures through
``build_window``/``collate`` and the model's ``geometry()``. The interpreter executes one
program at a time, so heads and the large cell are kept small.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit when the kernels are defined
pytest.importorskip("triton")

from ase import Atoms
from ase.build import bulk, fcc111

from ase_crystalformer import Crystalformer, ModelConfig, attention, triton_attention
from ase_crystalformer.attention import WindowGeometry
from ase_crystalformer.geometry import collate, windows_for

if not CUDA and "ase_crystalformer.triton_attention_kernels" in sys.modules:
    # Imported earlier without the interpreter: define the kernels again, interpreted.
    importlib.reload(sys.modules["ase_crystalformer.triton_attention_kernels"])

DEVICE = torch.device("cuda" if CUDA else "cpu")
#: The Triton path with its create_graph reference, as ``attention.window_attention`` calls it.
fused = partial(triton_attention.window_attention, reference=attention.torch_window_attention)
TOL = {
    torch.float32: {"atol": 2e-4, "rtol": 2e-4},
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
}
GRAD_NAMES = ("q", "k", "v", "gamma", "d2", "basis")


# ----------------------------------------------------------------------------- structures
def one_atom() -> list[Atoms]:
    return [bulk("Po", "sc", a=3.35)]


def mixed_batch() -> list[Atoms]:
    """1 to 6 atoms, cubic to hexagonal, a slab (non-periodic z) and a rattled cell."""
    rattled = bulk("Si", "diamond", a=5.43)
    rattled.rattle(0.05, seed=1)
    slab = fcc111("Al", size=(1, 1, 3), vacuum=4.0)  # pbc (True, True, False)
    return [
        bulk("Cu", "fcc", a=3.61),
        rattled,
        bulk("Mg", "hcp", a=3.21, c=5.21),
        slab,
        bulk("NaCl", "rocksalt", a=5.64) * (1, 1, 3),
    ]


def large_cell() -> list[Atoms]:
    return [bulk("Si", "diamond", a=5.43, cubic=True) * (3, 3, 4)]  # 288 atoms


def geometry(atoms: Sequence[Atoms], dtype: torch.dtype, n_rbf: int = 64) -> WindowGeometry:
    """The model's window geometry of ``atoms`` (real d2, RBFs, mask, neighbours)."""
    model = Crystalformer(ModelConfig(n_blocks=1, d_model=16, n_heads=1, n_rbf=n_rbf))
    batch = collate(windows_for(atoms, model.config.cutoff), dtype)
    with torch.no_grad():
        geom = model.to(dtype).geometry(batch)
        # The kernels read one whole (N, M, K) basis tensor (the model forms it on CUDA).
        basis = model.basis(geom.d2) if model.basis is not None else None
        return replace(geom, basis=basis, layout=None)


# ----------------------------------------------------------------------------- comparison
def inputs(geom: WindowGeometry, heads: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Random q, k, v, γ in the model's range (σ from 1 to 1.98 Å), and output gradients."""
    g = torch.Generator().manual_seed(seed)
    dtype = geom.d2.dtype
    n, _ = geom.d2.shape
    kdim = geom.basis.shape[-1] if geom.basis is not None else 0

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    rho = 0.5 + 0.5 * torch.rand(n, heads, generator=g, dtype=dtype)
    return {
        "q": randn(n, heads, dim), "k": randn(n, heads, dim), "v": randn(n, heads, dim),
        "gamma": -rho / (2 * 1.4**2),
        "gvalues": randn(n, heads, dim), "gmixed": randn(n, heads, kdim),
    }


def run(fn, geom: WindowGeometry, x: dict[str, torch.Tensor], device: torch.device, **kw):
    """Outputs and the gradients of ⟨values, gv⟩ + ⟨mixed, gm⟩ w.r.t. all six inputs."""
    leaves = {name: x[name].to(device).requires_grad_() for name in ("q", "k", "v", "gamma")}
    d2 = geom.d2.to(device).requires_grad_()
    basis = geom.basis.to(device).requires_grad_() if geom.basis is not None else None
    g = WindowGeometry(
        d2, basis, geom.mask.to(device), geom.neighbor.to(device), geom.pair.to(device),
        geom.pair_i.to(device), geom.pair_j.to(device),
    )
    values, mixed = fn(leaves["q"], leaves["k"], leaves["v"], leaves["gamma"], g, **kw)
    loss = (values * x["gvalues"].to(device)).sum()
    wrt = [leaves["q"], leaves["k"], leaves["v"], leaves["gamma"], d2]
    if basis is not None:
        loss = loss + (mixed * x["gmixed"].to(device)).sum()
        wrt.append(basis)
    grads = torch.autograd.grad(loss, wrt)
    out = {"values": values, "mixed": mixed, **dict(zip(GRAD_NAMES, grads))}
    return {name: t.detach().cpu() if t is not None else None for name, t in out.items()}


def check(geom: WindowGeometry, heads: int, dim: int = 16, seed: int = 0, **kw) -> None:
    x = inputs(geom, heads, dim, seed)
    ref = run(attention.window_attention, geom, x, torch.device("cpu"))  # torch path on CPU
    got = run(fused, geom, x, DEVICE, **kw)
    assert set(ref) == set(got)
    for name in ref:
        if ref[name] is None:
            assert got[name] is None, name
            continue
        torch.testing.assert_close(
            got[name], ref[name], **TOL[geom.d2.dtype], msg=lambda m, name=name: f"{name}: {m}"
        )


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_atom_cell(dtype: torch.dtype) -> None:
    check(geometry(one_atom(), dtype), heads=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_m", [None, 16])
def test_mixed_batch(dtype: torch.dtype, block_m: int | None) -> None:
    """Ragged windows and padding; block_m=16 streams the softmax over many steps."""
    check(geometry(mixed_batch(), dtype), heads=2, block_m=block_m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_cell(dtype: torch.dtype) -> None:
    """288 atoms in one cell: no cap on atoms per crystal (the original stops at 320)."""
    geom = geometry(large_cell(), dtype, n_rbf=8)
    assert geom.d2.shape[0] == 288
    check(geom, heads=1 if not CUDA else 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_basis(dtype: torch.dtype) -> None:
    """K = 0 (the paper's simplified model): mixed is None, no basis gradient."""
    geom = geometry(mixed_batch()[:3], dtype, n_rbf=0)
    assert geom.basis is None
    check(geom, heads=2)


def test_bases_made_from_d2() -> None:
    """A window whose bases were not precomputed (large cells): the kernels get b(d2)."""
    geom = geometry(mixed_batch()[:2], torch.float64, n_rbf=8)
    lazy = replace(geom, basis=None)
    x = inputs(geom, heads=2, dim=4, seed=2)
    args = [x[n].to(DEVICE) for n in ("q", "k", "v", "gamma")]
    want = fused(*args, _on(geom))
    got = fused(*args, _on(lazy))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def _on(geom: WindowGeometry) -> WindowGeometry:
    """``geom`` with its tensors (and its basis module) on DEVICE."""
    moved = {f: getattr(geom, f).to(DEVICE) for f in ("d2", "mask", "neighbor", "pair", "pair_i", "pair_j")}
    basis = geom.basis.to(DEVICE) if geom.basis is not None else None
    return replace(geom, basis=basis, rbf=geom.rbf.to(DEVICE) if geom.rbf is not None else None, **moved)


def test_odd_sizes() -> None:
    """Head width and K that are not powers of two, three heads."""
    check(geometry(mixed_batch()[:2], torch.float64, n_rbf=5), heads=3, dim=12)


def tiny_geometry(dtype: torch.dtype) -> WindowGeometry:
    """A hand-made 3-atom, 4-slot window with padding, small enough for gradcheck."""
    g = torch.Generator().manual_seed(3)
    neighbor = torch.tensor([[0, 1, 2, 0], [1, 0, 2, 1], [2, 2, 0, 2]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False], [True] * 4])
    d2 = torch.rand(3, 4, generator=g, dtype=dtype) * 4
    d2[torch.arange(3), torch.tensor([0, 0, 0])] = 0.0  # self images
    basis = torch.rand(3, 4, 3, generator=g, dtype=dtype)
    keys, pair = torch.unique(torch.arange(3)[:, None] * 3 + neighbor, return_inverse=True)
    return WindowGeometry(d2, basis, mask, neighbor, pair, keys // 3, keys % 3)


def test_gradcheck_and_gradgradcheck() -> None:
    geom = tiny_geometry(torch.float64)
    x = inputs(geom, heads=2, dim=4, seed=5)
    args = [x[n].to(DEVICE).requires_grad_() for n in ("q", "k", "v", "gamma")]
    args += [geom.d2.to(DEVICE).requires_grad_(), geom.basis.to(DEVICE).requires_grad_()]
    on_device = _on(geom)

    def fn(*a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_attention.WindowAttentionFunction.apply(
            *a, on_device, 2, attention.torch_window_attention
        )

    # fast_mode: random projections of the Jacobian, few interpreted kernel launches.
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)  # the create_graph backward


def test_deterministic() -> None:
    geom = geometry(mixed_batch(), torch.float32)
    x = inputs(geom, heads=2, dim=16, seed=1)
    first = run(fused, geom, x, DEVICE)
    second = run(fused, geom, x, DEVICE)
    for name, t in first.items():
        if t is not None:
            assert torch.equal(t, second[name]), name


def test_model_energy_forces_stress(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole model: outputs, ∂/∂positions, ∂/∂cells and a force-loss parameter gradient."""
    config = ModelConfig(n_blocks=2, d_model=16, n_heads=2, d_ff=32, d_head_mlp=16, n_rbf=8)
    torch.manual_seed(0)
    model = Crystalformer(config).to(torch.float64)
    atoms = mixed_batch()[:2]

    def derivatives(device: torch.device) -> list[torch.Tensor]:
        m = model.to(device)
        batch = collate(windows_for(atoms, config.cutoff), torch.float64).to(device)
        batch.positions.requires_grad_()
        batch.cells.requires_grad_()
        energy = m(batch).sum()
        dpos, dcell = torch.autograd.grad(energy, (batch.positions, batch.cells), create_graph=True)
        force_loss = dpos.square().sum()
        dparams = torch.autograd.grad(force_loss, list(m.parameters()), allow_unused=True)
        flat = torch.cat([p.reshape(-1) for p in dparams if p is not None])
        return [t.detach().cpu() for t in (energy, dpos, dcell, flat)]

    ref = derivatives(torch.device("cpu"))
    monkeypatch.setattr(attention, "window_attention", fused)
    got = derivatives(DEVICE)
    model.cpu()
    for name, a, b in zip(("energy", "forces", "stress", "force-loss grad"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_refuses_bad_input() -> None:
    geom = geometry(one_atom(), torch.float64)
    x = inputs(geom, heads=1, dim=4, seed=0)
    with pytest.raises(TypeError, match="float32 or float64"):
        fused(x["q"].float(), x["k"], x["v"], x["gamma"], geom)
    with pytest.raises(ValueError, match="gamma must be"):
        fused(x["q"], x["k"], x["v"], x["gamma"][:, :0], geom)
    assert not triton_attention.available(x["q"].cpu())
    assert not triton_attention.available()


def test_path_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """CRYSTALFORMER_ATTENTION=torch switches the kernels off; a typo is an error, not ignored."""
    monkeypatch.setenv(triton_attention.PATH_VARIABLE, "Torch")
    assert triton_attention.requested_path() == "torch"
    monkeypatch.setenv(triton_attention.PATH_VARIABLE, "")
    assert triton_attention.requested_path() == "auto"
    monkeypatch.setenv(triton_attention.PATH_VARIABLE, "triton")
    with pytest.raises(ValueError, match="CRYSTALFORMER_ATTENTION must be 'auto' or 'torch'"):
        triton_attention.requested_path()


@pytest.mark.skipif(not CUDA, reason="dispatch happens on CUDA tensors only")
def test_dispatch_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernels = triton_attention.window_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return kernels(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "window_attention", spy)
    geom = geometry(mixed_batch(), torch.float32)
    x = inputs(geom, heads=2, dim=16, seed=0)
    ref = run(attention.window_attention, geom, x, torch.device("cpu"))
    got = run(attention.window_attention, geom, x, DEVICE)
    assert calls, "attention.window_attention did not dispatch to Triton on CUDA"
    torch.testing.assert_close(got["values"], ref["values"], **TOL[torch.float32])
    calls.clear()
    monkeypatch.setenv(triton_attention.PATH_VARIABLE, "torch")
    run(attention.window_attention, geom, x, DEVICE)
    assert not calls, "CRYSTALFORMER_ATTENTION=torch still ran the Triton kernels"
