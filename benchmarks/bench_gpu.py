"""GPU throughput of the Triton window attention against the torch path (and the dense box).

    python benchmarks/bench_gpu.py --data PATH/flla_2015.csv

Needs CUDA. Same structures (a fixed random sample of the CSV), same weights, float32
(``--dtype float64`` for the other). Paths: ``triton`` (every layer's window attention on
``triton_attention``), ``torch`` (``attention.torch_window_attention``) and
``dense`` (``dense_box_reference``, chunked). Per path: ms/structure at batch 1,
inference structures/s at batch 128, one training step at batch 128 (forward, L1 loss,
backward, clipping, AdamW), each with its peak GPU memory (``max_memory_allocated``);
then, for supercells of a 1-atom cell up to 1,000 atoms, inference and energy + forces
time and memory. Triton compiles during the warm-up calls, which are not timed. Prints
markdown tables; asserts nothing about time, but prints the largest Triton−torch
differences so that a wrong kernel cannot hide behind a fast one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import itertools
from collections.abc import Callable, Iterator

import _common
import torch

from ase_crystalformer.geometry import Batch

DEVICE = torch.device("cuda")
LABELS = {
    "triton": "ours, Triton kernels",
    "torch": "ours, torch path",
    "dense": "dense box reference",
}


@contextlib.contextmanager
def attention_path(path: str) -> Iterator[None]:
    """Route every layer's ``window_attention`` to the Triton kernels or to the torch code.

    The layers look the function up in ``attention`` at call time, so it is swapped there.
    """
    from ase_crystalformer import attention, triton_attention

    dispatcher = attention.window_attention
    if path == "triton":
        attention.window_attention = functools.partial(
            triton_attention.window_attention, reference=attention.torch_window_attention
        )
    elif path == "torch":
        attention.window_attention = attention.torch_window_attention
    try:
        yield
    finally:
        attention.window_attention = dispatcher


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB allocated during the calls) of ``fn`` on the GPU."""
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = [_common.seconds(fn, sync) for _ in range(repeats)]
    return _common.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def build(path: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from ase_crystalformer import Crystalformer

    torch.manual_seed(0)
    model = Crystalformer()
    if path == "dense":
        from dense_box_reference import DenseBoxCrystalformer

        dense = DenseBoxCrystalformer(model.config)
        dense.load_state_dict(model.state_dict())
        model = dense
    return model.to(device=device, dtype=dtype)


def measure_path(
    path: str,
    args: argparse.Namespace,
    batches: list[Batch],
    singles: list[Batch],
    y: torch.Tensor,
) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Batch-1, batch-B inference and training of one path; also its outputs and gradients.

    Returns [batch-1 ms, MiB, inference structures/s, MiB, training step s, MiB], the
    outputs on the first batch and the flat parameter gradient of its L1 loss (fresh
    weights, before any step: the correctness probe).
    """
    bs = args.batch
    model = build(path, getattr(torch, args.dtype), DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-5)
    steps = itertools.cycle(range(len(batches)))

    def train_step() -> None:
        s = next(steps)
        loss = (model(batches[s])[:, 0] - y[s * bs : (s + 1) * bs]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    with attention_path(path):
        model.train()
        out = model(batches[0])
        out[:, 0].sub(y[:bs]).abs().mean().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).float().cpu()
        model.zero_grad(set_to_none=True)

        for _ in range(2):  # warm-up: Triton compiles here, the allocator settles
            train_step()
        train_s, train_mb = timed(train_step, args.train_steps)
        model.eval()
        with torch.no_grad():
            for b in batches[:2] + singles[:4]:
                model(b)
            big = itertools.cycle(batches[: args.infer_batches])
            infer_s, infer_mb = timed(lambda: model(next(big)), args.infer_batches)
            one = itertools.cycle(singles)
            single_s, single_mb = timed(lambda: model(next(one)), len(singles))
    row = [1e3 * single_s, single_mb, bs / infer_s, infer_mb, train_s, train_mb]
    return row, out.detach().float().cpu(), grad


def throughput(args: argparse.Namespace, paths: list[str]) -> None:
    from ase_crystalformer import ModelConfig
    from ase_crystalformer.geometry import collate, windows_for

    device, dtype, bs = DEVICE, getattr(torch, args.dtype), args.batch
    n_batches = max(args.infer_batches, args.train_steps)
    atoms, energy = _common.load_structures(args.data, bs * n_batches, args.seed)
    cutoff = ModelConfig().cutoff
    batches = [
        collate(windows_for(atoms[i * bs : (i + 1) * bs], cutoff), dtype).to(device)
        for i in range(n_batches)
    ]
    singles = [collate(windows_for([a], cutoff), dtype).to(device) for a in atoms[: args.single]]
    y = torch.tensor(energy, dtype=dtype, device=device)
    y = (y - y.mean()) / y.std()

    rows, outputs, grads = {}, {}, {}
    for path in paths:
        rows[path], outputs[path], grads[path] = measure_path(path, args, batches, singles, y)
        torch.cuda.empty_cache()

    print(f"\n### Batches of real structures ({args.dtype}, batch {bs}, "
          f"{int(batches[0].n_atoms.sum())} atoms in the first)\n")
    names = [
        "ms/structure, batch 1", "peak MiB, batch 1", f"inference structures/s, batch {bs}",
        f"peak MiB, inference b{bs}", f"training step s, batch {bs}", f"peak MiB, training b{bs}",
    ]
    print(_common.table(
        ["measure"] + [LABELS[p] for p in paths],
        [[name] + [rows[p][i] for p in paths] for i, name in enumerate(names)],
    ))
    if "triton" in rows:
        for other in [p for p in paths if p != "triton"]:
            t, o = rows["triton"], rows[other]
            print(f"\nTriton over {other}: batch 1 {o[0] / t[0]:.2f}×, inference "
                  f"{t[2] / o[2]:.2f}×, training step {o[4] / t[4]:.2f}×, training memory "
                  f"{o[5] / t[5]:.2f}× less")
    if "triton" in outputs and "torch" in outputs:
        dout = (outputs["triton"] - outputs["torch"]).abs().max().item()
        dgrad = ((grads["triton"] - grads["torch"]).norm() / grads["torch"].norm()).item()
        print(f"\nTriton vs torch, first batch: max |Δ output| {dout:.2e}, "
              f"relative |Δ parameter gradient| {dgrad:.2e}")


def cell_timings(path: str, args: argparse.Namespace, batch: Batch) -> list[float]:
    """[inference ms, MiB, energy + forces ms, MiB] of one cell with one path."""
    model = build(path, getattr(torch, args.dtype), DEVICE).eval()

    def energy_forces() -> None:
        positions = batch.positions.clone().requires_grad_()
        energy = model(dataclasses.replace(batch, positions=positions)).sum()
        torch.autograd.grad(energy, positions)

    with attention_path(path):
        with torch.no_grad():
            model(batch)
            infer_s, infer_mb = timed(lambda: model(batch), args.repeats)
        energy_forces()
        forces_s, forces_mb = timed(energy_forces, args.repeats)
    return [1e3 * infer_s, infer_mb, 1e3 * forces_s, forces_mb]


def scaling(args: argparse.Namespace, paths: list[str]) -> None:
    from bench_scaling import base_structure

    from ase_crystalformer import ModelConfig
    from ase_crystalformer.geometry import collate, windows_for

    device, dtype = DEVICE, getattr(torch, args.dtype)
    base = base_structure(args.data, args.material)
    paths = [p for p in paths if p != "dense"]
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        atoms = base * (n, n, n)
        batch = collate(windows_for([atoms], ModelConfig().cutoff), dtype).to(device)
        row = [len(atoms), int(batch.mask.sum())]
        for path in paths:
            row += cell_timings(path, args, batch)
            torch.cuda.empty_cache()
        rows.append(row)
    headers = ["atoms", "window images"]
    for p in paths:
        headers += [f"{p} inference ms", f"{p} MiB", f"{p} energy+forces ms", f"{p} forces MiB"]
    print(f"\n### Supercells of {args.material} (batch 1, {args.dtype}, median of "
          f"{args.repeats})\n")
    print(_common.table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=_common.default_data(), help="flla_2015.csv")
    parser.add_argument("--paths", default="triton,torch,dense", help=f"of {list(LABELS)}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--infer-batches", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--single", type=int, default=64, help="batch-1 structures timed")
    parser.add_argument("--material", default="mp-134", help="1-atom cell for the supercells")
    parser.add_argument("--sizes", default="2,4,6,8,10", help="supercells n×n×n ('' to skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; see bench_cpu.py for the CPU")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(LABELS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {list(LABELS)}")
    if "triton" in paths and importlib.util.find_spec("triton") is None:
        print("triton is not installed: timing the torch paths only")
        paths.remove("triton")
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32 precision on every path
    torch.backends.cudnn.allow_tf32 = False
    print(f"machine: {_common.machine()}")
    print(f"data: {args.data}")
    throughput(args, paths)
    if args.sizes:
        scaling(args, paths)


if __name__ == "__main__":
    main()
