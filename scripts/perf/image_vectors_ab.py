"""geometry.image_vectors (cur) against formulations with index_select (new; new2, the committed one), A/B in one process on 128 MP structures, without and with gradients (docs/benchmarks.md):

    python scripts/perf/image_vectors_ab.py 1; python scripts/perf/image_vectors_ab.py 2

Run at commit 9111158 (before image_vectors itself used index_select).
"""
import sys, time, torch, statistics
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2] / 'benchmarks'))
import _common
torch.set_num_threads(int(sys.argv[1]))
from ase_crystalformer.geometry import collate, windows_for, image_vectors
atoms, energy = _common.load_first(_common.default_data(), 128)
batch = collate(windows_for(atoms, 10.0))
def cur(b):
    r = image_vectors(b); return (r * r).sum(-1)
def new(b):
    n, m = b.neighbor.shape
    L = b.cells.index_select(0, b.crystal)  # (N, 3, 3)
    s = b.shift
    t = s[..., 0:1] * L[:, None, 0] + s[..., 1:2] * L[:, None, 1] + s[..., 2:3] * L[:, None, 2]
    r = b.positions.index_select(0, b.neighbor.view(-1)).view(n, m, 3) - b.positions[:, None, :] + t
    return (r * r).sum(-1)
def new2(b):
    n, m = b.neighbor.shape
    L = b.cells.index_select(0, b.crystal)
    t = torch.matmul(b.shift, L)
    r = b.positions.index_select(0, b.neighbor.view(-1)).view(n, m, 3) - b.positions[:, None, :] + t
    return (r * r).sum(-1)
ref = cur(batch)
for f in (new, new2):
    print(f.__name__, (f(batch) - ref).abs().max().item())
T = {f.__name__: [] for f in (cur, new, new2)}
G = {f.__name__: [] for f in (cur, new, new2)}
from dataclasses import replace
for rep in range(15):
    for f in (cur, new, new2):
        with torch.no_grad():
            s = time.perf_counter(); f(batch); T[f.__name__].append(time.perf_counter() - s)
        p = batch.positions.clone().requires_grad_(True); c = batch.cells.clone().requires_grad_(True)
        bb = replace(batch, positions=p, cells=c)
        s = time.perf_counter(); d2 = f(bb); torch.autograd.grad(d2.sum(), (p, c)); G[f.__name__].append(time.perf_counter() - s)
for k in T:
    print(sys.argv[1], k, 'nograd ms', round(statistics.median(T[k]) * 1e3, 2), 'fwd+bwd ms', round(statistics.median(G[k]) * 1e3, 2))
