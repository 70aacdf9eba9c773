"""Energy, forces and stress of an energy-type target by autograd through the window.

The one place where forces and stress are defined, used by the ASE calculator and by
force/stress training alike. The window (which images exist) is fixed per structure; the
image vectors r = p_j + n·L - p_i are recomputed from positions and cell inside autograd.

Stress follows ASE: σ = (1/V) ∂E/∂ε for a symmetric strain ε applied as p → p(1 + ε)ᵀ,
L → L(1 + ε)ᵀ, in eV/Å³ with ASE's sign convention.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .geometry import Batch
from .model import Crystalformer


def energy_target_index(model: Crystalformer) -> int:
    """Index of the model's energy-type target; ValueError if it has none."""
    for index, spec in enumerate(model.config.targets):
        if spec.kind == "energy":
            return index
    names = [t.name for t in model.config.targets]
    raise ValueError(f"model has no energy-type target (its targets: {names})")


def energy_forces_stress(
    model: Crystalformer, batch: Batch, *, forces: bool = True, stress: bool = True, create_graph: bool = False
) -> dict[str, torch.Tensor]:
    """Total energy (B,) in eV, forces (N, 3) in eV/Å, stress (B, 3, 3) in eV/Å³.

    The energy target is a per-atom energy (eV/atom) times the number of atoms. Set
    ``create_graph`` to train on forces/stress (second-order gradients). Also returns the
    model's normalised ``outputs`` (B, T) so callers get every target from one pass.
    """
    index = energy_target_index(model)
    with torch.enable_grad():
        leaf = batch.positions.detach().requires_grad_(forces)  # (N, 3)
        positions, cells, strain = leaf, batch.cells, None
        if stress:
            strain = torch.zeros_like(cells, requires_grad=True)  # (B, 3, 3)
            eye = torch.eye(3, dtype=cells.dtype, device=cells.device)
            deform = eye + 0.5 * (strain + strain.transpose(1, 2))  # (B, 3, 3)
            positions = torch.bmm(leaf[:, None, :], deform[batch.crystal].transpose(1, 2))[:, 0]
            cells = torch.bmm(cells, deform.transpose(1, 2))
        inputs = replace(batch, positions=positions, cells=cells)
        if create_graph:  # training: the parameters' gradients come later, through this graph
            outputs = model(inputs)  # (B, T)
        else:
            # Without the parameters in the graph, backward visits only what leads to the
            # positions and the strain; otherwise a large cell's checkpointed chunks keep the
            # recomputed tensors that only the weights' gradients would read until the end
            # of backward (~1.1 GB for 4,913 atoms, docs/benchmarks.md).
            frozen = {name: p.detach() for name, p in model.named_parameters()}
            outputs = torch.func.functional_call(model, frozen, (inputs,))  # (B, T)
        per_atom = model.targets(outputs)[:, index]  # (B,) eV/atom
        energy = per_atom * batch.n_atoms.to(per_atom.dtype)  # (B,) eV
        out = {"outputs": outputs, "energy": energy}
        wrt = ([leaf] if forces else []) + ([strain] if stress else [])
        if wrt:
            grads = torch.autograd.grad(energy.sum(), wrt, create_graph=create_graph)
            if forces:
                out["forces"] = -grads[0]
            if stress:
                volume = torch.linalg.det(batch.cells).abs()  # (B,)
                out["stress"] = grads[-1] / volume[:, None, None]
    return out
