"""Do two sources' energies of the same material agree after their reference energies?

    python scripts/reference_consistency.py --data-dir ../shared/data \\
        --references in_training/dft-pes-atoms/references.json

For every extxyz frame whose trajectory id is the MP id of a relaxed mp-megnet structure of
the same reduced formula, compares the residual energies per atom the potential's network is
asked to learn, (E − Σ n μ_source)/N, of the frame and of the relaxed structure. Consistent
references leave differences of the order of the frame's thermal energy; the table prints
their mean, MAE and spread per file.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ase_crystalformer.potential import FORMATION_SOURCE, References, read_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--references", required=True, help="a potential run's references.json")
    args = parser.parse_args()
    refs = References.from_dict(json.loads(open(args.references).read()))
    frames, _ = read_all(args.data_dir)
    relaxed = {f.group: f for f in frames if f.source == FORMATION_SOURCE}

    def residual(f):
        return (f.energy - refs.energy(f.atoms.numbers, f.source)) / len(f.atoms)

    pairs: dict[str, list[tuple[float, float]]] = {}
    for f in frames:
        mp_id = "-".join(f.group.split("-")[:2])
        r = relaxed.get(mp_id)
        if f.source == FORMATION_SOURCE or r is None:
            continue
        if r.atoms.get_chemical_formula(empirical=True) == f.atoms.get_chemical_formula(empirical=True):
            pairs.setdefault(f.file, []).append((residual(f) - residual(r), float(np.abs(f.forces).mean())))
    print("| file | pairs | mean difference | MAE | std | frames' mean abs(F) |")
    print("|---|---|---|---|---|---|")
    for name, rows in sorted(pairs.items()):
        d, force = np.array(rows).T
        print(f"| {name} | {len(d)} | {d.mean():+.3f} eV/atom | {np.abs(d).mean():.3f} | {d.std():.3f} | {force.mean():.2f} eV/Å |")


if __name__ == "__main__":
    main()
