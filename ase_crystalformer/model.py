"""The Crystalformer network: embedding, periodic-attention blocks, readout (mean pool, MLP).

``Crystalformer()`` with no arguments is the paper's default architecture, 853,505 trainable
parameters (the paper's 853,517 also counts 12 frozen or unused scalars). It carries its
target normalisation, so ``predict`` returns values in the targets' own units.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms
from torch import nn

from .attention import MAX_SLOTS, GaussianBasis, WindowGeometry, row_layout
from .config import MAX_ATOMIC_NUMBER, ModelConfig
from .domain import warn_outside
from .geometry import Batch, Window, collate, image_vectors, windows_for
from .linear import Linear
from .reciprocal import (
    SpaceGeometry,
    attention_for,
    check_periodic,
    pair_images,
    reciprocal_geometry,
    uses_real_window,
)
from .structures import as_atoms_list, check_all, describe, primitive_cell

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Sharpened(nn.Module):
    """f(βx)/β (``ModelConfig.activation_sharpness``)."""

    def __init__(self, activation: nn.Module, sharpness: float) -> None:
        super().__init__()
        self.activation, self.sharpness = activation, sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x * self.sharpness) / self.sharpness


def _activation(config: ModelConfig) -> nn.Module:
    activation = _ACTIVATIONS[config.activation]()
    return activation if config.activation_sharpness == 1.0 else Sharpened(activation, config.activation_sharpness)


class Block(nn.Module):
    """Post-norm Transformer block with the norms removed (T-Fixup): x + MHA, then x + FFN."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attention = attention_for(config, layer)
        self.ffn = nn.Sequential(
            Linear(config.d_model, config.d_ff),
            _activation(config),
            Linear(config.d_ff, config.d_model),
        )

    def forward(self, x: torch.Tensor, geom: WindowGeometry | SpaceGeometry) -> torch.Tensor:
        x = x + self.attention(x, geom)
        return x + self.ffn(x)


class Crystalformer(nn.Module):
    """Crystalformer regression model on periodic structures.

    ``forward`` maps a ``Batch`` to normalised outputs (B, T), the quantity the training
    loss sees; ``targets`` undoes normalisation and transforms; ``predict`` takes ASE or
    pymatgen structures and returns numpy arrays in the targets' units.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ModelConfig()
        n_targets = len(config.targets)
        self.embedding = nn.Embedding(MAX_ATOMIC_NUMBER, config.d_model)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_blocks))
        self.head = nn.Sequential(
            Linear(config.d_model, config.d_head_mlp),
            _activation(config),
            Linear(config.d_head_mlp, n_targets),
        )
        self.basis = GaussianBasis(config.n_rbf, config.rbf_max) if config.n_rbf else None
        # Normalisation of the (transformed) targets: training-split mean and population std.
        self.register_buffer("target_mean", torch.zeros(n_targets))
        self.register_buffer("target_std", torch.ones(n_targets))
        #: Checkpoint metadata (``checkpoint.load_model`` fills it): provenance, metrics and
        #: the training ``domain`` that ``predict`` checks structures against.
        self.metadata: dict[str, Any] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T-Fixup initialisation; the head MLP keeps PyTorch's default init."""
        c = self.config
        scale = 0.67 * c.n_blocks**-0.25
        nn.init.normal_(self.embedding.weight, std=c.d_model**-0.5 * (9 * c.n_blocks) ** -0.25)
        for block in self.blocks:
            attn = block.attention
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)
            with torch.no_grad():
                attn.v_proj.weight.mul_(scale)
                attn.out_proj.weight.mul_(scale)
            nn.init.normal_(attn.sigma_weight, std=c.d_head**-0.5)
            if attn.rbf_proj is not None:
                # Xavier on the (H·dh, K) matrix with gain K^-1/2, as the original.
                bound = c.n_rbf**-0.5 * math.sqrt(6.0 / (c.d_model + c.n_rbf))
                nn.init.uniform_(attn.rbf_proj, -bound, bound)
            for layer in (block.ffn[0], block.ffn[2]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
                with torch.no_grad():
                    layer.weight.mul_(scale)

    # ----------------------------------------------------------------------------- forward
    def geometry(self, batch: Batch) -> WindowGeometry | SpaceGeometry:
        """What the blocks need, shared by all blocks and heads: the window's distances and
        radial bases, and for the other domains the reciprocal plane waves too."""
        if self.config.domain == "real":
            return self.window_geometry(batch)
        real = self.window_geometry(batch) if uses_real_window(self.config) else None
        reciprocal = reciprocal_geometry(batch, self.config)
        images = None
        if self.config.domain == "routed":
            r = image_vectors(batch)
            images = pair_images((r * r).sum(-1), batch, reciprocal, self.basis, self.config.cutoff)
        return SpaceGeometry(real, reciprocal, images)

    def window_geometry(self, batch: Batch) -> WindowGeometry:
        """Distances and radial bases of the real-space window."""
        r = image_vectors(batch)  # (N, M, 3)
        d2 = (r * r).sum(-1)  # (N, M)
        if d2.is_cuda:  # the Triton kernels read one whole (N, M, K) basis tensor
            basis = self.basis(d2) if self.basis is not None else None
            return WindowGeometry(
                d2, basis, batch.mask, batch.neighbor, batch.pair, batch.pair_i, batch.pair_j, rbf=self.basis,
                crystal=batch.crystal,
            )
        # Bases for the whole window once per batch (in the torch path's row groups), unless
        # that would take more memory than its row chunks: then each chunk makes its own.
        whole = self.basis is not None and d2.numel() <= MAX_SLOTS
        layout = row_layout(
            d2, batch.mask, batch.pair, batch.pair_i, batch.pair_j, rbf=self.basis if whole else None,
            crystal=batch.crystal, neighbor=batch.neighbor,
        )
        return WindowGeometry(
            d2, None, batch.mask, batch.neighbor, batch.pair, batch.pair_i, batch.pair_j,
            rbf=self.basis, layout=layout, crystal=batch.crystal,
        )

    def atom_features(self, batch: Batch) -> torch.Tensor:
        """Per-atom features after the last block, (N, d)."""
        geom = self.geometry(batch)
        x = self.embedding(batch.numbers - 1)  # (N, d)
        for block in self.blocks:
            x = block(x, geom)
        return x

    def embed(self, batch: Batch) -> torch.Tensor:
        """Mean-pooled crystal features, (B, d): the learned structure embedding."""
        return crystal_mean(self.atom_features(batch), batch)

    def readout(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised outputs (B, T) and the embedding (B, d) from atom features x (N, d):
        the head of the mean (``readout="mean"``) or the mean of the head (``"atoms"``)."""
        embedding = crystal_mean(x, batch)
        if self.config.readout == "atoms":
            return crystal_mean(self.head(x), batch), embedding
        return self.head(embedding), embedding

    def forward(self, batch: Batch) -> torch.Tensor:
        """Normalised outputs (B, T)."""
        return self.readout(self.atom_features(batch), batch)[0]

    def targets(self, outputs: torch.Tensor) -> torch.Tensor:
        """Normalised outputs (B, T) → targets in their units (transform undone)."""
        y = outputs * self.target_std + self.target_mean
        columns = [
            torch.pow(10.0, y[:, t]) if spec.transform == "log10" else y[:, t]
            for t, spec in enumerate(self.config.targets)
        ]
        return torch.stack(columns, dim=1)

    # ----------------------------------------------------------------------------- predict
    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def make_batch(self, structures: Iterable[Any]) -> Batch:
        """Check and collate ASE/pymatgen structures onto this model's device and dtype."""
        windows = windows_for(as_atoms_list(structures), self.config.cutoff)
        return collate(windows, self.dtype).to(self.device)

    def predict(self, structures: Any, batch_size: int = 64, *, primitive: bool = False) -> np.ndarray:
        """Predict every target for one structure or a list of ASE/pymatgen structures.

        Returns shape (n,) for a single-target model, else (n, T), in the targets' units.
        All structures are checked before any is predicted, so a bad one fails fast; those
        unlike the training set (``metadata["domain"]``) get a ``domain.OutOfDomainWarning``.
        ``primitive=True`` predicts on each structure's primitive cell: the same answer
        (the model is invariant to the cell) for less work when given supercells.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        atoms_list = prediction_inputs(self.config, structures, primitive)
        out = self.predict_windows(windows_for(atoms_list, self.config.cutoff), batch_size)
        return out[:, 0] if len(self.config.targets) == 1 else out

    def predict_windows(self, windows: Sequence[Window], batch_size: int = 64) -> np.ndarray:
        """``predict`` of structures whose windows (``geometry.build_window`` at this
        model's cutoff) are already built, so that a caller that checked them need not
        search neighbours again. Returns (n, T) in the targets' units, with the same
        ``OutOfDomainWarning`` as ``predict``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        name, domain = self.metadata.get("name", "model"), self.metadata.get("domain")
        warn_outside(name, domain, enumerate(w.numbers for w in windows), len(windows))
        was_training = self.training
        # eval() sets an attribute on every submodule (~0.5 ms, much of a one-structure call):
        # only when some submodule is in training mode.
        switch = any(module.training for module in self.modules())
        if switch:
            self.eval()
        chunks = []
        try:
            with torch.no_grad():
                for start in range(0, len(windows), batch_size):
                    batch = collate(windows[start : start + batch_size], self.dtype).to(self.device)
                    chunks.append(self.targets(self(batch)).cpu().numpy())
        finally:
            if switch:
                self.train(was_training)
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.config.targets)))


def crystal_mean(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-atom rows x (N, ...) averaged over each crystal's atoms: (B, ...)."""
    total = x.new_zeros((batch.n_crystals, *x.shape[1:])).index_add_(0, batch.crystal, x)
    return total / batch.n_atoms.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def prediction_inputs(config: ModelConfig, structures: Any, primitive: bool) -> list[Atoms]:
    """``structures`` as ASE atoms for a prediction: each reduced to its primitive cell when
    asked, and refused when the model's reciprocal-space heads cannot take it (partial pbc)."""
    atoms_list = as_atoms_list(structures)
    if primitive:
        check_all(atoms_list)
        atoms_list = [primitive_cell(a) for a in atoms_list]
    check_periodic(config, atoms_list, (describe(a, i) for i, a in enumerate(atoms_list)))
    return atoms_list
