"""Peak RSS and time of energy + forces + stress on an n³ fcc Al cell with attention.PAIR_SLOTS patched
(docs/benchmarks.md, the nineteenth session's sweep). One process per setting:

    python scripts/perf/pair_slots_sweep.py THREADS PAIR_SLOTS [N]
    for n in 13 15 17 19; do for s in 16384 65536; do python scripts/perf/pair_slots_sweep.py 1 $s $n; done; done
"""
import sys, time, torch, resource
torch.set_num_threads(int(sys.argv[1]))
import ase_crystalformer.attention as A
if len(sys.argv) > 2: A.PAIR_SLOTS = int(sys.argv[2])
from ase.build import bulk
from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec, forces
from ase_crystalformer.geometry import collate, windows_for
atoms = bulk("Al", "fcc", a=4.05) * ((int(sys.argv[3]),)*3 if len(sys.argv) > 3 else (17,17,17))
torch.manual_seed(0)
model = Crystalformer(ModelConfig(targets=(TargetSpec("energy", "eV/atom", kind="energy"),))).eval()
s = time.perf_counter()
batch = collate(windows_for([atoms], model.config.cutoff))
out = forces.energy_forces_stress(model, batch)
print(sys.argv[1:], 'time', round(time.perf_counter()-s,1), 'maxrss MiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, out['energy'].item())
