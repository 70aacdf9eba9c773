"""``Linear``: ``nn.Linear`` multiplied by its weight in transposed, contiguous form.

Why our own: on the CPU, ``nn.Linear`` hands addmm a transposed view of its weight,
which costs ~3× more than a contiguous transposed copy for the few rows of one small
crystal (d=128, 9 atoms: ~15 against ~5 µs) and is no faster for many rows; a model of
4 blocks makes 26 such products per call. The state dict is ``nn.Linear``'s.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters; without autograd on the weight, its
    transposed copy is kept until the weight changes (new storage or an in-place update)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._source: torch.Tensor | None = None  # the weight the copy was made from (keeps its storage alive)
        self._version_of_source = -1
        self._transposed: torch.Tensor | None = None

    def transposed_weight(self) -> torch.Tensor:
        """Wᵀ (in, out), contiguous; differentiable when the weight needs gradients."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return w.t().contiguous()
        src = self._source
        # A live source shares storage and version counter with the weight, so equal
        # pointers, shape and version mean the same, unchanged values.
        if (src is None or src.data_ptr() != w.data_ptr() or src.shape != w.shape or src.dtype != w.dtype
                or src.device != w.device or w._version != self._version_of_source):
            self._source, self._version_of_source = w.detach(), w._version
            self._transposed = self._source.t().contiguous()
        return self._transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.transposed_weight()
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(self.bias, flat, w) if self.bias is not None else flat @ w
        return out.view(*x.shape[:-1], w.shape[1])
