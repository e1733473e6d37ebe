"""python -m dmlkern.bench.tiles: time fused losses (forward + backward) on the Triton engine with its
default tiles and with each setting of CONFIGS (through TILE_OVERRIDES): median time, x T_mm, and
whether loss and gradient agree with the first setting's. A setting that fails to compile is an
error row. Writes --out/tiles.json and tiles.md (benchmarks/gpu_check.sh picks the default tiles
from them); on CPU it runs under TRITON_INTERPRET=1, a smoke test and not a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from .specs import FLOOR_LOSS, TORCH_DTYPES
from .worker import build, time_call, train_step

# Each varies one thing from dmlkern.triton.tiles._tiles' defaults, so a winner says what to change;
# most telling first, as the sweep stops when its budget is spent.
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

    def median_s(step):  # about --repeats calls' worth
        t0 = time.perf_counter()
        step()
        return time_call(torch, device, step, args.repeats * (time.perf_counter() - t0))[0]

    t_start, rows = time.perf_counter(), []
    for dtype in args.dtypes:
        spec = dict(provider="dmlkern-triton", n=args.n, d=args.d, dtype=dtype)
        t_mm = median_s(build(dict(spec, loss=FLOOR_LOSS), torch, device)[0])
        for loss in args.losses:
            fn, backend, x, params = build(dict(spec, loss=loss), torch, device)
            step, baseline = train_step(fn, x, params), None
            for name in args.configs:
                row = {"dtype": dtype, "loss": loss, "config": name, "n": args.n, "d": args.d, "t_mm_s": t_mm}
                rows.append(row)
                if time.perf_counter() - t_start > args.budget:
                    row["status"] = "skip (budget)"
                    continue
                if name != "default" and _same_as_default(tk, x, args.d, CONFIGS[name]):
                    row["status"] = "skip (this dtype's default)"
                    continue
                tk.TILE_OVERRIDES.update(CONFIGS[name])
                try:
                    value = step()  # compiles this setting's kernels
                    result = (value.detach().double().cpu(), x.grad.detach().double().cpu())
                    seconds = median_s(step)
                except Exception as exc:  # noqa: BLE001 -- a setting that does not compile
                    row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                finally:
                    tk.TILE_OVERRIDES.clear()
                row.update(status="ok", seconds=seconds, x_tmm=seconds / t_mm, backend=backend())
                baseline = baseline or result
                scale = float(baseline[1].abs().max()) or 1.0
                err = max(abs(float(result[0] - baseline[0])) / max(abs(float(baseline[0])), 1e-30),
                          float((result[1] - baseline[1]).abs().max()) / scale)
                row.update(rel_diff=err, agrees=err <= TOLERANCE[dtype])
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
