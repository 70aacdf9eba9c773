"""Test-set (or validation-set) errors of a potential, per source file, next to CHGNet on the same frames.

    python benchmarks/eval_potential.py --model runs/potential/best.safetensors \
        --data-dir ../shared/data --chgnet-python /work/chgnet-venv/bin/python --out runs/eval

The test frames are the potential's own split (recomputed from the data by
``potential.split_frames``; the sha256 of their ids is checked against the checkpoint);
``--split val`` takes its validation frames instead, to choose between candidates.
Energy MAE is per atom, after each source's per-element reference energies: for the potential
the μ fitted on that source's training frames (what it was trained with); for CHGNet a
per-element offset fitted the same way (least squares on its errors over up to
``--offset-frames`` training frames of the source), since its zero of energy is MPtrj's.
Forces: mean |ΔF| over components (eV/Å); stress: mean |Δσ| over the 9 components (GPa).
Prints a markdown table and writes ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from ase.io import write
from ase.units import GPa

from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.checkpoint import load_model
from ase_crystalformer.potential import (
    Frame,
    References,
    _fit,
    _unit_interval,
    read_all,
    references_of,
    split_frames,
    trim_relaxed_val,
)
from ase_crystalformer.training import ids_digest

HERE = Path(__file__).parent


def potential_predictions(model, frames: list[Frame], batch_size: int) -> list[dict]:
    calc = CrystalformerCalculator(model, batch_size=batch_size)
    return calc.predict([f.atoms for f in frames], properties=["energy", "forces", "stress"])


def chgnet_predictions(python: str, frames: list[Frame], cache: Path) -> list[dict]:
    """CHGNet on ``frames`` in its own venv; cached in ``cache`` (.npz) with the frame ids."""
    ids = [f.id for f in frames]
    if not (cache.is_file() and list(np.load(cache)["ids"]) == ids):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "frames.xyz"
            images = []
            for f in frames:
                atoms = f.atoms.copy()
                atoms.calc = None
                images.append(atoms)
            write(path, images, format="extxyz")
            out = Path(tmp) / "chgnet.npz"
            subprocess.run([python, str(HERE / "chgnet_predict.py"), str(path), str(out)], check=True)
            np.savez(cache, ids=np.array(ids), **{k: v for k, v in np.load(out).items()})
    data = np.load(cache)
    n = np.cumsum([len(f.atoms) for f in frames])[:-1]
    return [{"energy": e, "forces": fo, "stress": s}
            for e, fo, s in zip(data["energy"], np.split(data["forces"], n), data["stress"], strict=True)]


def offsets(frames: list[Frame], preds: list[dict]) -> dict[int, float]:
    """Per-element offsets μ with label ≈ prediction + Σ n μ (least squares, per atom)."""
    shifted = [Frame(f.id, f.group, f.source, f.file, f.atoms, f.energy - p["energy"], f.forces, f.stress)
               for f, p in zip(frames, preds, strict=True) if np.isfinite(p["energy"])]
    return _fit(shifted, None)


def errors(frames: list[Frame], preds: list[dict], shift) -> dict[str, float]:
    """MAE per file and over all: energy meV/atom, forces eV/Å, stress GPa."""
    rows: dict[str, list] = {}
    for f, p in zip(frames, preds, strict=True):
        if not np.isfinite(p["energy"]):  # a frame the model could not evaluate
            continue
        e = (p["energy"] + shift(f) - f.energy) / len(f.atoms)
        rows.setdefault(f.file, []).append(
            (abs(e), np.abs(p["forces"] - f.forces).sum(), f.forces.size,
             np.abs(np.asarray(p["stress"]).reshape(3, 3) - f.stress).mean() / GPa))
    out = {}
    for name, r in sorted(rows.items()):
        r = np.array(r, dtype=float)
        out[name] = {"n": len(r), "energy_mev_atom": 1000 * r[:, 0].mean(),
                     "forces_ev_a": r[:, 1].sum() / r[:, 2].sum(), "stress_gpa": r[:, 3].mean()}
    return out


def _voigt_to_full(stress: np.ndarray) -> np.ndarray:
    from ase.stress import voigt_6_to_full_3x3_stress

    return voigt_6_to_full_3x3_stress(stress)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--chgnet-python", help="Python of a venv with chgnet 0.4.2 (skipped if absent)")
    parser.add_argument("--offset-frames", type=int, default=500, help="Training frames per source for CHGNet's offsets.")
    parser.add_argument("--max-per-file", type=int, default=0, help="Evaluate at most this many frames per file (0: all).")
    parser.add_argument("--chgnet-only", action="store_true", help="Only compute (and cache) CHGNet's predictions.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    refs: References = references_of(model)
    if refs is None:
        raise SystemExit(f"{args.model}: not a potential (no reference energies in its metadata)")
    frames, fixed = read_all(args.data_dir)
    splits = trim_relaxed_val(frames, split_frames(frames, fixed), model.metadata["sampling"]["max_val_relaxed"])
    chosen = [frames[i] for i in splits[args.split]]
    if ids_digest([f.id for f in chosen]) != model.metadata.get(f"{args.split}_ids_sha256"):
        raise SystemExit(f"the recomputed {args.split} split does not match the checkpoint's {args.split}_ids_sha256")
    if args.max_per_file:
        kept: dict[str, int] = {}
        chosen = [f for f in chosen if kept.setdefault(f.file, 0) < args.max_per_file and not kept.update({f.file: kept[f.file] + 1})]
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": str(args.model), "split": args.split}
    if args.chgnet_python:
        chg = chgnet_predictions(args.chgnet_python, chosen, args.out / f"chgnet_{args.split}.npz")
        train_sub: dict[str, list[Frame]] = {}
        for i in sorted(splits["train"], key=lambda i: _unit_interval(frames[i].id)):
            f = frames[i]
            if len(train_sub.setdefault(f.source, [])) < args.offset_frames:
                train_sub[f.source].append(f)
        subset = [f for group in train_sub.values() for f in group]
        chg_train = chgnet_predictions(args.chgnet_python, subset, args.out / "chgnet_offset_frames.npz")
        mu = {s: offsets([f for f in subset if f.source == s],
                         [p for f, p in zip(subset, chg_train, strict=True) if f.source == s]) for s in train_sub}

        def shift(f: Frame) -> float:
            return sum(mu[f.source].get(int(z), 0.0) for z in f.atoms.numbers)

        result["chgnet"] = errors(chosen, chg, shift)
        result["chgnet_offset_frames"] = {s: len(v) for s, v in train_sub.items()}
    if args.chgnet_only:
        return
    preds = potential_predictions(model, chosen, args.batch_size)
    for p in preds:
        p["stress"] = _voigt_to_full(p["stress"])
    # The calculator reports network + Σ n μ of the default source; each source has its own μ.
    result["potential"] = errors(
        chosen, preds, lambda f: refs.energy(f.atoms.numbers, f.source) - refs.energy(f.atoms.numbers))
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(table(result, args.split))


def table(result: dict, split: str = "test") -> str:
    lines = [f"| {split} frames | n | E MAE (meV/atom) | F MAE (eV/Å) | σ MAE (GPa) | CHGNet E | CHGNet F | CHGNet σ |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in result["potential"].items():
        c = result.get("chgnet", {}).get(name)
        left_out = f" (n={c['n']})" if c and c["n"] != m["n"] else ""
        theirs = (f"{c['energy_mev_atom']:.0f}{left_out} | {c['forces_ev_a']:.3f} | {c['stress_gpa']:.2f}" if c else "- | - | -")
        lines.append(f"| {name} | {m['n']} | {m['energy_mev_atom']:.0f} | {m['forces_ev_a']:.3f} | "
                     f"{m['stress_gpa']:.2f} | {theirs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
