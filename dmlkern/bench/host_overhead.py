"""python -m dmlkern.bench.host_overhead: the host's work per fused loss call (forward + backward).

ops: aten ops that launch work (views and CPU-wrapped Python numbers excluded; each one kernel launch
or more on a GPU); before: how many precede the first engine kernel; views: view ops (host time only);
host us: wall time per call at a tiny --n, best of three (on CUDA with the launches; interpreted
Triton kernels make it meaningless). The calls take CUDA's branch-free path on CPU tensors too.
"""
import argparse
import collections
import os
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..fused import _common
from .specs import LOSSES
from .worker import build


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run inside it: `ops` (a Counter by name, views excluded),
    `views`, and `before`: how many ops ran before the first pair engine op (None if none)."""

    def __init__(self):
        super().__init__()
        self.ops, self.views, self.before = collections.Counter(), 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "overloadpacket", None)  # None: a higher-order op (a Triton launch)
        name = packet.__name__ if packet is not None else str(getattr(func, "__name__", func))
        if self.before is None and (name.startswith("pair_engine") or name.startswith("triton_kernel")):
            self.before = sum(self.ops.values())
        if getattr(func, "is_view", False):
            self.views += 1
        elif name != "scalar_tensor":  # a Python number wrapped on the CPU: no device launch
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def measure(loss, n, d, reps, device="cpu", dtype="fp32", c=1024):
    device = torch.device(device)
    spec = {"loss": loss, "provider": "dmlkern", "n": n, "d": d, "dtype": dtype, "seed": 0,
            "c": c if LOSSES[loss].classes else None}
    fn, backend, _, _ = build(spec, torch, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        fn().backward()

    for _ in range(3):
        step()
    with OpCounter() as counter:
        step()
    best = float("inf")
    for _ in range(3):  # best of three: these machines are noisy
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return backend(), counter, best * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--classes", type=int, default=1024, help="C of the class-weight losses")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", help="fp32, fp64, fp16 or bf16 (the half ones on CUDA)")
    ap.add_argument("--backend", default="auto", help="DMLKERN_BACKEND for the calls: auto, cpp, triton or reference")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--detail", action="store_true", help="list the ops of each call")
    args = ap.parse_args(argv)
    reps = 2 if args.device == "cpu" and args.backend == "triton" else args.reps  # interpreted: slow
    print(f"N={args.n} D={args.d} {args.dtype} {args.device} tensors, DMLKERN_BACKEND={args.backend}, "
          "CUDA's branch-free path; one forward + backward")
    print(f"{'loss':24s} {'backend':10s} {'ops':>5s} {'before':>6s} {'views':>6s} {'host us':>8s}")
    with mock.patch.dict(os.environ, DMLKERN_BACKEND=args.backend), \
            mock.patch.object(_common, "branch_free", lambda like: True):
        for loss in args.losses.split(","):
            ran, counter, us = measure(loss, args.n, args.d, reps, args.device, args.dtype, args.classes)
            before = "-" if counter.before is None else counter.before
            print(f"{loss:24s} {ran:10s} {sum(counter.ops.values()):5d} {before:>6} {counter.views:6d} {us:8.0f}")
            if args.detail:
                print("    " + ", ".join(f"{k} {v}" for k, v in counter.ops.most_common()))


if __name__ == "__main__":
    main()
