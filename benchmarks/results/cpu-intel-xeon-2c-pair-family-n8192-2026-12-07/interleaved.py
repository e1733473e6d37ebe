"""Issue 15's pair family at N=8192, D=128, fp32, forward + backward, interleaved with T_mm
(x @ x.T) in one process: rounds of [T_mm, every loss once]; median time / median T_mm."""
import statistics, sys, time, torch
from dmlkern import losses, miners
N, D, ROUNDS = 8192, 128, int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.manual_seed(0)
x = torch.randn(N, D, requires_grad=True)
labels = (torch.arange(N) // 8)[torch.randperm(N)]
simclr = torch.cat([torch.arange(N // 2)] * 2)
cases = {
    "multi_similarity_miner": lambda e: losses.MultiSimilarityLoss()(e, labels, miners.MultiSimilarityMiner()(e, labels)),
    "multi_similarity": lambda e: losses.MultiSimilarityLoss()(e, labels),
    "ntxent": lambda e: losses.NTXentLoss()(e, simclr),
    "supcon": lambda e: losses.SupConLoss()(e, labels),
    "lifted": lambda e: losses.LiftedStructureLoss()(e, labels),
    "generalized_lifted": lambda e: losses.GeneralizedLiftedStructureLoss()(e, labels),
    "contrastive": lambda e: losses.ContrastiveLoss()(e, labels),
    "contrastive_pair_margin": lambda e: losses.ContrastiveLoss()(e, labels, miners.PairMarginMiner()(e, labels)),
    "margin": lambda e: losses.MarginLoss()(e, labels),
    "nca": lambda e: losses.NCALoss()(e, labels),
    "tuplet_margin": lambda e: losses.TupletMarginLoss()(e, labels),
    "circle": lambda e: losses.CircleLoss()(e, labels),
    "angular": lambda e: losses.AngularLoss()(e, labels),
    "triplet": lambda e: losses.TripletMarginLoss()(e, labels),
    "triplet_semihard": lambda e: losses.TripletMarginLoss()(e, labels, miners.TripletMarginMiner(type_of_triplets="semihard")(e, labels)),
    "triplet_batch_hard": lambda e: losses.TripletMarginLoss()(e, labels, miners.BatchHardMiner()(e, labels)),
}
def step(f):
    t = time.perf_counter(); f(x).backward(); x.grad = None; return time.perf_counter() - t
def mm():
    xd = x.detach(); t = time.perf_counter(); xd @ xd.T; return time.perf_counter() - t
for f in cases.values(): step(f)
times = {k: [] for k in cases}; tm = []
for r in range(ROUNDS):
    for k, f in cases.items():
        tm.append(mm()); times[k].append(step(f))
T = statistics.median(tm)
print(f"T_mm median {T*1e3:.0f} ms (range {min(tm)*1e3:.0f}-{max(tm)*1e3:.0f}), {ROUNDS} rounds, {torch.get_num_threads()} threads")
print("| loss | median time | × T_mm | range × T_mm |\n|---|---:|---:|---:|")
for k, v in times.items():
    m = statistics.median(v)
    print(f"| {k} | {m*1e3:.0f} ms | {m/T:.2f} | {min(v)/T:.2f}-{max(v)/T:.2f} |")
