"""Inference at batch 128 with the attention's 1-D slot gather done by gather, index_select, take or advanced indexing, alternating in one process (docs/benchmarks.md):

    python scripts/perf/slot_gather_ab.py 2
"""
"""A/B within one process: alternate variants of attention's slot gather, forward at batch 128."""
import sys, time, torch, statistics
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2] / 'benchmarks'))
import _common
torch.set_num_threads(int(sys.argv[1]))
import ase_crystalformer.attention as A
from ase_crystalformer import Crystalformer, ModelConfig, TargetSpec
from ase_crystalformer.geometry import collate, windows_for
atoms, _ = _common.load_first(_common.default_data(), 128)
torch.manual_seed(0)
model = Crystalformer(ModelConfig(targets=(TargetSpec("energy", "eV/atom", kind="energy"),))).eval()
batch = collate(windows_for(atoms, 10.0))
orig = torch.Tensor.gather
variants = {
  'gather': None,
  'index_select': lambda self, dim, index: self.index_select(0, index) if self.dim() == 1 and dim == 0 else orig(self, dim, index),
  'take': lambda self, dim, index: torch.take(self, index) if self.dim() == 1 and dim == 0 else orig(self, dim, index),
  'adv': lambda self, dim, index: self[index] if self.dim() == 1 and dim == 0 else orig(self, dim, index),
}
times = {k: [] for k in variants}
with torch.no_grad():
    ref = model(batch)
    for rep in range(8):
        for k, f in variants.items():
            torch.Tensor.gather = f or orig
            s = time.perf_counter(); out = model(batch); times[k].append(time.perf_counter() - s)
            torch.Tensor.gather = orig
            assert torch.equal(out, ref), k
for k, v in times.items():
    print(sys.argv[1], k, round(statistics.median(v) * 1e3, 1), 'ms', round(128 / statistics.median(v)), '/s')
