"""How far the total-energy sources' labels sit from MP's formation-energy scale, per source.

    python scripts/reference_gap.py --data-dir ../shared/data

For each total-energy source: least squares of E/N − ê (ê: the shipped mp-e_form's
formation energy of the frame, ``potential.formation_estimates``) on the potential's training
frames, with per-element terms ("linear", the aligned references) and with per-element terms
that differ in oxides and fluorides too ("anion", an MP-style correction scheme); the MAE
left on the training and validation frames. If "anion" does not shrink the validation MAE,
the gap is not such a correction.
"""

from __future__ import annotations

import argparse

import numpy as np

from ase_crystalformer import potential as P


def features(frame: P.Frame, kind: str) -> np.ndarray:
    z = frame.atoms.numbers
    x = np.zeros(99)
    np.add.at(x, z, 1.0 / len(z))
    if kind == "linear":
        return x
    oxide, fluoride = float(8 in z), float(9 in z)
    return np.concatenate([x, x * oxide, x * fluoride, [oxide, fluoride]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    frames, fixed = P.read_all(args.data_dir)
    splits = P.split_frames(frames, fixed)
    sets = {name: [frames[i] for i in splits[name] if frames[i].source != P.FORMATION_SOURCE] for name in ("train", "val")}
    gaps = {name: np.array([f.energy / len(f.atoms) for f in fs]) - P.formation_estimates(fs) for name, fs in sets.items()}
    print("| references | source | train frames | train MAE (eV/atom) | val MAE (eV/atom) |\n|---|---|---|---|---|")
    for kind in ("linear", "anion"):
        for source in sorted({f.source for f in sets["train"]}):
            rows = {n: [k for k, f in enumerate(fs) if f.source == source] for n, fs in sets.items()}
            a = {n: np.array([features(sets[n][k], kind) for k in rows[n]]) for n in rows}
            b = {n: gaps[n][rows[n]] for n in rows}
            w = np.linalg.solve(a["train"].T @ a["train"] + P.RIDGE * np.eye(a["train"].shape[1]), a["train"].T @ b["train"])
            print(f"| {kind} | {source} | {len(rows['train'])} | {np.abs(a['train'] @ w - b['train']).mean():.3f} "
                  f"| {np.abs(a['val'] @ w - b['val']).mean():.3f} |")


if __name__ == "__main__":
    main()
