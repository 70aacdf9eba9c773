"""``linear.Linear``: nn.Linear's numbers, and a cached transposed weight that never goes stale."""

from __future__ import annotations

import torch
from torch import nn

from ase_crystalformer.linear import Linear


def _pair() -> tuple[Linear, nn.Linear]:
    torch.manual_seed(0)
    ours, theirs = Linear(6, 4), nn.Linear(6, 4)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_same_outputs_gradients_and_state_dict_as_nn_linear():
    ours, theirs = _pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(3, 5, 6, requires_grad=True)
    a, b = ours(x), theirs(x)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.square().sum(), [x, ours.weight, ours.bias])
    gb = torch.autograd.grad(b.square().sum(), [x, theirs.weight, theirs.bias])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v)


def test_the_cached_copy_follows_every_change_of_the_weight():
    ours, theirs = _pair()
    x = torch.randn(2, 6)
    with torch.no_grad():
        ours(x)  # fills the cache
        for module in (ours, theirs):  # an optimizer-style in-place update
            module.weight.add_(1.0)
        torch.testing.assert_close(ours(x), theirs(x))
        state = {k: torch.randn_like(v) for k, v in theirs.state_dict().items()}
        ours.load_state_dict(state)
        theirs.load_state_dict(state)
        torch.testing.assert_close(ours(x), theirs(x))
        ours.double(), theirs.double()
        torch.testing.assert_close(ours(x.double()), theirs(x.double()))
        ours.float(), theirs.float()
        ours.weight.data = torch.randn(4, 6)  # new storage under the same parameter
        theirs.weight.data = ours.weight.data.clone()
        torch.testing.assert_close(ours(x), theirs(x))
