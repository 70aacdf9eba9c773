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
