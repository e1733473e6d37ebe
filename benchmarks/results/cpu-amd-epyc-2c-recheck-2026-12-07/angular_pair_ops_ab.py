"""AngularLoss N=8192 A/B: pair ops on vs off (runs_kernel False), interleaved with T_mm."""
import statistics, time, torch
from dmlkern import losses
from dmlkern.ops import pair_dots_op
import dmlkern.fused.angular as ang
N, D = 8192, 128
torch.manual_seed(0)
x = torch.randn(N, D, requires_grad=True)
labels = (torch.arange(N) // 8)[torch.randperm(N)]
orig = pair_dots_op.runs_kernel
def step(on):
    pair_dots_op.runs_kernel = orig if on else (lambda a, b: False)
    t = time.perf_counter(); losses.AngularLoss()(x, labels).backward(); x.grad = None
    return time.perf_counter() - t
def mm():
    xd = x.detach(); t = time.perf_counter(); xd @ xd.T; return time.perf_counter() - t
step(True); step(False)
on, off, tm = [], [], []
for r in range(8):
    tm.append(mm()); on.append(step(True)); tm.append(mm()); off.append(step(False))
T = statistics.median(tm)
print(f"T_mm {T*1e3:.0f} ms; ops on {statistics.median(on)/T:.2f}; off {statistics.median(off)/T:.2f}")
