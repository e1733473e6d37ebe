"""PML's README / docs examples, one fresh process per (library, example, N): one forward + backward
(after one warm-up call at N <= 1024), its time, the process's peak RSS (ru_maxrss, torch included)
and which path dmlkern ran. CPU, fp32, D=128, N/8 classes of 8.
python readme_examples.py            -> the table (runs each case in a subprocess)"""
import resource
import subprocess
import sys
import time

EXAMPLES = {
    "triplet+ms_miner": "loss = L.TripletMarginLoss(); miner = M.MultiSimilarityMiner()\n"
                        "call = lambda: loss(x, y, miner(x, y))",
    "triplet+threshold+lp_reg": "loss = L.TripletMarginLoss(distance=D.CosineSimilarity(), "
                                "reducer=R.ThresholdReducer(high=0.3), embedding_regularizer=G.LpRegularizer())\n"
                                "call = lambda: loss(x, y)",
    "margin+ms_miner": "loss = L.MarginLoss(); miner = M.MultiSimilarityMiner()\ncall = lambda: loss(x, y, miner(x, y))",
    "xbm(triplet, ms_miner)": "loss = L.CrossBatchMemory(L.TripletMarginLoss(), 128, memory_size=2 * N, "
                              "miner=M.MultiSimilarityMiner())\ncall = lambda: loss(x, y)",
    "self_supervised(triplet)": "loss = L.SelfSupervisedLoss(L.TripletMarginLoss())\ncall = lambda: loss(x, r)",
}
CASE = """
import sys, time, resource, torch
lib, N = sys.argv[1], int(sys.argv[2])
if lib == "pml":
    from pytorch_metric_learning import losses as L, miners as M, reducers as R, distances as D, regularizers as G
else:
    from dmlkern import losses as L, miners as M, reducers as R, distances as D, regularizers as G
torch.manual_seed(0)
x = torch.randn(N, 128, requires_grad=True); y = torch.randint(0, N // 8, (N,)); r = torch.randn(N, 128, requires_grad=True)
{body}
if N <= 1024 and lib == "dmlkern":
    call().backward()
t = time.perf_counter(); v = call(); v.backward(); t = time.perf_counter() - t
inner = getattr(loss, "loss", loss)
print(f"{{t:.3f}}|{{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}}|{{getattr(inner, 'last_backend', '-')}}|{{float(v):.6g}}")
"""

if __name__ == "__main__":
    print("| example | N | PML | dmlkern | dmlkern path | values (PML, dmlkern) |\n| --- | ---: | --- | --- | --- | --- |")
    for name, body in EXAMPLES.items():
        for n in (1024, 4096):
            out = {}
            for lib in ("pml", "dmlkern") if n == 1024 else ("dmlkern",):
                p = subprocess.run([sys.executable, "-c", CASE.format(body=body), lib, str(n)], capture_output=True,
                                   text=True, timeout=600)
                out[lib] = p.stdout.strip().splitlines()[-1].split("|") if p.returncode == 0 else \
                    ["failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:60], "", "", ""]
            cell = lambda o: f"{o[0]} s, {o[1]} MiB" if o[1] else o[0]
            pml = out.get("pml")
            print(f"| {name} | {n} | {cell(pml) if pml else 'not run'} | {cell(out['dmlkern'])} | {out['dmlkern'][2]} "
                  f"| {pml[3] if pml else '-'}, {out['dmlkern'][3]} |", flush=True)
