"""CHGNet predictions for every frame of an extxyz file, for comparison with the potential.

Runs in its own environment (CHGNet is not a dependency of this project):

    python -m venv /work/chgnet-venv
    /work/chgnet-venv/bin/pip install torch==2.13.0 && /work/chgnet-venv/bin/pip install chgnet==0.4.2
    /work/chgnet-venv/bin/python benchmarks/chgnet_predict.py frames.xyz chgnet.npz

Writes ``energy`` (n,) eV, ``forces`` (sum of atoms, 3) eV/Å and ``stress`` (n, 3, 3) eV/Å³
in ASE's sign convention (CHGNet's ASE calculator: GPa × ``units.GPa``).
"""

import sys

import numpy as np
from ase import units
from ase.io import read
from chgnet.model import CHGNet
from pymatgen.io.ase import AseAtomsAdaptor


def main(path: str, out: str, batch_size: int = 16) -> None:
    frames = read(path, ":")
    model = CHGNet.load(model_name="0.3.0", verbose=False)  # the weights chgnet 0.4.2 ships as default
    preds = []
    for start in range(0, len(frames), 64):  # chunks: all graphs at once need many GB
        structures = [AseAtomsAdaptor.get_structure(a) for a in frames[start : start + 64]]
        out = model.predict_structure(structures, task="efs", batch_size=batch_size)
        preds += out if isinstance(out, list) else [out]
    energy = np.array([p["e"] * len(a) for p, a in zip(preds, frames)])  # e is eV/atom
    forces = np.concatenate([p["f"] for p in preds])
    stress = np.array([np.asarray(p["s"]) * units.GPa for p in preds])
    if stress.shape[1:] == (6,):
        from ase.stress import voigt_6_to_full_3x3_stress

        stress = np.array([voigt_6_to_full_3x3_stress(s) for s in stress])
    np.savez(out, energy=energy, forces=forces, stress=stress, version=model.version or "")


if __name__ == "__main__":
    main(*sys.argv[1:3])
