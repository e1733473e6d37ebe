"""Compile the Triton pair engine's kernels for sm_90 without a GPU and print registers and
spills per kernel config (ptxas -v on the PTX Triton generates, with Triton's ptxas flags), and
the shared memory each launch needs (sm_90 allows 227 KiB per block).

    /work/main/.venv/bin/python scripts/triton_compile_check.py [--arch 90] [--d 128]

Each row: kernel, dtype, the constexprs that vary, tiles, registers, spill stores / loads (bytes).
The tile sizes come from dmlkern.triton.pair_engine._tiles, as a launch would choose them."""
import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from dmlkern.triton import pair_engine as pe  # noqa: E402

PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
UNIT_STRIDES = {"s_xd", "s_yd", "s_od", "s_td", "s_gd", "s_xl", "s_yl", "s_rc", "s_cc", "s_oc"}


def _signature(fn, dtype, consts):
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("X", "Y", "OWN", "OTHER"):
            sig[name] = PTR[dtype]
        elif name in ("XL", "YL"):
            sig[name] = "*i64"
        elif name in ("RIN", "OUT", "COEF", "GRAD"):
            sig[name] = acc
        elif re.fullmatch(r"p\d[hml]", name):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(fn, dtype, consts, num_warps, arch):
    consts = dict(consts)
    for name in fn.arg_names:
        if name in UNIT_STRIDES:
            consts[name] = 1  # Triton specialises unit strides of contiguous tensors
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, consts), constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 64), options={"num_warps": num_warps})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "k.ptx")
        with open(p, "w") as f:
            f.write(k.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", p, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st, ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, st, ld, int(k.metadata.shared)


def configs(d):
    """(kernel name, fn, dtype, label, constexprs, num_warps)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.empty(1, d, dtype=dtype)
        cfg = pe._launch_config(x)
        cfg["UPCAST"] = dtype == torch.float64
        for pass_kind, transform, mining in ((1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 1, 0)):
            t = pe._tiles(x, d)
            c = dict(PASS_KIND=pass_kind, TRANSFORM=transform, MINING=mining, EXCLUDE_DIAG=True,
                     BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], **cfg)
            out.append(("fwd", pe._engine_fwd_kernel, dtype, f"pass={pass_kind} t={transform} mi={mining}", c,
                        t["num_warps"]))
        names = set(pe._engine_bwd_kernel.arg_names)
        tile_kw = set(inspect.signature(pe._tiles).parameters)
        seen = set()
        # (own_is_x, symmetric, transform, mining, has_b, has_lift): the backward's main configs
        for own_is_x, sym, transform, mining, has_b, lift in (
                (True, False, 0, 0, False, False), (True, False, 0, 0, True, False), (False, False, 0, 0, True, False),
                (True, False, 0, 1, False, False), (True, False, 1, 0, False, False), (True, False, 1, 0, False, True),
                (False, False, 1, 0, False, True),
                (True, True, 0, 0, False, False), (True, True, 0, 0, True, False), (True, True, 0, 1, False, False),
                (True, True, 1, 0, False, False), (True, True, 1, 0, False, True)):
            if sym and "SYMMETRIC" not in names:
                continue
            kw = {k: v for k, v in dict(lift=lift, symmetric=sym).items() if k in tile_kw}
            t = pe._tiles(x, d, **kw)
            c = dict(OWN_IS_X=own_is_x, SYMMETRIC=sym, TRANSFORM=transform, MINING=mining, EXCLUDE_DIAG=True,
                     HAS_B=has_b, HAS_LIFT=lift, BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], BLOCK_K=t["block_k"],
                     BLOCK_DOUT=max(16, min(t["block_dout"], triton.next_power_of_2(d))), **cfg)
            c = {k: v for k, v in c.items() if k in names}
            key = tuple(sorted((k, str(v)) for k, v in c.items()))
            if key in seen:
                continue
            seen.add(key)
            label = (f"{'sym' if sym else ('x' if own_is_x else 'y')} t={transform} mi={mining}"
                     f" B={int(has_b) if 'HAS_B' in names else '-'} lift={int(lift)}")
            out.append(("bwd", pe._engine_bwd_kernel, dtype, label, c, t["num_warps"]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--only", default="", help="rows whose 'kernel dtype config' contains this")
    a = ap.parse_args()
    print(f"sm_{a.arch}, D={a.d}, triton {triton.__version__}")
    print(f"{'kernel':5} {'dtype':9} {'config':44} {'tiles (M,N,K,DOUT) warps':26} {'regs':>4} {'spill st/ld':>12} {'smem KiB':>8}")
    for kind, fn, dtype, label, c, warps in configs(a.d):
        if a.only not in f"{kind} {str(dtype)[6:]} {label}":
            continue
        try:
            regs, st, ld, smem = compile_one(fn, dtype, c, warps, a.arch)
            # sm_90: at most 227 KiB of shared memory per block
            res = f"{regs:4d} {st:>5d}/{ld:<6d} {smem / 1024:6.1f}{' TOO MUCH' if smem > 227 * 1024 else ''}"
        except Exception as e:  # report and go on
            res = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        tiles = f"{c['BLOCK_M']},{c['BLOCK_N']},{c['BLOCK_K']},{c.get('BLOCK_DOUT', '-')} w{warps}"
        print(f"{kind:5} {str(dtype)[6:]:9} {label:44} {tiles:26} {res}", flush=True)


if __name__ == "__main__":
    main()
