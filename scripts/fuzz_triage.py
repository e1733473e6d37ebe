"""Groups the differences in a fuzz_against_pml.py output file (JSON lines) by (loss or miner,
reducer, kind of difference), with a few seeds each, and sets aside the kinds that README's
"Deviations from PML" already explains, and the comparisons against a ~0 truth that are no
difference at all (counted on top, one line per class). A development tool:
the classes are heuristics on the recorded spec and message, so check a seed (`fuzz_against_pml.py
show SEED`, with the same FUZZ_* settings) before calling a difference documented or new.

python scripts/fuzz_triage.py OUTFILE [--all]   (--all: no class set aside)
"""
import collections
import json
import re
import sys

RAISES_EXPECTED = {"both_raise", "pml_raise_only"}  # dmlkern works where PML crashes: by design
NAN_COUNTS = re.compile(r"NaN pattern differs: pml (\d+) NaN, dml (\d+) NaN")
AC_ERRORS = re.compile(r"dml err ([0-9.eE+-]+) vs pml err")  # FUZZ_AUTOCAST's relative errors
AC_TRUTH = re.compile(r"\|truth\| ([0-9.eE+-]+)\); dml=<[^>]*norm ([0-9.eE+-]+)>")  # its fp64 truth, dmlkern's norm


def documented(spec, kind, message):
    """The README deviation class a difference falls in, or None."""
    inputs = spec.get("inputs", {})
    name = spec.get("loss") or (spec.get("miner") or [None])[0]
    nans = NAN_COUNTS.search(message)
    if inputs.get("N") == 0 or (name == "VICRegLoss" and inputs.get("N") == 1):
        return "empty batch / one-row VICReg: dmlkern's zero where PML's mean of nothing is NaN"
    if nans and int(nans.group(1)) > int(nans.group(2)) and kind != "value":
        return "PML's NaN gradient in every row (its matmul backward of a dropped NaN term)"
    nca = name in ("NCALoss", "ProxyNCALoss", "MultipleLosses") or (
        name == "CrossBatchMemory" and (spec.get("sub") or [None])[0] == "NCALoss")
    if nca and (re.search(r"pml=\[nan\] dml=\[[^n]", message) or (kind == "grad_ref" and "one is None" in message)):
        return "NCA / ProxyNCA without any positive: the grad-carrying zero (plus any regularizer) for PML's NaN"
    if name == "P2SGradLoss" and spec.get("twice") and not kind == "value":
        return "P2SGrad, two calls then one backward: PML's first gradient reads the renormalised weight"
    if name == "DynamicSoftMarginLoss" and spec.get("twice") and kind.startswith("grad"):
        return ("DynamicSoftMargin, two calls then one backward: PML's running histogram carries the first "
                "call's autograd history (dmlkern's does not)")
    if name == "TupletMarginLoss" and inputs.get("D") == 1:
        return "TupletMargin at width 1: cosines of +-1, PML's acos gradient is NaN"
    if name == "TupletMarginLoss" and inputs.get("dup_rows") and nans and int(nans.group(1)) > int(nans.group(2)):
        return "TupletMargin, equal rows: a cosine rounded past 1, PML's acos is NaN (dmlkern clamps)"
    if inputs.get("zero_rows") and kind.startswith("grad") and not nans:
        return "a zero row's normalisation gradient (1/eps times rounding noise, in both)"
    if inputs.get("dup_rows") and not nans:
        return "equal rows: sqrt(2 - 2s) noise where PML's cdist gives 0 (<= 25 rows)"
    if (inputs.get("min_unit_dist") or 1.0) < 1e-3 and kind.startswith(("grad", "fp32only_grad")) and not nans:
        return "near-equal rows (unit distance < 1e-3): a pair's distance and gradient are rounding noise in both"
    if kind == "dml_raise_only" and "out of range" in message:
        return "an out-of-range indices_tuple raises (PML ignores or misreads it)"
    if name == "MarginLoss" and kind == "grad_param" and inputs.get("dtype") == "float64":
        return "MarginLoss's fp32 beta, fp64 embeddings: PML adds fp32 terms of beta's gradient, dmlkern fp64 ones"
    if kind.startswith("fp32only"):
        return "fp32 only (the same case agrees in fp64): rounding"
    if kind == "ac_dtype" and _fp32_for_half(*message.split(" vs ")):
        return "autocast: the fused losses return an fp32 loss where PML's is in the autocast dtype"
    truth = AC_TRUTH.search(message)
    scale = max(1.0, float(inputs.get("scale") or 1.0))
    if kind.startswith("ac_") and truth and float(truth.group(1)) < 1e-12 * scale and float(truth.group(2)) < 1e-5 * scale:
        return ("(no difference) autocast: a result whose fp64 truth is ~0 (< 1e-12): dmlkern's and PML's are "
                "both rounding noise (< 1e-5), their relative errors meaningless")
    ac_err = AC_ERRORS.search(message)
    if kind.startswith("ac_") and ac_err and float(ac_err.group(1)) <= 2.0 ** -8:
        return ("autocast: dmlkern's error within bf16's rounding (2^-8 of the fp64 truth), only larger than "
                "PML's luckier rounding")
    if kind.startswith("fp32_ac_"):
        return ("autocast: dmlkern's error is as large without autocast, in fp32 (a distance d from s carries "
                "~eps/d, near-equal rows)")
    return None


def _fp32_for_half(pml, dml):
    """Whether each returned dtype is the same in both, or fp32 (dmlkern) where PML's is fp16 / bf16:
    CrossBatchMemory's zero loss of an empty queue is fp32 in both, its later losses differ."""
    pml, dml = re.findall(r"torch\.(\w+)", pml), re.findall(r"torch\.(\w+)", dml)
    pairs = list(zip(pml, dml))
    return (len(pml) == len(dml) and any(a != b for a, b in pairs)
            and all(a == b or (a in ("bfloat16", "float16") and b == "float32") for a, b in pairs))


def main():
    path, show_all = sys.argv[1], "--all" in sys.argv
    counts, seeds = collections.Counter(), collections.defaultdict(list)
    for line in open(path):
        record = json.loads(line)
        spec = record.get("spec", {})
        for kind, message in record.get("issues") or []:
            if kind.removeprefix("noac_also_") in RAISES_EXPECTED:  # (autocast mode: seen without it too)
                continue
            doc = None if show_all else documented(spec, kind, message)
            if doc:
                key = ("(documented) " + doc,)
            else:
                name = spec.get("loss") or (spec.get("miner") or [None])[0] or "(no spec: the harness failed)"
                key = (name, (spec.get("reducer") or [None])[0], kind)
            counts[key] += 1
            seeds[key].append(record["seed"])
    for key, n in sorted(counts.items(), key=lambda item: (not item[0][0].startswith("("), -item[1])):
        print(n, *key, seeds[key][:5])


if __name__ == "__main__":
    main()
