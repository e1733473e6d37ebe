"""python -m dmlkern.bench.small_batches: time per training step (forward + backward) at small
batches, where host overhead decides: PML, dmlkern as it runs by default (the small-problem rules
DMLKERN_SMALL_PAIRS / DMLKERN_SMALL_CLASS_LOGITS on), and dmlkern with both rules off (its fused
paths), interleaved in one process: the best of --rounds rounds of --reps steps each. (The main
sweep's one process per point swings by +-50 % below ~2 ms a step; this does not.) Prints a
markdown table: ms per step, what ran, and dmlkern's time over PML's and over its fused path's.
The thresholds' README numbers come from it.
"""
import argparse
import time

import torch

from ..fused import _common, class_softmax
from .specs import LOSSES
from .worker import build, train_step

DEFAULT_LOSSES = ["supcon", "npairs", "triplet_batch_hard", "contrastive_pair_margin", "multi_similarity", "ntxent",
                  "arcface", "cosface", "normalized_softmax", "proxy_nca", "subcenter_arcface"]
PROVIDERS = ["pml", "dmlkern", "dmlkern-fused"]


def _step(spec, fused_only):
    """(step, backend) of one provider's call; fused_only turns the small-problem rules off around it."""
    fn, backend, x, params = build({**spec, "provider": "pml" if spec["provider"] == "pml" else "dmlkern"}, torch,
                                   torch.device("cpu"))
    step = train_step(fn, x, params)
    if not fused_only:
        return step, backend

    def fused_step():
        pairs, logits = _common.SMALL_PROBLEM_PAIRS, class_softmax.SMALL_PROBLEM_LOGITS
        _common.SMALL_PROBLEM_PAIRS = class_softmax.SMALL_PROBLEM_LOGITS = 0
        try:
            step()
        finally:
            _common.SMALL_PROBLEM_PAIRS, class_softmax.SMALL_PROBLEM_LOGITS = pairs, logits

    return fused_step, backend


def measure(loss, n, d, classes, reps, rounds):
    """{provider: (best seconds per step, backend name)} for one loss at one N, interleaved."""
    steps = {}
    for provider in PROVIDERS:
        spec = {"loss": loss, "provider": provider, "n": n, "d": d, "dtype": "fp32", "seed": 0,
                "c": classes if LOSSES[loss].classes else None}
        step, backend = _step(spec, provider == "dmlkern-fused")
        for _ in range(3):  # warm-up (first-call work)
            step()
        steps[provider] = (step, backend)
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for provider, (step, _) in steps.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            best[provider] = min(best[provider], (time.perf_counter() - t0) / reps)
    return {p: (best[p], steps[p][1]()) for p in steps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100, help="C of the class-weight losses")
    ap.add_argument("--losses", default=",".join(DEFAULT_LOSSES))
    ap.add_argument("--reps", type=int, default=15, help="steps per round")
    ap.add_argument("--rounds", type=int, default=9, help="rounds per provider (interleaved); the best counts")
    args = ap.parse_args(argv)
    print(f"CPU, {torch.get_num_threads()} threads, fp32, D={args.d}, forward + backward; ms per step "
          f"(best of {args.rounds} x {args.reps}); C={args.classes} for the class-weight losses; "
          f"DMLKERN_SMALL_PAIRS={_common.SMALL_PROBLEM_PAIRS}, DMLKERN_SMALL_CLASS_LOGITS={class_softmax.SMALL_PROBLEM_LOGITS}")
    print("| loss | N | PML | dmlkern | ran | fused | ran | dmlkern / PML | dmlkern / fused |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |")
    for loss in args.losses.split(","):
        for n in args.n:
            got = measure(loss, n, args.d, args.classes, args.reps, args.rounds)
            (pml, _), (ours, ran), (fused, fused_ran) = (got[p] for p in PROVIDERS)
            print(f"| {loss} | {n} | {pml * 1e3:.2f} | {ours * 1e3:.2f} | {ran} | {fused * 1e3:.2f} | {fused_ran} | "
                  f"{ours / pml:.2f} | {ours / fused:.2f} |", flush=True)


if __name__ == "__main__":
    main()
