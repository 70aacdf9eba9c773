"""The attention's slot gather + softmax + scatter on one 247 x 8 x 340 group: flat (rows, H, slots) index (cur) against row gathers over (entries, H) tables (new), 1 thread (docs/benchmarks.md):

    python scripts/perf/slot_gather_layouts.py
"""
import torch, time, statistics
import torch.nn.functional as F
torch.set_num_threads(1)
torch.manual_seed(0)
n, H, m, E = 247, 8, 340, 20000
idx2 = torch.randint(0, E, (n, m))
# make it locally structured like real data: rows' entries in a small range
base = torch.randint(0, E - 400, (n, 1)); idx2 = base + torch.randint(0, 300, (n, m))
h = torch.arange(H)
idx = (idx2[:, None, :] * H + h[None, :, None])  # flat (entries*H) layout [e][h]
qk2 = torch.randn(E + 1, H)
gam = -torch.rand(n, H, 1); d2 = torch.rand(n, 1, m) * 100
def cur(qk2, gam):
    logits = torch.addcmul(qk2.view(-1).gather(0, idx.view(-1)).view(n, H, m), gam, d2)
    w = logits.softmax(-1)
    pw = torch.zeros((E + 1) * H).scatter_add(0, idx.view(-1), w.reshape(-1))
    return w, pw
def new(qk2, gam):
    g = qk2.index_select(0, idx2.view(-1)).view(n, m, H).transpose(1, 2)
    logits = torch.addcmul(g, gam, d2)
    w = logits.softmax(-1)
    pw = torch.zeros(E + 1, H).index_add_(0, idx2.view(-1), w.transpose(1, 2).reshape(-1, H))
    return w, pw.view(-1)
a, b = cur(qk2, gam), new(qk2, gam)
print('same', (a[0]-b[0]).abs().max().item(), (a[1]-b[1]).abs().max().item())
g0 = torch.addcmul(qk2.index_select(0, idx2.view(-1)).view(n, m, H).transpose(1, 2), gam, d2)
print('addcmul out contiguous?', g0.is_contiguous(), g0.stride())
def t(f, grad=False, reps=20):
    ts = []
    for _ in range(reps):
        q = qk2.clone().requires_grad_(grad); gg = gam.clone().requires_grad_(grad)
        s = time.perf_counter(); w, pw = f(q, gg)
        if grad: torch.autograd.grad((w * 1.1).sum() + pw.sum() * 0.5, (q, gg))
        ts.append(time.perf_counter() - s)
    return round(statistics.median(ts) * 1e3, 2)
for r in range(2):
    print('cur fwd', t(cur), 'new fwd', t(new), 'cur fwd+bwd', t(cur, True), 'new fwd+bwd', t(new, True))
