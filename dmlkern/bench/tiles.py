"""Tile sweep for the Triton engine: time fused losses under a few tile settings in one run.

    python -m dmlkern.bench.tiles --device cuda --n 16384 --dtypes bf16 fp32 --out DIR

For each dtype and loss it runs forward + backward with the default tiles (dmlkern.triton.
tiles._tiles) and then with each setting of CONFIGS (through TILE_OVERRIDES), and reports
the median time, that time over one x @ x.T (T_mm) and whether the loss and gradient agree with
the default's. A setting that fails to compile (e.g. out of shared memory) is recorded as an
error and the sweep goes on. Writes DIR/tiles.json and DIR/tiles.md and prints the table. It is
what benchmarks/gpu_check.sh runs to choose the default tiles from measurements; on the CPU it
runs under TRITON_INTERPRET=1 (a smoke test of the tool, not a timing).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from .worker import TORCH_DTYPES, _dmlkern_callable, _labels, time_call

# Name -> TILE_OVERRIDES. Each varies one thing from the defaults (dmlkern.triton.tiles.
# _tiles: fp16 / bf16 64 x 64 tiles over 4 warps with D in one K slice; fp32 64 x 64 over 8
# warps, K slices of 32, the symmetric / lifted / B_pos backward with 32 columns), so a winner
# says what to change; a setting that equals a dtype's default times the default again. Most
# telling first: the sweep stops when its budget is spent.
CONFIGS = {
    "default": {},
    "kslices64": {"fwd": {"block_k": 64}, "bwd": {"block_k": 64}},
    "rows128_warps8": {"fwd": {"block_m": 128, "num_warps": 8}, "bwd": {"block_m": 128, "num_warps": 8}},
    "warps8": {"fwd": {"num_warps": 8}, "bwd": {"num_warps": 8}},
    "warps4": {"fwd": {"num_warps": 4}, "bwd": {"num_warps": 4}},
    "stages2": {"fwd": {"num_stages": 2}, "bwd": {"num_stages": 2}},
    "stages4": {"fwd": {"num_stages": 4}, "bwd": {"num_stages": 4}},
    "rows128": {"fwd": {"block_m": 128}, "bwd": {"block_m": 128}},
    "cols128_fwd": {"fwd": {"block_n": 128}},
    "cols32_bwd": {"bwd": {"block_n": 32}},
}
DEFAULT_LOSSES = ["multi_similarity_miner", "ntxent"]
TOLERANCE = {"fp32": 1e-3, "fp64": 1e-9, "bf16": 5e-2, "fp16": 2e-2}


def _parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m dmlkern.bench.tiles", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(TORCH_DTYPES))
    p.add_argument("--losses", nargs="+", default=DEFAULT_LOSSES)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=120.0, help="seconds; later settings are skipped")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _same_as_default(tk, x, d, overrides):
    """Whether a setting launches the default tiles for x's dtype (e.g. 4 warps for bf16)."""
    def launches():
        return [tk._launch_tiles(x, d, "fwd")] + [tk._launch_tiles(x, d, "bwd", symmetric=s) for s in (False, True)]

    tk.TILE_OVERRIDES.clear()
    default = launches()
    tk.TILE_OVERRIDES.update(overrides)
    try:
        return launches() == default
    finally:
        tk.TILE_OVERRIDES.clear()


def run(args):
    os.environ["DMLKERN_BACKEND"] = "triton"
    import torch

    from dmlkern.triton import tiles as tk

    device = torch.device(args.device)

    def median_s(step):  # about --repeats calls' worth: do_bench on CUDA, torch.utils.benchmark on CPU
        t0 = time.perf_counter()
        step()
        return time_call(torch, device, step, args.repeats * (time.perf_counter() - t0))[0]

    t_start = time.perf_counter()
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, TORCH_DTYPES[dtype_name])
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.n, args.d, generator=gen).to(device, dtype)
        x_mm = x.detach()
        t_mm = median_s(lambda: x_mm @ x_mm.T)
        for loss in args.losses:
            labels = _labels(loss, args.n, device, gen)
            x.requires_grad_(True)
            fn, backend, params = _dmlkern_callable(loss, x, labels, args.d)
            baseline = None
            for name in args.configs:
                row = {"dtype": dtype_name, "loss": loss, "config": name, "n": args.n, "d": args.d,
                       "t_mm_s": t_mm}
                rows.append(row)
                if time.perf_counter() - t_start > args.budget:
                    row["status"] = "skip (budget)"
                    continue
                if name != "default" and _same_as_default(tk, x, args.d, CONFIGS[name]):
                    row["status"] = "skip (this dtype's default)"
                    continue
                tk.TILE_OVERRIDES.clear()
                tk.TILE_OVERRIDES.update(CONFIGS[name])
                try:
                    def step():
                        x.grad = None
                        for p in params:
                            p.grad = None
                        value = fn()
                        value.backward()
                        return value

                    value = step()  # compiles this setting's kernels
                    result = (value.detach().double().cpu(), x.grad.detach().double().cpu())
                    seconds = median_s(step)
                except Exception as exc:  # noqa: BLE001 -- a setting that does not compile
                    row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                finally:
                    tk.TILE_OVERRIDES.clear()
                row.update(status="ok", seconds=seconds, x_tmm=seconds / t_mm, backend=backend())
                if baseline is None:
                    baseline = result
                scale = float(baseline[1].abs().max()) or 1.0
                err = max(abs(float(result[0] - baseline[0])) / max(abs(float(baseline[0])), 1e-30),
                          float((result[1] - baseline[1]).abs().max()) / scale)
                row.update(rel_diff=err, agrees=err <= TOLERANCE[dtype_name])
            x.requires_grad_(False)
    return rows


def table(rows):
    lines = ["| dtype | loss | tiles | time | × T_mm | agrees with the first | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['dtype']} | {r['loss']} | {r['config']} | {r['seconds'] * 1e3:.2f} ms | "
                         f"{r['x_tmm']:.2f} | {'yes' if r['agrees'] else 'NO'} ({r['rel_diff']:.1e}) | "
                         f"{r['backend']} |")
        else:
            lines.append(f"| {r['dtype']} | {r['loss']} | {r['config']} | {r['status']} | | | "
                         f"{r.get('error', '')} |")
    return "\n".join(lines)


def main(argv=None):
    args = _parse(argv)
    rows = run(args)
    text = table(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tiles.json"), "w") as f:
            json.dump({"configs": {k: CONFIGS[k] for k in args.configs}, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "tiles.md"), "w") as f:
            f.write(f"# Triton tile sweep (N={args.n}, D={args.d}, {args.device})\n\n{text}\n")
    return 0 if all(r["status"] != "ok" or r["agrees"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
