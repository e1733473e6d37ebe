# One class loss at N=1024, C=2^20: median step and T_mm over 3 rounds; run alternately from two checkouts (PYTHONPATH) to compare builds.
import statistics, sys, time, torch, dmlkern
from dmlkern import losses
N, D, C = 1024, 128, 1 << 20
torch.manual_seed(0)
x = torch.randn(N, D, requires_grad=True); labels = torch.randint(0, C, (N,))
out = torch.empty(512, C)
loss = getattr(losses, sys.argv[1])(num_classes=C, embedding_size=D)
W = loss.W
def mm():
    t = time.perf_counter()
    for i in range(0, N, 512): torch.mm(x.detach()[i:i+512], W.detach(), out=out)
    return time.perf_counter() - t
def step():
    t = time.perf_counter(); loss(x, labels).backward(); r = time.perf_counter() - t; x.grad = None; W.grad = None; return r
step(); mm()
ts, tm = [], []
for r in range(3): tm.append(mm()); ts.append(step())
print(dmlkern.__file__.split('/')[1], sys.argv[1], f"step {statistics.median(ts):.2f} s  T_mm {statistics.median(tm):.2f} s  ratio {statistics.median(ts)/statistics.median(tm):.2f}", flush=True)
