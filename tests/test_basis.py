"""The Gaussian radial bases: values and their hand-written first and second derivatives."""

import math

import pytest
import torch

from ase_crystalformer.attention import GaussianBasis


def closed_form(d2: torch.Tensor, rbf: GaussianBasis) -> torch.Tensor:
    d = d2.clamp_min(1e-30).sqrt()
    return torch.exp(-0.5 * ((d[..., None] - rbf.centers.to(d.dtype)) / rbf.width) ** 2)


@pytest.fixture
def d2() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Distances from 0.3 to 10 Å (no self image: sqrt is not differentiable at 0).
    return (0.3 + 9.7 * torch.rand(5, 7, generator=g, dtype=torch.float64)) ** 2


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 30.0), (torch.float64, 80.0)])
def test_values_are_the_gaussians_with_tiny_entries_zeroed(d2, dtype, limit):
    rbf = GaussianBasis(64, 14.0)
    want = closed_form(d2, rbf)
    got = rbf(d2.to(dtype)).double()
    assert (got[want < math.exp(-limit)] == 0).all()  # no denormal-prone tiny entries
    assert (want[got == 0] <= 2 * math.exp(-limit)).all()
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0.0}
    torch.testing.assert_close(got, want.masked_fill(got == 0, 0.0), **tol)
    # With and without autograd: the same numbers.
    assert torch.equal(rbf(d2.to(dtype).requires_grad_()).detach().double(), got)


def test_first_and_second_derivatives(d2):
    """gradcheck and gradgradcheck in d² (forces, and training on forces), against finite
    differences, and the same gradients as autograd through the closed form."""
    rbf = GaussianBasis(8, 3.0)  # few, wide bases: no entry is zeroed over this range
    x = d2[:2, :3].clone().requires_grad_()
    assert torch.autograd.gradcheck(rbf, (x,))
    assert torch.autograd.gradgradcheck(rbf, (x,))
    g = torch.randn(*x.shape, 8, dtype=torch.float64)
    (a,) = torch.autograd.grad((rbf(x) * g).sum(), x, create_graph=True)
    (b,) = torch.autograd.grad((closed_form(x, rbf) * g).sum(), x, create_graph=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    (aa,) = torch.autograd.grad((a**2).sum(), x)
    (bb,) = torch.autograd.grad((b**2).sum(), x)
    torch.testing.assert_close(aa, bb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_banded_bases_contract_like_the_whole_bases(monkeypatch, dtype):
    """Ranges of nearest-first slots keep only their nonzero bases: the same Σ w·b(d) as the
    whole (n, m, K) product, bit for bit up to summation order, and gradients to d² too."""
    from ase.build import bulk

    import ase_crystalformer.attention as attention
    from ase_crystalformer.attention import BandedBasis
    from ase_crystalformer.geometry import collate, image_vectors, windows_for

    monkeypatch.setattr(attention, "BAND_MIN_SLOTS", 0)  # several ranges even for a small input
    crystals = [bulk("Si", "diamond", a=5.43), bulk("NaCl", "rocksalt", a=5.6), bulk("Cu", "fcc", a=3.6) * (2, 1, 1)]
    batch = collate(windows_for(crystals, 10.0)).to(dtype=dtype)
    d2 = image_vectors(batch).square().sum(-1).requires_grad_()
    rbf = GaussianBasis(64, 14.0)
    banded = BandedBasis.make(rbf, d2, batch.mask)
    assert len(banded.parts) == attention.BAND_PARTS
    assert sum((b - a) * (k1 - k0) for a, b, k0, k1, _ in banded.parts) < 0.8 * d2.numel() * 64
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(d2.shape[0], 3, d2.shape[1], generator=g, dtype=dtype) * batch.mask[:, None, :]
    got = banded.contract(weights)
    want = torch.bmm(weights, rbf(d2))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(got, want, **tol)
    (grad_got,) = torch.autograd.grad(got.square().sum(), d2)
    (grad_want,) = torch.autograd.grad(want.square().sum(), d2)
    scale = float(grad_want.abs().max())  # small entries of b' sums lose digits to cancellation
    torch.testing.assert_close(grad_got, grad_want, rtol=tol["rtol"], atol=tol["rtol"] * scale)
