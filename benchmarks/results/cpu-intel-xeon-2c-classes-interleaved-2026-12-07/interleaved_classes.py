"""Issue 16's class-weight losses at N=1024, C=2^20, D=128, fp32, forward + backward, interleaved
with T_mm (x @ W in 512-row blocks into a reused output, as the bench's matmul floor) in one
process: rounds of [T_mm, loss] for each loss; median time / median T_mm."""
import statistics, sys, time, torch
from dmlkern import losses
N, D, C, ROUNDS = 1024, 128, 1 << 20, int(sys.argv[1]) if len(sys.argv) > 1 else 3
names = sys.argv[2].split(",") if len(sys.argv) > 2 else [
    "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "NormalizedSoftmaxLoss", "LargeMarginSoftmaxLoss",
    "ProxyNCALoss", "SoftmaxLoss"]
torch.manual_seed(0)
x = torch.randn(N, D, requires_grad=True)
labels = torch.randint(0, C, (N,))
out = torch.empty(512, C)
def mm(W):
    W = W.detach(); xd = x.detach(); t = time.perf_counter()
    for i in range(0, N, 512):
        torch.mm(xd[i:i + 512], W, out=out)
    return time.perf_counter() - t
print(f"N={N} C={C} D={D}, {ROUNDS} rounds, {torch.get_num_threads()} threads")
print("| loss | median time | median T_mm | × T_mm | range × T_mm (each round's T_mm) |\n|---|---:|---:|---:|---:|")
for name in names:
    loss = getattr(losses, name)(num_classes=C, embedding_size=D)
    W = loss.proxies if hasattr(loss, "proxies") else loss.W
    Wmm = W.t() if W.shape[0] == C else W  # (D, C) for x @ W
    def step():
        t = time.perf_counter(); loss(x, labels).backward(); r = time.perf_counter() - t
        x.grad = None; W.grad = None; return r
    step()
    ts, tm, ratios = [], [], []
    for r in range(ROUNDS):
        tm.append(mm(Wmm)); ts.append(step()); ratios.append(ts[-1] / tm[-1])
    T, S = statistics.median(tm), statistics.median(ts)
    print(f"| {name} | {S:.2f} s | {T:.2f} s | {S/T:.2f} | {min(ratios):.2f}-{max(ratios):.2f} |", flush=True)
    del loss, W, Wmm
