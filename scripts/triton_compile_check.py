"""Compile the Triton pair engine's kernels (and the class path's grouped kernels, rows "grp") for
sm_90 without a GPU and print, per kernel config:
registers and spills (ptxas -v on the PTX Triton generates, with Triton's ptxas flags), the
shared memory a launch needs (sm_90 allows 227 KiB per block), and the SASS instructions one
thread issues per tile element in the main loop -- the static cost of the epilogue plus the
loads and products, which bounds the kernel when it is ALU-bound (bf16 on an H200: ~14 tile
elements per clock per SM in the tensor cores at D = 128, 128 instructions per clock per SM).

    .venv/bin/python scripts/triton_compile_check.py [--arch 90] [--d 128]

Each row: kernel, dtype, the constexprs that vary, tiles, registers, spill stores / loads
(bytes), shared memory, instructions per element and exp2 (MUFU) per element. The tile sizes come
from dmlkern.triton.tiles (_launch_tiles), as a launch would choose them, and the arguments are
specialised as a launch at D = 128, N = 16384 specialises them (pointers and the sizes and row
strides that are multiples of 16 carry tt.divisibility = 16; without it, 16-bit loads do not
vectorise, the loop is not pipelined and the counts are those of a different kernel).

Instructions per element: the outermost loop's instructions, an inner loop (the K slices) counted
once per slice, over BLOCK_M * BLOCK_N / threads. Code under a runtime `if` (the positives-only
terms of tiles that share a label with the block) counts as if it always ran."""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from dmlkern.triton import grouped_class as grouped  # noqa: E402
from dmlkern.triton import pair_engine as pe  # noqa: E402
from dmlkern.triton import tiles as tile_policy  # noqa: E402
from dmlkern.triton.backward_kernel import _engine_bwd_kernel  # noqa: E402
from dmlkern.triton.forward_kernel import _engine_fwd_kernel  # noqa: E402

PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
UNIT_STRIDES = {"s_xd", "s_yd", "s_od", "s_td", "s_gd", "s_xl", "s_yl", "s_own_lab", "s_oth_lab", "s_rc", "s_cc",
                "s_oc", "s_wd", "s_lab"}
# Integer arguments that are multiples of 16 at D = 128, N = M = 16384 (row_in / row_coef / out
# row strides are 2, 3, 5 or 6). The forward's s_on is out's row stride; the backward's is own's.
DIVISIBLE_BY_16 = {"N", "M", "D", "N_OWN", "N_OTHER", "s_xn", "s_yn", "s_tn", "s_gn"}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
SASS_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")


def _signature(fn, dtype, consts):
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("X", "Y", "OWN", "OTHER", "W", "GOUT"):
            sig[name] = PTR[dtype]
        elif name in ("XL", "YL", "OWN_LAB", "OTH_LAB", "LAB"):
            sig[name] = "*i64"
        elif name in ("RIN", "OUT", "COEF", "GRAD", "LSE"):
            sig[name] = acc
        elif name in pe.PARAM_PIECES or name.startswith(("scale_", "ig_")):  # fp32 pieces of the parameters
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def loop_cost(sass, inner_trips):
    """Opcode counts of one iteration of the outermost loop of a SASS listing, an inner loop's
    instructions counted inner_trips times."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = SASS_LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = SASS_INSTR.match(line)
        if m:
            b = SASS_BRANCH.search(line)
            instrs.append((m.group(1).split(".")[0], b.group(1) if b else None))
    loops = [(labels[t], i) for i, (_, t) in enumerate(instrs) if t in labels and labels[t] <= i]
    if not loops:
        return collections.Counter()
    outer = max(loops, key=lambda span: span[1] - span[0])
    weight = [1] * len(instrs)
    for a, b in loops:
        if (a, b) != outer and outer[0] <= a and b <= outer[1]:
            weight[a:b + 1] = [inner_trips] * (b + 1 - a)
    counts = collections.Counter()
    for i in range(outer[0], outer[1] + 1):
        counts[instrs[i][0]] += weight[i]
    return counts


def compile_one(fn, dtype, consts, num_warps, arch, d=128):
    consts = dict(consts)
    for name in fn.arg_names:
        if name in UNIT_STRIDES:
            consts[name] = 1  # Triton specialises unit strides of contiguous tensors
    sig = _signature(fn, dtype, consts)
    div16 = DIVISIBLE_BY_16 | ({"s_on"} if "OWN" in fn.arg_names else set())
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] != "constexpr" and (sig[name].startswith("*") or (name in div16 and d % 16 == 0))}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 64), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "k.ptx")
        with open(p, "w") as f:
            f.write(k.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", p,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st, ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    one_k = consts.get("ONE_K", consts["BLOCK_K"] >= d)
    counts = loop_cost(sass, inner_trips=1 if one_k else -(-d // consts["BLOCK_K"]))
    per_thread = consts["BLOCK_M"] * block_n(consts) / (32 * num_warps)
    return regs, st, ld, int(k.metadata.shared), sum(counts.values()) / per_thread, counts["MUFU"] / per_thread


def block_n(consts):
    """The tile's columns: BLOCK_N, or a grouped kernel's BLOCK_C classes of KP rows."""
    return consts.get("BLOCK_N", consts.get("BLOCK_C", 0) * consts.get("KP", 0))


def configs(d):
    """(kernel name, fn, dtype, label, constexprs, num_warps), the tiles as a launch picks them."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = torch.empty(1, d, dtype=dtype)
        cfg = pe._launch_config(x)
        cfg["UPCAST"] = dtype == torch.float64
        for pass_kind, transform, mining in ((1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 2, 0), (0, 0, 0), (2, 0, 0), (3, 1, 0),
                                             (4, 0, 0), (4, 1, 0)):
            tiles, options = tile_policy._launch_tiles(x, d, "fwd", positives_only=pass_kind in (2, 3))
            c = dict(PASS_KIND=pass_kind, TRANSFORM=transform, MINING=mining, EXCLUDE_DIAG=True, **tiles, **cfg)
            out.append(("fwd", _engine_fwd_kernel, dtype, f"pass={pass_kind} t={transform} mi={mining}", c,
                        options["num_warps"]))
        # (own_is_x, symmetric, transform, mining, has_b, has_lift): the backward's main configs
        for own_is_x, sym, transform, mining, has_b, lift in (
                (True, False, 0, 0, False, False), (True, False, 0, 0, True, False), (False, False, 0, 0, True, False),
                (True, False, 0, 1, False, False), (True, False, 1, 0, False, False), (True, False, 1, 0, False, True),
                (False, False, 1, 0, False, True),
                (True, True, 0, 0, False, False), (True, True, 0, 0, True, False), (True, True, 0, 1, False, False),
                (True, True, 1, 0, False, False), (True, True, 1, 0, False, True),
                (True, False, 2, 0, False, False), (False, False, 2, 0, False, False), (True, True, 2, 0, False, False)):
            tiles, options = tile_policy._launch_tiles(x, d, "bwd", lift=lift, symmetric=sym, has_b=has_b)
            c = dict(OWN_IS_X=own_is_x, SYMMETRIC=sym, TRANSFORM=transform, MINING=mining, EXCLUDE_DIAG=True,
                     HAS_B=has_b, HAS_LIFT=lift, HINGE=False, **tiles, **cfg)
            side = "sym" if sym else ("x" if own_is_x else "y")
            label = f"{side} t={transform} mi={mining} B={int(has_b)} lift={int(lift)}"
            out.append(("bwd", _engine_bwd_kernel, dtype, label, c, options["num_warps"]))
        # the hinge backward (row_coef (N, 2)): (own_is_x, symmetric, transform)
        for own_is_x, sym, transform in ((True, False, 1), (False, False, 1), (True, True, 0), (True, True, 1)):
            tiles, options = tile_policy._launch_tiles(x, d, "bwd", symmetric=sym, hinge=True)
            c = dict(OWN_IS_X=own_is_x, SYMMETRIC=sym, TRANSFORM=transform, MINING=0, EXCLUDE_DIAG=True,
                     HAS_B=False, HAS_LIFT=False, HINGE=True, **tiles, **cfg)
            side = "sym" if sym else ("x" if own_is_x else "y")
            out.append(("bwd", _engine_bwd_kernel, dtype, f"{side} t={transform} hinge", c, options["num_warps"]))
        # the grouped class kernels: SubCenterArcFace's max over K = 3, SoftTriple's soft assignment over K = 10
        for group, reduce, name in ((3, 0, "subcenter"), (10, 1, "softtriple")):
            tiles, options = grouped._tiles(x, group)
            for fn, part, side in ((grouped._grouped_fwd_kernel, "fwd", {}),
                                   (grouped._grouped_bwd_kernel, "bwd x", dict(OWN_IS_X=True)),
                                   (grouped._grouped_bwd_kernel, "bwd w", dict(OWN_IS_X=False))):
                c = {k: v for k, v in dict(tiles, REDUCE=reduce, **side, **cfg).items() if k in fn.arg_names}
                out.append(("grp", fn, dtype, f"{part} {name} K={group}", c, options["num_warps"]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--only", default="", help="rows whose 'kernel dtype config' contains this")
    ap.add_argument("--tiles", default="", help='TILE_OVERRIDES as JSON, e.g. \'{"bwd": {"num_warps": 4}}\'')
    a = ap.parse_args()
    if a.tiles:
        tile_policy.TILE_OVERRIDES.update(json.loads(a.tiles))
    print(f"sm_{a.arch}, D={a.d}, triton {triton.__version__}")
    print(f"{'kernel':5} {'dtype':9} {'config':32} {'tiles (M,N,K,DOUT) warps':26} {'regs':>4} {'spill st/ld':>12}"
          f" {'smem KiB':>8} {'instr/elem':>10} {'exp2/elem':>9}")
    for kind, fn, dtype, label, c, warps in configs(a.d):
        if a.only not in f"{kind} {str(dtype)[6:]} {label}":
            continue
        try:
            regs, st, ld, smem, per_elem, exp2 = compile_one(fn, dtype, c, warps, a.arch, a.d)
            # sm_90: at most 227 KiB of shared memory per block
            res = (f"{regs:4d} {st:>5d}/{ld:<6d} {smem / 1024:8.1f}{' TOO MUCH' if smem > 227 * 1024 else ''}"
                   f" {per_elem:10.1f} {exp2:9.2f}")
        except Exception as e:  # report and go on
            res = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        tiles = f"{c['BLOCK_M']},{block_n(c)},{c['BLOCK_K']},{c.get('BLOCK_DOUT', '-')} w{warps}"
        print(f"{kind:5} {str(dtype)[6:]:9} {label:32} {tiles:26} {res}", flush=True)


if __name__ == "__main__":
    main()
