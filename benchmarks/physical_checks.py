"""Physical checks of a potential: relaxations from DFT cells, symmetry, phonons, NVE drift.

    python benchmarks/physical_checks.py --model dft-pes --data-dir ../shared/data [--n-mp 100]

``--model chgnet`` runs the same checks on CHGNet 0.4.2's own ASE calculator (its default
weights, float32 as CHGNet ships), from a venv that holds chgnet and this package, e.g.
``/work/chgnet-venv/bin/pip install -e .[phonopy]`` in the CHGNet venv of
``benchmarks/chgnet_predict.py``; chgnet is never a dependency of the package.

Prints one markdown table (check, value, criterion, pass) and writes it with the details to
``--out``/physical_checks.json. The checks:

* the shipped example structures (examples/structures/*.cif, DFT-relaxed MP cells) and
  ``--n-mp`` DFT-relaxed MP structures of the MEGNet test split (the first by sha256 of the
  id, at most ``--max-atoms`` atoms), relaxed from their DFT cells (FIRE + FrechetCellFilter,
  fmax 0.05 eV/Å): median and max |ΔV/V|; the largest force at the DFT cell (median over structures);
* diamond Si from a = 5.2 Å and 5.7 Å (conventional) relaxed; error against its DFT cell;
* rattled NaCl (0.1 Å, 2×2×2 primitive cells) relaxed; its spglib space group at symprec 0.05;
* phonons (2×2×2 supercell, float64) of relaxed Si (highest Γ frequency vs 15.3 THz, lowest
  frequency) and NaCl (lowest frequency);
* NVE MD of 64 Si atoms (velocity Verlet, 1 fs, Maxwell–Boltzmann at 300 K): total-energy
  drift over the run in meV/atom (last 100 steps' mean minus first 100 steps' mean), the
  largest excursion and the temperature at the end (a stable crystal ends near 150 K).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import spglib
import torch
from ase import units
from ase.build import bulk
from ase.io import read
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

from ase_crystalformer.calculator import CrystalformerCalculator
from ase_crystalformer.data import load_dataset
from ase_crystalformer.phonons import run_phonons
from ase_crystalformer.potential import DEFAULT_POTENTIAL
from ase_crystalformer.relax import relax

ROOT = Path(__file__).resolve().parent.parent
SI_DFT = 5.469  # Å, mp-149 (PBE), the conventional cell of examples/structures/Si_mp-149.cif


def _max_force(calc, structures) -> list[float]:
    if isinstance(calc, CrystalformerCalculator):  # batched
        forces = [v["forces"] for v in calc.predict(structures, properties=["forces"])]
    else:
        forces = [calc.get_forces(atoms) for atoms in structures]
    return [float(np.linalg.norm(f, axis=1).max()) for f in forces]


def calculators(model: str):
    """The calculator for relaxations and MD, and what ``run_phonons`` takes: for a
    Crystalformer model its name (phonons then run in float64), for CHGNet its calculator."""
    if model == "chgnet":
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        calc = CHGNetCalculator(model=CHGNet.load(model_name="0.3.0", verbose=False), use_device="cpu")
        return calc, calc
    return CrystalformerCalculator(model), model


def relax_from_dft(calc, structures, steps: int) -> dict:
    f_dft = _max_force(calc, structures)
    results = relax(structures, calc, fmax=0.05, steps=steps)
    dv = [abs(r.atoms.get_volume() / s.get_volume() - 1) for r, s in zip(results, structures, strict=True)]
    return {"n": len(structures), "median_dV": statistics.median(dv), "max_dV": max(dv),
            "median_maxF_dft": statistics.median(f_dft), "converged": sum(r.converged for r in results),
            "per_structure": [{"formula": s.get_chemical_formula(), "dV": d, "maxF_dft": f, "converged": r.converged,
                               "steps": r.steps} for s, d, f, r in zip(structures, dv, f_dft, results, strict=True)]}


def mp_test_structures(data_dir: str, n: int, max_atoms: int) -> list:
    dataset = load_dataset("mp-megnet", ["e_form"], data_dir=data_dir)
    test = [r for r in dataset.subset("test") if len(r.atoms) <= max_atoms]
    test.sort(key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
    return [r.atoms for r in test[:n]]


def silicon(calc, steps: int) -> dict:
    out = {}
    for a0 in (5.2, 5.7):
        r = relax(bulk("Si", "diamond", a0, cubic=True), calc, fmax=0.01, steps=steps)[0]
        a = r.atoms.get_volume() ** (1 / 3)
        out[f"from_{a0}"] = {"a": a, "error": a / SI_DFT - 1, "converged": r.converged}
    return out


def nacl_symmetry(calc, steps: int) -> dict:
    atoms = read(ROOT / "examples/structures/NaCl_mp-22862.cif").repeat(2)
    atoms.rattle(0.1, seed=7)
    r = relax(atoms, calc, fmax=0.01, steps=steps)[0]
    cell = (r.atoms.cell[:], r.atoms.get_scaled_positions(), r.atoms.numbers)
    return {"spacegroup": spglib.get_spacegroup(cell, symprec=0.05), "converged": r.converged, "steps": r.steps}


def phonons(model, calc, steps: int) -> dict:
    out = {}
    for name, path in (("Si", "Si_mp-149.cif"), ("NaCl", "NaCl_mp-22862.cif")):
        atoms = relax(read(ROOT / "examples/structures" / path), calc, fmax=0.005, steps=steps)[0].atoms
        atoms.calc = None
        result = run_phonons(atoms, model, supercell=(2, 2, 2), mesh=(8, 8, 8))
        result.phonopy.run_qpoints([[0, 0, 0]])
        gamma = np.asarray(result.phonopy.get_qpoints_dict()["frequencies"])[0]
        out[name] = {"max_gamma_THz": float(gamma.max()), "min_THz": result.min_frequency}
    return out


def nve_drift(calc, steps: int) -> dict:
    atoms = bulk("Si", "diamond", SI_DFT, cubic=True).repeat(2)  # 64 atoms
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    e = np.array(energies) / len(atoms) * 1000  # meV/atom
    k = max(1, len(e) // 10)
    return {"steps": steps, "drift_meV_atom": float(e[-k:].mean() - e[:k].mean()),
            "max_excursion_meV_atom": float(np.abs(e - e[0]).max()),
            "temperature_end_K": float(atoms.get_temperature())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_POTENTIAL, help="a potential (name or path), or chgnet")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--n-mp", type=int, default=100)
    parser.add_argument("--max-atoms", type=int, default=40)
    parser.add_argument("--steps", type=int, default=500, help="Optimizer steps per relaxation.")
    parser.add_argument("--md-steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/physical_checks"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    calc, phonon_model = calculators(args.model)
    start = time.perf_counter()
    examples = [read(p) for p in sorted((ROOT / "examples/structures").glob("*.cif"))]
    report = {"model": args.model, "examples": relax_from_dft(calc, examples, args.steps)}
    report["mp_test"] = relax_from_dft(calc, mp_test_structures(args.data_dir, args.n_mp, args.max_atoms), args.steps)
    report["si"] = silicon(calc, args.steps)
    report["nacl"] = nacl_symmetry(calc, args.steps)
    report["phonons"] = phonons(phonon_model, calc, args.steps)
    report["md"] = nve_drift(calc, args.md_steps)
    report["wall_s"] = round(time.perf_counter() - start)
    (args.out / "physical_checks.json").write_text(json.dumps(report, indent=2))
    print(table(report))


def table(r: dict) -> str:
    ex, mp, si, ph, md = r["examples"], r["mp_test"], r["si"], r["phonons"], r["md"]
    rows = [
        (f"examples ({ex['n']}): median / max abs(dV/V)", f"{ex['median_dV']:.1%} / {ex['max_dV']:.1%}",
         "<= 3 % / <= 10 %", ex["median_dV"] <= 0.03 and ex["max_dV"] <= 0.10),
        (f"MP test ({mp['n']}): median / max abs(dV/V)", f"{mp['median_dV']:.1%} / {mp['max_dV']:.1%}",
         "<= 3 % / <= 10 %", mp["median_dV"] <= 0.03 and mp["max_dV"] <= 0.10),
        ("MP test: median largest force at the DFT cell", f"{mp['median_maxF_dft']:.3f} eV/Å", "<= 0.05 eV/Å",
         mp["median_maxF_dft"] <= 0.05),
        ("MP test: relaxations converged", f"{mp['converged']} / {mp['n']}", "-", None),
    ]
    for key, s in si.items():
        rows.append((f"Si {key.replace('_', ' ')} Å: a", f"{s['a']:.3f} Å ({s['error']:+.1%})", "within 1.5 % of 5.469 Å",
                     abs(s["error"]) <= 0.015))
    rows.append(("rattled NaCl relaxed: space group (symprec 0.05)", r["nacl"]["spacegroup"], "Fm-3m (225)",
                 "(225)" in str(r["nacl"]["spacegroup"])))
    rows.append(("Si phonons: highest Γ frequency", f"{ph['Si']['max_gamma_THz']:.2f} THz", "15.3 THz ± 20 %",
                 abs(ph["Si"]["max_gamma_THz"] / 15.3 - 1) <= 0.2))
    rows.append(("Si phonons: lowest frequency", f"{ph['Si']['min_THz']:.2f} THz", ">= -0.3 THz", ph["Si"]["min_THz"] >= -0.3))
    rows.append(("NaCl phonons: lowest frequency", f"{ph['NaCl']['min_THz']:.2f} THz", ">= -0.3 THz",
                 ph["NaCl"]["min_THz"] >= -0.3))
    rows.append((f"NVE MD, 64 Si, 300 K, {md['steps']} × 1 fs: drift", f"{md['drift_meV_atom']:+.3f} meV/atom "
                 f"(max excursion {md['max_excursion_meV_atom']:.2f})", "abs <= 1 meV/atom", abs(md["drift_meV_atom"]) <= 1))
    # Started from perfect sites at 300 K, a stable crystal shares its kinetic energy with the
    # potential and ends near 150 K; a much hotter end means the cell released potential
    # energy: it left diamond Si for a lower minimum of the model (energy conservation alone does not show this).
    rows.append(("NVE MD: temperature at the end (from 300 K at perfect sites)", f"{md['temperature_end_K']:.0f} K",
                 "near 150 K if the crystal stays in its minimum (informational)", None))
    lines = ["| check | value | criterion | pass |", "|---|---|---|---|"]
    for name, value, criterion, ok in rows:
        lines.append(f"| {name} | {value} | {criterion} | {'-' if ok is None else 'yes' if ok else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
