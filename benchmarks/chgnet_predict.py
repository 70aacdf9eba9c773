"""CHGNet predictions for every frame of an extxyz file, for comparison with the potential.

Runs in its own environment (CHGNet is not a dependency of this project):

    python -m venv /work/chgnet-venv
    /work/chgnet-venv/bin/pip install torch==2.13.0 && /work/chgnet-venv/bin/pip install chgnet==0.4.2
    /work/chgnet-venv/bin/python benchmarks/chgnet_predict.py frames.xyz chgnet.npz

Writes ``energy`` (n,) eV, ``forces`` (sum of atoms, 3) eV/Å and ``stress`` (n, 3, 3) eV/Å³
in ASE's sign convention (CHGNet's ASE calculator: GPa × ``units.GPa``); NaN for frames left
out (``MAX_PAIRS_PER_ATOM``).
"""

import resource
import sys

import numpy as np
from ase import units
from ase.io import read
from ase.neighborlist import neighbor_list
from chgnet.model import CHGNet
from pymatgen.io.ase import AseAtomsAdaptor

#: Frames with more neighbours within 5 Å per atom than this (extreme compression) are left
#: out (NaN): CHGNet's graphs for them do not fit in memory here.
MAX_PAIRS_PER_ATOM = 150
#: Address-space limit of this process, so that one frame cannot exhaust a shared machine.
MEMORY_LIMIT = 8 << 30


def main(path: str, out: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    frames = read(path, ":")
    model = CHGNet.load(model_name="0.3.0", verbose=False)  # the weights chgnet 0.4.2 ships as default
    energy, forces, stress = [], [], []
    for atoms in frames:  # one at a time: a few compressed frames need GBs of graph each
        pairs = len(neighbor_list("i", atoms, 5.0))  # CHGNet's atom-graph cutoff
        if pairs > MAX_PAIRS_PER_ATOM * len(atoms):
            energy.append(np.nan)
            forces.append(np.full((len(atoms), 3), np.nan))
            stress.append(np.full((3, 3), np.nan))
            continue
        try:
            p = model.predict_structure(AseAtomsAdaptor.get_structure(atoms), task="efs", batch_size=1)
        except (MemoryError, RuntimeError) as err:  # over MEMORY_LIMIT: leave the frame out
            print(f"frame {len(energy)}: {type(err).__name__}; left out", file=sys.stderr)
            pairs = np.inf
        if pairs == np.inf:
            energy.append(np.nan)
            forces.append(np.full((len(atoms), 3), np.nan))
            stress.append(np.full((3, 3), np.nan))
            continue
        energy.append(p["e"] * len(atoms))  # e is eV/atom
        forces.append(p["f"])
        stress.append(np.asarray(p["s"]).reshape(3, 3) * units.GPa)
    np.savez(out, energy=np.array(energy), forces=np.concatenate(forces), stress=np.array(stress),
             version=model.version or "")


if __name__ == "__main__":
    main(*sys.argv[1:3])
