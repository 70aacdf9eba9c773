"""What a routed model learned: the weight of each head's real-space lattice sum, per layer.

    python scripts/route_gates.py --model runs/recip/eform-routed/best.safetensors \\
        --data mp-megnet --data-dir ../shared/data [--split val]

A routed head weighs pair (i, j) by exp(α_ij) = g·(real-space lattice sum) + (1 − g)·(reciprocal-
space one), g = sigmoid(τ·(q_i·u_h + c_h)) per atom (``reciprocal.routed_attention``). Prints,
per layer and head, the mean over the atoms of the split's structures of g (0.5 where training
started) and of the share of the head's attention that its real-space component carries
(``MixedSpaceAttention.routing``: 1 a real-space head, 0 a reciprocal one; it also depends on
how large the two sums are, which the gate alone does not say).
"""

from __future__ import annotations

import argparse

import torch

from ase_crystalformer.checkpoint import load_model
from ase_crystalformer.data import load_dataset
from ase_crystalformer.geometry import collate
from ase_crystalformer.reciprocal import MixedSpaceAttention
from ase_crystalformer.training import make_examples


def route_gates(model, dataset, split: str = "val") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per routed layer, g and the real-space share of attention per atom and head, (N, H) each,
    over ``split``'s structures."""
    examples, _ = make_examples(dataset, dataset.splits[split], model.config)
    hooks, seen = [], {}
    for layer, block in enumerate(model.blocks):
        attention = block.attention
        if isinstance(attention, MixedSpaceAttention) and attention.kind == "routed":

            def grab(module, args, layer=layer):
                seen.setdefault(layer, []).append(module.routing(*args))

            hooks.append(attention.register_forward_pre_hook(grab))
    model.eval()
    with torch.no_grad():
        for k in range(0, len(examples), 64):
            model(collate([e.window for e in examples[k : k + 64]], model.dtype))
    for hook in hooks:
        hook.remove()
    return {layer: tuple(torch.cat(parts) for parts in zip(*values)) for layer, values in sorted(seen.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-dir")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    model = load_model(args.model)
    model = getattr(model, "members", [model])[0]  # a committee: its first member's gates
    if not any(getattr(b.attention, "kind", None) == "routed" for b in model.blocks):
        raise SystemExit(f"{args.model}: no routed layer (domain {model.config.domain!r})")
    dataset = load_dataset(args.data, [t.name for t in model.config.targets], data_dir=args.data_dir)
    if not dataset.splits.get(args.split):
        raise SystemExit(f"{args.data}: no structures in split {args.split!r}; splits {sorted(dataset.splits)}")
    gates = route_gates(model, dataset, args.split)
    heads = model.config.n_heads
    print("| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |")
    print("|---|" + "---|" * heads)
    for layer, (g, share) in gates.items():
        cells = [f"{g[:, h].mean():.2f} / {share[:, h].mean():.2f}" for h in range(heads)]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    atoms = len(next(iter(gates.values()))[0])
    print(f"\nper head: mean gate g / mean real-space share of attention, {args.split} split, {atoms} atoms")


if __name__ == "__main__":
    main()
