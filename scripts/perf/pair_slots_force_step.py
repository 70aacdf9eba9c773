"""A force-training step and inference on eight 3x3x3 MP supercells (54-432 atoms, the pair-list path) with attention.PAIR_SLOTS patched (docs/benchmarks.md):

    python scripts/perf/pair_slots_force_step.py 65536; python scripts/perf/pair_slots_force_step.py 16384
"""
import sys, time, torch, resource
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2] / 'benchmarks'))
import _common
torch.set_num_threads(1)
import ase_crystalformer.attention as A
A.PAIR_SLOTS = int(sys.argv[1])
from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec, forces
from ase_crystalformer.geometry import collate, windows_for
atoms, _ = _common.load_first(_common.default_data(), 16)
big = [a * (3, 3, 3) for a in atoms[:8]]
print('atoms', [len(a) for a in big])
torch.manual_seed(0)
model = Crystalformer(ModelConfig(targets=(TargetSpec("energy", "eV/atom", kind="energy"),)))
batch = collate(windows_for(big, 10.0))
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
def step():
    out = forces.energy_forces_stress(model, batch, create_graph=True)
    loss = out['energy'].abs().mean() + out['forces'].abs().mean() + out['stress'].abs().mean()
    opt.zero_grad(); loss.backward(); opt.step()
def infer():
    with torch.no_grad(): model(batch)
for name, f in (('fs-step', step), ('infer', infer)):
    f(); ts = []
    for _ in range(3):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    print(sys.argv[1], name, round(min(ts), 3), 's')
print('rss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)
