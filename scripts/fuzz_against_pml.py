"""Differential fuzzer: dmlkern against pytorch-metric-learning 2.9.0 on random losses, arguments,
reducers, miners, distances and inputs (small N, fp32 / fp64, NaN / zero / duplicate rows, ref_emb),
comparing values, gradients, return structure, raised errors, pickling and state_dict keys. A
development tool, not a test: a reported difference is a lead, to be checked against README's
"Deviations from PML" and reduced to a test before it is fixed. One CPU thread, default backend
(set DMLKERN_BACKEND=triton with TRITON_INTERPRET=1 for the Triton kernels).

python scripts/fuzz_against_pml.py START COUNT OUTFILE  -> seeds [START, START+COUNT), JSON lines appended to OUTFILE
python scripts/fuzz_against_pml.py show SEED           -> the spec of a seed and its result

FUZZ_AUTOCAST=bf16: fp32 inputs, every forward (miner and loss calls) under
torch.autocast("cpu", dtype=torch.bfloat16), backward outside it. bf16 rounding legitimately differs
between the libraries, so numbers are not compared with each other: each library's relative error
against PML run in fp64 without autocast (the truth) is, and a case is flagged ("ac_value",
"ac_grad_emb", "ac_grad_param", ...) when dmlkern's error > 2 x PML's + 1e-6. Structure (return
types, raised errors, shapes, state keys, pickling) is compared as usual; miner tuples that differ are
"ac_tuple" (may be ties of bf16 values), output dtypes that differ "ac_dtype".

FUZZ_FOCUS=degenerate: small batches (N 2..20, D 1..8) with many NaN rows / +-inf entries / zero and
duplicated rows, labels with many singleton classes / one class / two classes, ref_emb in half the
cases (with NaN rows, ref_labels sharing all / some / none of the labels), reducers mostly DoNothing,
AvgNonZero, Threshold, PerAnchor, ClassWeighted, Divisor, MultipleReducers, Mean, and miners.

FUZZ_FOCUS=tiles: batches that cross the kernels' tile boundaries (N 100..1030, ref_emb of 100..1300
rows, up to 1300 classes; D 2..40): the C++ engine's 128- and 512-row blocks, its 512-column tiles
and column chunks, the symmetric tiles' rounds (8 blocks of 128 rows from N = 897), the blocked
paths' row blocks. PML's O(N^3) losses and the miners get N <= 260. Few NaN / zero / duplicate rows.

FUZZ_LOSSES=PNPLoss,DynamicSoftMarginLoss: draw the loss from these only (a new fused path).

FUZZ_SLOT_OP=1: the fused TripletMarginLoss's row sweep through dmlkern::triplet_slot_rows on the
CPU (the CUDA C++ kernel's per-thread bodies, run in loops) instead of the C++ CPU kernel.
"""
import contextlib
import json
import math
import os
import pickle
import random
import sys
import traceback
import warnings
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DMLKERN_SMALL_CLASS_LOGITS", "0")  # the fused class losses at the fuzzer's small sizes
os.environ.setdefault("DMLKERN_SMALL_PAIRS", "0")  # the fused pair paths likewise
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
AUTOCAST = os.environ.get("FUZZ_AUTOCAST", "") == "bf16"
FOCUS = os.environ.get("FUZZ_FOCUS", "")  # "degenerate" / "tiles": see gen_inputs_degenerate / _tiles

import pytorch_metric_learning.distances as Pdist
import pytorch_metric_learning.losses as Plos
import pytorch_metric_learning.miners as Pmin
import pytorch_metric_learning.reducers as Pred
import pytorch_metric_learning.regularizers as Preg

import dmlkern.distances as Ddist
import dmlkern.losses as Dlos
import dmlkern.miners as Dmin
import dmlkern.reducers as Dred
import dmlkern.regularizers as Dreg

LIBS = {
    "pml": dict(dist=Pdist, los=Plos, min=Pmin, red=Pred, reg=Preg),
    "dml": dict(dist=Ddist, los=Dlos, min=Dmin, red=Dred, reg=Dreg),
}

CLASS_LOSSES = {
    "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss", "SubCenterArcFaceLoss", "ProxyAnchorLoss", "ProxyNCALoss",
    "SoftTripleLoss", "P2SGradLoss",
}
PAIR_LOSSES = [
    "ContrastiveLoss", "TripletMarginLoss", "MarginLoss", "CircleLoss", "TupletMarginLoss",
    "AngularLoss", "NCALoss", "MultiSimilarityLoss", "LiftedStructureLoss",
    "GeneralizedLiftedStructureLoss", "NTXentLoss", "SupConLoss", "NPairsLoss", "FastAPLoss",
    "SignalToNoiseRatioContrastiveLoss", "IntraPairVarianceLoss", "HistogramLoss",
    "InstanceLoss", "RankedListLoss", "SmoothAPLoss", "ManifoldLoss", "PNPLoss",
    "ThresholdConsistentMarginLoss", "DynamicSoftMarginLoss", "VICRegLoss",
]
ALL_LOSSES = PAIR_LOSSES + sorted(CLASS_LOSSES) + [
    "MultipleLosses", "CrossBatchMemory", "SelfSupervisedLoss"]
if os.environ.get("FUZZ_SLOT_OP") == "1":
    import dmlkern.fused.triplet as _fused_triplet

    _fused_triplet.SLOT_KERNEL_DEVICES = ("cpu", "cuda")
if os.environ.get("FUZZ_LOSSES"):
    ALL_LOSSES = [name for name in os.environ["FUZZ_LOSSES"].split(",") if name]
MINERS = ["TripletMarginMiner", "BatchHardMiner", "BatchEasyHardMiner", "PairMarginMiner",
          "MultiSimilarityMiner", "AngularMiner", "HDCMiner", "DistanceWeightedMiner",
          "UniformHistogramMiner", "EmbeddingsAlreadyPackagedAsTriplets"]


def ch(r, xs):
    return xs[r.randrange(len(xs))]


# ---------------------------------------------------------------- spec generation
def gen_distance(r, p_default=0.6):
    if r.random() < p_default:
        return None
    k = ch(r, ["lp", "lp", "cos", "dot", "snr"])
    if k == "lp":
        return ["lp", dict(normalize_embeddings=ch(r, [True, False]), p=ch(r, [2, 2, 1, 3]),
                           power=ch(r, [1, 2, 1, 0.5]))]
    if k == "cos":
        return ["cos", {}]
    if k == "dot":
        return ["dot", dict(normalize_embeddings=ch(r, [False, True]))]
    return ["snr", {}]


def gen_reducer(r, p_default=0.6):
    if r.random() < p_default:
        return None
    k = ch(r, ["mean", "avgnz", "sum", "thresh", "donothing", "mean", "avgnz", "sum", "thresh", "donothing", "divisor", "peranchor"])
    if k == "thresh":
        lo = ch(r, [None, 0.0, 0.1])
        hi = ch(r, [None, 0.5, 2.0])
        if lo is None and hi is None:
            lo = 0.05
        return ["thresh", dict(low=lo, high=hi)]
    return [k, {}]


def gen_loss_kwargs(r, name, D, C):
    kw = {}
    if name == "ContrastiveLoss":
        kw = dict(pos_margin=ch(r, [0, 0.1, 0.3, 1]), neg_margin=ch(r, [1, 0.5, 2, 0.8, 0]))
    elif name == "TripletMarginLoss":
        kw = dict(margin=ch(r, [0.05, 0.2, 1, 0, -0.1]), swap=r.random() < 0.3,
                  smooth_loss=r.random() < 0.3,
                  triplets_per_anchor=ch(r, ["all", "all", "all", 1, 3]))
    elif name == "MarginLoss":
        kw = dict(margin=ch(r, [0.2, 0.1, 0.5]), nu=ch(r, [0, 0.1]), beta=ch(r, [1.2, 0.5]),
                  triplets_per_anchor=ch(r, ["all", "all", "all", 2]),
                  learn_beta=r.random() < 0.4)
        if kw["learn_beta"] and r.random() < 0.5:
            kw["num_classes"] = C
    elif name == "CircleLoss":
        kw = dict(m=ch(r, [0.4, 0.25, 0.1]), gamma=ch(r, [80, 256, 10, 1]))
    elif name == "TupletMarginLoss":
        kw = dict(margin=ch(r, [5.73, 10, 0]), scale=ch(r, [64, 30, 1]))
    elif name == "AngularLoss":
        kw = dict(alpha=ch(r, [40, 45, 30, 10]))
    elif name == "NCALoss":
        kw = dict(softmax_scale=ch(r, [1, 10, 0.5, 64]))
    elif name == "MultiSimilarityLoss":
        kw = dict(alpha=ch(r, [2, 1, 0.5, 10]), beta=ch(r, [50, 40, 10, 1]),
                  base=ch(r, [0.5, 0.8, 0, 1]))
    elif name in ("LiftedStructureLoss", "GeneralizedLiftedStructureLoss"):
        kw = dict(neg_margin=ch(r, [1, 0.5, 2]), pos_margin=ch(r, [0, 0.2]))
    elif name == "NTXentLoss":
        kw = dict(temperature=ch(r, [0.07, 0.5, 1, 0.02, 0.005]))
    elif name == "SupConLoss":
        kw = dict(temperature=ch(r, [0.1, 0.5, 0.03, 1]))
    elif name == "ProxyAnchorLoss":
        kw = dict(num_classes=C, embedding_size=D, margin=ch(r, [0.1, 0.2, 0]),
                  alpha=ch(r, [32, 16, 1]))
    elif name == "ProxyNCALoss":
        kw = dict(num_classes=C, embedding_size=D, softmax_scale=ch(r, [1, 10, 0.5]))
    elif name == "SoftTripleLoss":
        kw = dict(num_classes=C, embedding_size=D, centers_per_class=ch(r, [1, 2, 10]),
                  la=ch(r, [20, 5]), gamma=ch(r, [0.1, 0.5]), margin=ch(r, [0.01, 0.1]))
    elif name == "ArcFaceLoss":
        kw = dict(num_classes=C, embedding_size=D, margin=ch(r, [28.6, 10, 0, 60]),
                  scale=ch(r, [64, 10, 1]))
    elif name == "CosFaceLoss":
        kw = dict(num_classes=C, embedding_size=D, margin=ch(r, [0.35, 0.1, 0]),
                  scale=ch(r, [64, 10, 1]))
    elif name in ("SphereFaceLoss", "LargeMarginSoftmaxLoss"):
        kw = dict(num_classes=C, embedding_size=D, margin=ch(r, [4, 1, 2, 3]),
                  scale=ch(r, [1, 10, 2]))
    elif name == "NormalizedSoftmaxLoss":
        kw = dict(num_classes=C, embedding_size=D, temperature=ch(r, [0.05, 0.5, 1]))
    elif name == "SubCenterArcFaceLoss":
        kw = dict(num_classes=C, embedding_size=D, margin=ch(r, [28.6, 10]),
                  scale=ch(r, [64, 10]), sub_centers=ch(r, [1, 3]))
    elif name == "P2SGradLoss":
        kw = dict(descriptors_dim=D, num_classes=C)
    elif name == "FastAPLoss":
        kw = dict(num_bins=ch(r, [10, 5, 2, 50]))
    elif name == "IntraPairVarianceLoss":
        kw = dict(pos_eps=ch(r, [0.01, 0.1, 0]), neg_eps=ch(r, [0.01, 0.1, 0]))
    elif name == "HistogramLoss":
        nb = ch(r, [None, 10, 50, 3])
        kw = {} if nb is None else dict(n_bins=nb)
    elif name == "InstanceLoss":
        kw = dict(gamma=ch(r, [64, 10, 1]))
    elif name == "RankedListLoss":
        kw = dict(margin=ch(r, [0.4, 1, 0.1]), Tn=ch(r, [10, 1, 0]),
                  imbalance=ch(r, [0.5, 0, 1, 0.3]), alpha=ch(r, [None, 1.0, 0.5]),
                  Tp=ch(r, [0, 0.5, 1]))
    elif name == "SmoothAPLoss":
        kw = dict(temperature=ch(r, [0.01, 0.1, 1]))
    elif name == "ManifoldLoss":
        kw = dict(l=D, K=ch(r, [1, 2, 3, 5]), lambdaC=ch(r, [1.0, 0.0, 0.5]),
                  alpha=ch(r, [0.8, 0.5]), margin=ch(r, [5e-4, 0.1]))
    elif name == "PNPLoss":
        kw = dict(b=ch(r, [2, 1, 4]), alpha=ch(r, [1, 4, 8]), anneal=ch(r, [0.01, 0.1]),
                  variant=ch(r, ["Ds", "Dq", "Iu", "Ib", "O"]))
    elif name == "ThresholdConsistentMarginLoss":
        kw = dict(lambda_plus=ch(r, [1.0, 0.5]), lambda_minus=ch(r, [1.0, 2.0]),
                  margin_plus=ch(r, [0.9, 0.5]), margin_minus=ch(r, [0.5, 0.2]))
    elif name == "DynamicSoftMarginLoss":
        kw = dict(min_val=ch(r, [-2.0, -1.0]), num_bins=ch(r, [10, 5]),
                  momentum=ch(r, [0.01, 0.5]))
    elif name == "VICRegLoss":
        kw = dict(invariance_lambda=ch(r, [25, 1]), variance_mu=ch(r, [25, 1]),
                  covariance_v=ch(r, [1, 5]), eps=ch(r, [1e-4, 1e-2]))
    return kw


# distances each loss asserts / defaults to (to bias towards legal configs)
COS_ONLY = {"CircleLoss", "TupletMarginLoss", "InstanceLoss", "SmoothAPLoss", "PNPLoss",
            "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "LargeMarginSoftmaxLoss",
            "NormalizedSoftmaxLoss", "SubCenterArcFaceLoss", "ProxyAnchorLoss", "SoftTripleLoss",
            "ThresholdConsistentMarginLoss", "HistogramLoss"}
NO_REF = {"FastAPLoss", "HistogramLoss", "RankedListLoss", "SmoothAPLoss", "ManifoldLoss",
          "PNPLoss", "NPairsLoss", "SignalToNoiseRatioContrastiveLoss", "InstanceLoss",
          "DynamicSoftMarginLoss", "ThresholdConsistentMarginLoss"}
NO_DIST = {"VICRegLoss", "P2SGradLoss", "ManifoldLoss"}


def gen_miner(r, D):
    name = ch(r, MINERS)
    kw = {}
    if name == "TripletMarginMiner":
        kw = dict(margin=ch(r, [0.2, 0.05, 1, 0]),
                  type_of_triplets=ch(r, ["all", "hard", "semihard", "easy"]))
    elif name == "BatchEasyHardMiner":
        kw = dict(pos_strategy=ch(r, ["easy", "hard", "semihard", "all"]),
                  neg_strategy=ch(r, ["semihard", "hard", "easy", "all"]))
        if r.random() < 0.3:
            kw["allowed_pos_range"] = ch(r, [(0.1, 1.5), (0, 0.8)])
        if r.random() < 0.3:
            kw["allowed_neg_range"] = ch(r, [(0.5, 2.0), (0.2, 1.2)])
    elif name == "PairMarginMiner":
        kw = dict(pos_margin=ch(r, [0.2, 0, 0.5, 1.0]), neg_margin=ch(r, [0.8, 1.0, 1.5, 0.3]))
    elif name == "MultiSimilarityMiner":
        kw = dict(epsilon=ch(r, [0.1, 0.0, 0.5, 1.0]))
    elif name == "AngularMiner":
        kw = dict(angle=ch(r, [20, 45, 5, 90]))
    elif name == "HDCMiner":
        kw = dict(filter_percentage=ch(r, [0.5, 0.1, 0.9, 1.0]))
    elif name == "DistanceWeightedMiner":
        kw = dict(cutoff=ch(r, [0.5, 0.2]), nonzero_loss_cutoff=ch(r, [1.4, 1.0]))
    elif name == "UniformHistogramMiner":
        kw = dict(num_bins=ch(r, [100, 10]), pos_per_bin=ch(r, [10, 2]),
                  neg_per_bin=ch(r, [10, 2]))
    dist = None
    if name not in ("EmbeddingsAlreadyPackagedAsTriplets",) and r.random() < 0.3:
        dist = gen_distance(r, p_default=0.0)
        if dist[0] == "snr":
            dist = ["cos", {}]
    return [name, kw, dist]


def gen_inputs(r, name):
    N = ch(r, [0, 1, 2, 3, 5, 17, 64, 130, 8, 12, 24])
    D = ch(r, [1, 2, 8, 33, 128, 8, 16])
    dtype = ch(r, ["float32", "float64"])
    labscheme = ch(r, ["few", "few", "few", "one", "distinct", "two"])
    labdtype = ch(r, ["int64", "int64", "int64", "float32", "int32", "float64"])
    scale = ch(r, [1.0, 1.0, 0.1, 10.0, 3.0])
    nan = r.random() < 0.05
    zero_rows = r.random() < 0.1
    dup_rows = r.random() < 0.1
    ref = r.random() < 0.2
    Nr = ch(r, [0, 1, 3, 17, 40]) if ref else None
    C = ch(r, [1, 2, 3, 5, 10, 20])
    return dict(N=N, D=D, dtype=dtype, labscheme=labscheme, labdtype=labdtype, scale=scale,
                nan=nan, zero_rows=zero_rows, dup_rows=dup_rows, ref=ref, Nr=Nr, C=C,
                offset=ch(r, [0.0, 0.0, 0.0, 5.0]))


# ---------------------------------------------------------------- FUZZ_FOCUS=degenerate
def gen_reducer_degenerate(r, name=None, p_default=0.1):
    """mostly DoNothing / AvgNonZero / Threshold / PerAnchor / ClassWeighted / Divisor / Multiple / Mean"""
    if r.random() < p_default:
        return None
    k = ch(r, ["donothing", "donothing", "donothing", "avgnz", "avgnz", "avgnz", "thresh", "thresh",
               "thresh", "peranchor", "peranchor_inner", "classweighted", "divisor", "multiple",
               "multiple", "mean", "sum"])
    if k == "thresh":
        lo = ch(r, [None, 0.0, 0.1, 0.5, 1.0])
        hi = ch(r, [None, 0.1, 0.5, 2.0, 10.0])
        if lo is None and hi is None:
            lo = ch(r, [0.05, 1.0])
        return ["thresh", dict(low=lo, high=hi)]
    if k == "peranchor_inner":
        return ["peranchor_inner", dict(inner=ch(r, [["avgnz", {}], ["thresh", dict(low=0.1, high=None)],
                                                     ["sum", {}], ["mean", {}]]))]
    if k == "classweighted":
        return ["classweighted", dict(weights=[ch(r, [0.0, 0.5, 1.0, 2.0, 3.0]) for _ in range(32)])]
    if k == "divisor" and name not in ("ProxyAnchorLoss", "MarginLoss"):
        k = ch(r, ["mean", "avgnz"])
    if k == "multiple":
        sub = lambda: ch(r, [None, ["avgnz", {}], ["thresh", dict(low=0.1, high=None)],
                             ["thresh", dict(low=None, high=0.5)], ["mean", {}], ["sum", {}],
                             ["classweighted", dict(weights=[ch(r, [0.0, 1.0, 2.0]) for _ in range(32)])]])
        return ["multiple", dict(default=sub(), per=[sub() for _ in range(r.choice([1, 2]))])]
    return [k, {}]


def gen_inputs_degenerate(r):
    N = r.randint(2, 20)
    D = r.randint(1, 8)
    ref = r.random() < 0.5
    return dict(deg=True, N=N, D=D, dtype=ch(r, ["float32", "float64"]),
                labscheme=ch(r, ["singletons", "singletons", "mostly_singletons", "mostly_singletons",
                                 "one", "one", "two", "two", "few"]),
                labdtype=ch(r, ["int64", "int64", "int64", "int32"]),
                scale=ch(r, [1.0, 1.0, 0.1, 10.0]),
                nan_rows=ch(r, [0, 0, 1, 1, 2, 3]) if r.random() < 0.7 else 0,
                nan_full_row=r.random() < 0.5,
                inf=ch(r, [0, 1, 2]) if r.random() < 0.3 else 0,
                zero_rows=ch(r, [0, 1, 2]) if r.random() < 0.4 else 0,
                dup_rows=ch(r, [0, 1, 2]) if r.random() < 0.4 else 0,
                ref=ref, Nr=r.randint(1, 20) if ref else None,
                ref_nan=ch(r, [0, 1, 2]) if ref and r.random() < 0.5 else 0,
                ref_labmode=ch(r, ["same", "some", "none"]),
                C=ch(r, [1, 2, 3, 5, 10]), offset=0.0)


def corrupt_degenerate(emb, inp, g, nan_rows, inf=0, zero_rows=0, dup_rows=0, full=True):
    N, D = emb.shape
    if N == 0:
        return emb
    for _ in range(dup_rows):
        i, j = torch.randint(0, N, (2,), generator=g).tolist()
        emb[i] = emb[j]
    for _ in range(zero_rows):
        emb[int(torch.randint(0, N, (1,), generator=g))] = 0
    for _ in range(inf):
        i = int(torch.randint(0, N, (1,), generator=g))
        j = int(torch.randint(0, D, (1,), generator=g))
        emb[i, j] = float("inf") if torch.rand(1, generator=g).item() < 0.5 else float("-inf")
    for _ in range(nan_rows):
        i = int(torch.randint(0, N, (1,), generator=g))
        if full:
            emb[i] = float("nan")
        else:
            emb[i, int(torch.randint(0, D, (1,), generator=g))] = float("nan")
    return emb


# ---------------------------------------------------------------- FUZZ_FOCUS=tiles
# PML materialises N^3 values (or N^2 x classes) for these: kept to N <= 260 (~18M)
CUBIC_IN_PML = {"TripletMarginLoss", "AngularLoss", "MarginLoss", "TupletMarginLoss", "FastAPLoss",
                "SmoothAPLoss", "PNPLoss", "HistogramLoss", "RankedListLoss", "ManifoldLoss",
                "DynamicSoftMarginLoss", "ThresholdConsistentMarginLoss", "CrossBatchMemory", "MultipleLosses"}


def gen_inputs_tiles(r):
    """N around the engine's row blocks (128, 512) and past them; many classes (several 512-column
    tiles and column chunks of the class losses' weights); ref_emb shorter or longer than N."""
    N = ch(r, [r.randint(100, 140), r.randint(250, 270), r.randint(500, 530), r.randint(100, 600),
               r.randint(890, 1030)])
    ref = r.random() < 0.3
    return dict(N=N, D=r.randint(2, 40), dtype=ch(r, ["float32", "float32", "float64"]),
                labscheme=ch(r, ["few", "few", "few", "distinct", "two", "one"]),
                labdtype=ch(r, ["int64", "int64", "int32"]), scale=ch(r, [1.0, 1.0, 0.1, 3.0]),
                nan=r.random() < 0.03, zero_rows=r.random() < 0.05, dup_rows=r.random() < 0.05,
                ref=ref, Nr=ch(r, [r.randint(100, 140), r.randint(500, 530), r.randint(1030, 1300)]) if ref else None,
                C=ch(r, [3, 20, 120, 600, 1100, 1300]), offset=ch(r, [0.0, 0.0, 0.0, 2.0]))


def _gen_spec(seed):
    deg = FOCUS == "degenerate"
    r = random.Random(seed)
    kind = "miner" if r.random() < 0.2 else "loss"
    inp = gen_inputs_degenerate(r) if deg else gen_inputs_tiles(r) if FOCUS == "tiles" else gen_inputs(r, None)
    red = (lambda p, n=None: gen_reducer_degenerate(r, n)) if deg else (lambda p, n=None: gen_reducer(r, p))
    spec = dict(seed=seed, kind=kind, inputs=inp)
    if kind == "miner":
        spec["miner"] = gen_miner(r, inp["D"])
        return spec
    name = ch(r, ALL_LOSSES)
    spec["loss"] = name
    if FOCUS == "tiles" and name in CUBIC_IN_PML:
        inp["N"] = min(inp["N"], 260)
        inp["Nr"] = inp["Nr"] and min(inp["Nr"], 260)
    if name in CLASS_LOSSES or name in NO_REF:
        if r.random() < 0.8 or deg:
            inp["ref"] = False
    if name in CLASS_LOSSES:
        inp["labdtype"] = ch(r, ["int64", "int64", "int64", "int32", "float32"])
        if deg:
            inp["labdtype"] = "int64"
    if name == "MultipleLosses":
        subs = [ch(r, PAIR_LOSSES[:13]) for _ in range(r.choice([1, 2, 3]))]
        spec["sub"] = [[s, gen_loss_kwargs(r, s, inp["D"], inp["C"]), None, red(0.8, s)] for s in subs]
        spec["weights"] = ch(r, [None, "list"])
        spec["with_miners"] = r.random() < (0.5 if deg else 0.3)
        if spec["with_miners"]:
            spec["sub_miners"] = [gen_miner(r, inp["D"]) if r.random() < 0.6 else None for _ in subs]
        spec["as_dict"] = r.random() < 0.3
        return spec
    if name == "CrossBatchMemory":
        s = ch(r, ["MultiSimilarityLoss", "NTXentLoss", "ContrastiveLoss", "SupConLoss",
                   "TripletMarginLoss", "CircleLoss", "NCALoss", "LiftedStructureLoss"])
        spec["sub"] = [s, gen_loss_kwargs(r, s, inp["D"], inp["C"]), gen_distance(r, 0.8), red(0.8, s)]
        spec["memory_size"] = ch(r, [5, 17, 64, 200])
        spec["cbm_miner"] = gen_miner(r, inp["D"]) if r.random() < (0.5 if deg else 0.3) else None
        spec["enqueue_mask"] = r.random() < 0.2
        spec["nbatches"] = ch(r, [1, 2, 3])
        return spec
    if name == "SelfSupervisedLoss":
        s = ch(r, ["AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
                   "IntraPairVarianceLoss", "LiftedStructureLoss", "MultiSimilarityLoss",
                   "NTXentLoss", "SignalToNoiseRatioContrastiveLoss", "SupConLoss",
                   "TripletMarginLoss", "NCALoss", "TupletMarginLoss"])
        spec["sub"] = [s, gen_loss_kwargs(r, s, inp["D"], inp["C"]), None, red(0.8, s)]
        spec["symmetric"] = r.random() < 0.5
        return spec
    spec["kwargs"] = gen_loss_kwargs(r, name, inp["D"], inp["C"])
    if name in NO_DIST:
        spec["distance"] = None
    elif name in COS_ONLY:
        spec["distance"] = gen_distance(r, 0.85)
    else:
        spec["distance"] = gen_distance(r, 0.55)
    spec["reducer"] = red(0.6, name)
    spec["miner"] = gen_miner(r, inp["D"]) if r.random() < (0.45 if deg else 0.3) else None
    spec["emb_reg"] = ch(r, [None] * 8 + ["lp", "zeromean"])
    if name in CLASS_LOSSES and r.random() < 0.15:
        spec["w_reg"] = ch(r, ["regularface", "lp", "centerinv"])
    spec["twice"] = r.random() < 0.15
    spec["cast_params"] = r.random() < 0.6
    if name == "ManifoldLoss":
        spec["miner"] = None
        spec["manifold_meta"] = r.random() < 0.5
    if name == "DynamicSoftMarginLoss":
        spec["dsm_nolabels"] = r.random() < 0.3
    return spec


def gen_spec(seed):
    spec = _gen_spec(seed)
    if FOCUS == "tiles" and (spec["kind"] == "miner" or spec.get("miner") or spec.get("cbm_miner")
                             or any(spec.get("sub_miners") or [])):
        inp = spec["inputs"]  # PML's miners hold N^2 to N^3 values
        inp["N"], inp["Nr"] = min(inp["N"], 260), inp["Nr"] and min(inp["Nr"], 260)
    return spec


# ---------------------------------------------------------------- building
def _build(lib, d, module, classes):
    """The object of spec d = (kind, kwargs) from LIBS[lib][module], classes(module) mapping kinds."""
    if d is None:
        return None
    k, kw = d
    return classes(LIBS[lib][module])[k](**kw)


def build_distance(lib, d):
    return _build(lib, d, "dist", lambda m: {"lp": m.LpDistance, "cos": m.CosineSimilarity,
                                             "dot": m.DotProductSimilarity, "snr": m.SNRDistance})


def build_reducer(lib, d, sub_names=None):
    if d is not None and d[0] == "classweighted":
        return LIBS[lib]["red"].ClassWeightedReducer(torch.tensor(d[1]["weights"], dtype=torch.float64))
    if d is not None and d[0] == "peranchor_inner":
        return LIBS[lib]["red"].PerAnchorReducer(reducer=build_reducer(lib, d[1]["inner"]))
    if d is not None and d[0] == "multiple":
        names = list(sub_names or [])
        per = {}
        for i, n in enumerate(names):
            rs = d[1]["per"][i % len(d[1]["per"])] if d[1]["per"] else None
            if rs is not None:
                per[n] = build_reducer(lib, rs)
        dflt = build_reducer(lib, d[1]["default"]) if d[1]["default"] is not None else None
        return LIBS[lib]["red"].MultipleReducers(per, default_reducer=dflt)
    return _build(lib, d, "red", lambda m: {"mean": m.MeanReducer, "avgnz": m.AvgNonZeroReducer,
                                            "sum": m.SumReducer, "thresh": m.ThresholdReducer,
                                            "donothing": m.DoNothingReducer, "divisor": m.DivisorReducer,
                                            "peranchor": lambda: m.PerAnchorReducer()})


def build_miner(lib, mspec):
    if mspec is None:
        return None
    name, kw, dist = mspec
    kw = dict(kw)
    dd = build_distance(lib, dist)
    if dd is not None:
        kw["distance"] = dd
    return getattr(LIBS[lib]["min"], name)(**kw)


def build_simple_loss(lib, name, kw, dist, red, extra=None):
    kw = dict(kw)
    dd = build_distance(lib, dist)
    if dd is not None:
        kw["distance"] = dd
    sub_names = None
    if red is not None and red[0] == "multiple":
        sub_names = getattr(LIBS[lib]["los"], name)(**kw).sub_loss_names()
    rr = build_reducer(lib, red, sub_names)
    if rr is not None:
        kw["reducer"] = rr
    if extra:
        kw.update(extra)
    return getattr(LIBS[lib]["los"], name)(**kw)


def build_loss(lib, spec):
    name = spec["loss"]
    L = LIBS[lib]
    if name == "MultipleLosses":
        subs = [build_simple_loss(lib, *s) for s in spec["sub"]]
        miners = None
        if spec.get("with_miners"):
            miners = [build_miner(lib, m) for m in spec["sub_miners"]]
        weights = None
        if spec["weights"] == "list":
            weights = [0.5 + i for i in range(len(subs))]
        if spec.get("as_dict"):
            subs = {f"l{i}": s for i, s in enumerate(subs)}
            if miners is not None:
                miners = {f"l{i}": m for i, m in enumerate(miners)}
            if weights is not None:
                weights = {f"l{i}": w for i, w in enumerate(weights)}
        return L["los"].MultipleLosses(subs, miners=miners, weights=weights)
    if name == "CrossBatchMemory":
        inner = build_simple_loss(lib, *spec["sub"])
        return L["los"].CrossBatchMemory(inner, spec["inputs"]["D"], memory_size=spec["memory_size"],
                                         miner=build_miner(lib, spec["cbm_miner"]))
    if name == "SelfSupervisedLoss":
        inner = build_simple_loss(lib, *spec["sub"])
        return L["los"].SelfSupervisedLoss(inner, symmetric=spec["symmetric"])
    extra = {}
    if spec.get("emb_reg"):
        extra["embedding_regularizer"] = {"lp": L["reg"].LpRegularizer,
                                          "zeromean": L["reg"].ZeroMeanRegularizer}[spec["emb_reg"]]()
    if spec.get("w_reg"):
        extra["weight_regularizer"] = {"lp": L["reg"].LpRegularizer,
                                       "regularface": L["reg"].RegularFaceRegularizer,
                                       "centerinv": L["reg"].CenterInvariantRegularizer}[spec["w_reg"]]()
    return build_simple_loss(lib, name, spec["kwargs"], spec["distance"], spec["reducer"], extra)


def make_inputs(spec):
    inp = spec["inputs"]
    g = torch.Generator().manual_seed(spec["seed"])
    N, D = inp["N"], inp["D"]
    dtype = getattr(torch, inp["dtype"])
    C = inp["C"]
    emb = torch.randn(N, D, generator=g, dtype=torch.float64) * inp["scale"] + inp["offset"]
    if inp.get("deg"):
        corrupt_degenerate(emb, inp, g, inp["nan_rows"], inp["inf"], inp["zero_rows"], inp["dup_rows"],
                           inp["nan_full_row"])
    elif inp["dup_rows"] and N >= 2:
        emb[1] = emb[0]
    if not inp.get("deg") and inp["zero_rows"] and N >= 1:
        emb[torch.randint(0, N, (max(1, N // 8),), generator=g)] = 0
    if not inp.get("deg") and inp["nan"] and N >= 1:
        emb[torch.randint(0, N, (1,), generator=g), 0] = float("nan")
    emb = emb.to(dtype)

    def labels_for(n):
        s = inp["labscheme"]
        if s == "one":
            lab = torch.zeros(n, dtype=torch.int64)
        elif s == "distinct":
            lab = torch.arange(n) % max(C, 1) if spec.get("loss") in CLASS_LOSSES else torch.arange(n)
        elif s == "two":
            lab = torch.randint(0, 2, (n,), generator=g)
        elif s == "singletons":  # every class a single sample, except maybe one pair
            lab = torch.randperm(n, generator=g)
            if n >= 3 and torch.rand(1, generator=g).item() < 0.5:
                lab[0] = lab[1]
        elif s == "mostly_singletons":  # about a third of the samples in small classes
            lab = torch.arange(n)
            k = max(1, n // 3)
            lab[:k] = torch.randint(0, max(1, k // 2), (k,), generator=g)
            lab = lab[torch.randperm(n, generator=g)]
        else:
            lab = torch.randint(0, max(C, 1), (n,), generator=g)
        if spec.get("loss") in CLASS_LOSSES or (spec.get("loss") == "MarginLoss" and spec.get("kwargs", {}).get("num_classes")):
            lab = lab % C
        if spec.get("loss") == "SmoothAPLoss" and n > 0:
            # PML needs equal class sizes: sort into blocks of equal size
            k = ch(random.Random(spec["seed"]), [1, 2, 3, 4])
            k = k if n % k == 0 else 1
            lab = torch.arange(n) // k
        return lab.to(getattr(torch, inp["labdtype"]))

    labels = labels_for(N)
    ref_emb = ref_labels = None
    if inp["ref"]:
        Nr = inp["Nr"]
        ref_emb = (torch.randn(Nr, D, generator=g, dtype=torch.float64) * inp["scale"])
        ref_labels = labels_for(Nr)
        if inp.get("deg"):
            corrupt_degenerate(ref_emb, inp, g, inp["ref_nan"], full=inp["nan_full_row"])
            if inp["ref_labmode"] != "same":
                shift = torch.full((Nr,), 100, dtype=torch.int64)
                if inp["ref_labmode"] == "some":
                    shift[torch.rand(Nr, generator=g) < 0.5] = 0
                ref_labels = (ref_labels.to(torch.int64) + shift).to(ref_labels.dtype)
        ref_emb = ref_emb.to(dtype)
    return emb, labels, ref_emb, ref_labels


# ---------------------------------------------------------------- comparison helpers
def tol(dtype):
    return (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-9)


def cmp_tensor(a, b, rtol, atol):
    """returns None if equal else description"""
    if a is None and b is None:
        return None
    if (a is None) != (b is None):
        return f"one is None: pml={a is None} dml={b is None}"
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return f"non-tensor/tensor mismatch {type(a).__name__} {a!r} vs {type(b).__name__} {b!r}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.numel() == 0:
        return None
    a64 = a.detach().double()
    b64 = b.detach().double()
    na, nb = torch.isnan(a64), torch.isnan(b64)
    if not torch.equal(na, nb):
        return f"NaN pattern differs: pml {int(na.sum())} NaN, dml {int(nb.sum())} NaN (of {a.numel()}); pml={fmt(a64)} dml={fmt(b64)}"
    m = ~na
    if not torch.allclose(a64[m], b64[m], rtol=rtol, atol=atol):
        diff = (a64[m] - b64[m]).abs()
        idx = int(diff.argmax()) if diff.numel() else 0
        rel = diff / (a64[m].abs() + 1e-30)
        return (f"max abs diff {diff.max().item():.3e} (rel {rel.max().item():.3e}); "
                f"pml={a64[m].flatten()[idx].item():.8g} dml={b64[m].flatten()[idx].item():.8g}; "
                f"pml={fmt(a64)} dml={fmt(b64)}")
    return None


def cmp_nested(a, b, rtol, atol):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return cmp_tensor(a, b, rtol, atol)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            return f"len {len(a)} vs {len(b)}"
        for x, y in zip(a, b):
            c = cmp_nested(x, y, rtol, atol)
            if c:
                return c
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if sorted(a) != sorted(b):
            return f"keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            c = cmp_nested(a[k], b[k], rtol, atol)
            if c:
                return f"{k}: {c}"
        return None
    return None if a == b else f"{a!r} vs {b!r}"


def fmt(t):
    if t.numel() <= 4:
        return str([round(x, 8) if not math.isnan(x) else x for x in t.flatten().tolist()])
    return f"<{tuple(t.shape)} norm {torch.nan_to_num(t).norm().item():.5g}>"


def tuple_multisets(tup):
    if tup is None:
        return None
    ts = [torch.as_tensor(t).clone() if isinstance(t, torch.Tensor) else t for t in tup]
    lists = [t.tolist() for t in ts]
    if len(ts) == 3:
        return ("trip", Counter(zip(*lists)))
    if len(ts) == 4:
        return ("pair", Counter(zip(lists[0], lists[1])), Counter(zip(lists[2], lists[3])))
    return ("other", lists)


def describe_out(o):
    if isinstance(o, torch.Tensor):
        return ("Tensor", str(o.dtype), tuple(o.shape))
    if isinstance(o, (tuple, list)):
        return (type(o).__name__, len(o), tuple(describe_out(x) for x in o))
    if isinstance(o, dict):
        return ("dict", sorted(o.keys()))
    return (type(o).__name__,)


# ---------------------------------------------------------------- running
def fwd(spec):
    """The context of a forward call: torch.autocast (CPU, bf16) where spec["_autocast"]."""
    if spec.get("_autocast"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def via32(spec, t):
    """t rounded through fp32 where spec["_via32"] (the fp64 truth of an fp32 autocast case sees the
    same generated inputs as the fp32 run)."""
    return t.to(torch.float32).to(t.dtype) if spec.get("_via32") else t


def run_side(lib, spec, emb0, lab0, ref0, reflab0):
    """Builds and runs one library's side. Returns dict of results."""
    res = {"raised": None}
    torch.manual_seed(12345)
    emb = emb0.clone().requires_grad_(True)
    ref = ref0.clone().requires_grad_(True) if ref0 is not None else None
    lab = lab0.clone()
    reflab = reflab0.clone() if reflab0 is not None else None
    try:
        if spec["kind"] == "miner":
            miner = build_miner(lib, spec["miner"])
            torch.manual_seed(777)
            with fwd(spec):
                out = miner(emb, lab, ref, reflab)
            res["out_type"] = describe_out_miner(out)
            res["tuple"] = tuple_multisets(out)
            res["obj"] = miner
            return res
        loss = build_loss(lib, spec)
        res["obj"] = loss
        if spec.get("_pml_state") is not None:
            loss.load_state_dict(spec["_pml_state"])
        if lib == "pml":
            spec["_pml_state"] = {k: v.clone() for k, v in loss.state_dict().items()}
        dtype = emb.dtype
        if list(loss.parameters()) and spec.get("cast_params", True):
            loss.to(dtype)  # both libraries cast weights; keep dtype equal
        name = spec["loss"]
        miner = build_miner(lib, spec.get("miner")) if spec.get("miner") else None
        outs = []
        if name == "CrossBatchMemory":
            g = torch.Generator().manual_seed(spec["seed"] + 1)
            embs = [emb]
            labs = [lab]
            for b in range(spec["nbatches"] - 1):
                e2 = via32(spec, (torch.randn(emb0.shape, generator=g, dtype=torch.float64)).to(dtype))
                embs.append(e2.requires_grad_(True))
                labs.append(lab0[torch.randperm(len(lab0), generator=g)] if len(lab0) else lab0.clone())
            res["embs"] = embs
            for b in range(spec["nbatches"]):
                kw = {}
                if spec["enqueue_mask"]:
                    m = torch.zeros(len(labs[b]), dtype=torch.bool)
                    m[::2] = True
                    kw["enqueue_mask"] = m
                torch.manual_seed(100 + b)
                with fwd(spec):
                    out = loss(embs[b], labs[b], **kw)
                outs.append(out)
            res["queue_labels"] = loss.label_memory.clone() if hasattr(loss, "label_memory") else None
            res["queue_emb"] = loss.embedding_memory.clone() if hasattr(loss, "embedding_memory") else None
            res["queue_idx"] = int(loss.queue_idx) if hasattr(loss, "queue_idx") else None
        elif name in ("SelfSupervisedLoss", "VICRegLoss"):
            r2 = ref if ref is not None and len(ref) == len(emb) else None
            if r2 is None:
                g = torch.Generator().manual_seed(spec["seed"] + 2)
                r2 = via32(spec, emb0 + 0.1 * torch.randn(emb0.shape, generator=g, dtype=torch.float64).to(emb0.dtype)).clone().requires_grad_(True)
                ref = r2
            res["ref_used"] = r2
            with fwd(spec):
                outs.append(loss(emb, ref_emb=r2))
        elif name == "MultipleLosses":
            tup = None
            with fwd(spec):
                outs.append(loss(emb, lab))
        else:
            ntimes = 2 if spec.get("twice") else 1
            for t in range(ntimes):
                tup = None
                if miner is not None:
                    torch.manual_seed(777)
                    with fwd(spec):
                        tup = miner(emb, lab, ref, reflab)
                    res["miner_tuple_obj"] = tup
                torch.manual_seed(4242 + t)
                kw = {}
                if ref is not None:
                    kw["ref_emb"] = ref
                    kw["ref_labels"] = reflab
                if name == "ManifoldLoss":
                    lab_ = None
                    if spec.get("manifold_meta") and len(emb) >= spec["kwargs"]["K"]:
                        gg = torch.Generator().manual_seed(spec["seed"] + 5)
                        K = spec["kwargs"]["K"]
                        tup = torch.cat([torch.arange(K), torch.randint(0, K, (len(emb) - K,), generator=gg)])
                elif name == "DynamicSoftMarginLoss" and spec.get("dsm_nolabels"):
                    lab_ = None
                else:
                    lab_ = lab
                with fwd(spec):
                    out = loss(emb, lab_, tup, **kw)
                outs.append(out)
        res["backend"] = getattr(loss, "last_backend", None)  # (dmlkern's: which path the last call took)
        res["out_type"] = [describe_out(o) for o in outs]
        res["values"] = [o.detach().clone() if isinstance(o, torch.Tensor) else o for o in outs]
        tot = None
        for o in outs:
            if isinstance(o, torch.Tensor) and o.requires_grad:
                s = o.sum()
                tot = s if tot is None else tot + s
        if tot is not None:
            tot.backward()
        res["grad_emb"] = emb.grad
        res["grad_ref"] = ref.grad if ref is not None else None
        if name == "CrossBatchMemory":
            res["grad_embs"] = [e.grad for e in res["embs"]]
        res["param_grads"] = {n: (p.grad.clone() if p.grad is not None else None) for n, p in loss.named_parameters()}
        res["params_after"] = {n: p.detach().clone() for n, p in loss.named_parameters()}
        res["state_keys"] = sorted(loss.state_dict().keys())
        if miner is not None and "miner_tuple_obj" in res:
            res["tuple"] = tuple_multisets(res["miner_tuple_obj"])
            res["miner_type"] = describe_out_miner(res["miner_tuple_obj"])
            del res["miner_tuple_obj"]
    except BaseException as e:  # noqa
        if isinstance(e, KeyboardInterrupt):
            raise
        res["raised"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["raised_type"] = type(e).__name__
        res["tb"] = traceback.format_exc()[-1500:]
    return res


def describe_out_miner(out):
    if isinstance(out, (tuple, list)):
        return (len(out), tuple((str(t.dtype), t.dim()) if isinstance(t, torch.Tensor) else type(t).__name__ for t in out))
    return type(out).__name__


def pickle_issues(P, D):
    """dmlkern's module pickles (where PML's does) and keeps its state keys through it."""
    try:
        o2 = pickle.loads(pickle.dumps(D["obj"]))
        if sorted(o2.state_dict().keys()) != D["state_keys"]:
            return [("pickle", "state keys change after pickle")]
    except Exception as e:
        try:
            pickle.dumps(P["obj"])
            return [("pickle", f"dml pickling fails, pml ok: {type(e).__name__}: {e}")]
        except Exception:
            pass
    return []


def compare(spec, P, D, emb):
    issues = []
    dtype = emb.dtype
    rtol, atol = tol(dtype)
    if P["raised"] or D["raised"]:
        if P["raised"] and D["raised"]:
            return [("both_raise", f"pml {P['raised'][:120]} | dml {D['raised'][:120]}")]
        if P["raised"]:
            return [("pml_raise_only", f"pml: {P['raised']}")]
        return [("dml_raise_only", f"dml: {D['raised']}\n{D.get('tb','')[-800:]}")]
    name = spec.get("loss") or spec["miner"][0]
    if spec["kind"] == "miner":
        if P["out_type"] != D["out_type"]:
            issues.append(("miner_type", f"{P['out_type']} vs {D['out_type']}"))
        if P["tuple"] != D["tuple"]:
            issues.append(("miner_tuple", diff_tuple(P["tuple"], D["tuple"])))
        return issues
    if P["out_type"] != D["out_type"]:
        issues.append(("return_type", f"{P['out_type']} vs {D['out_type']}"))
    for i, (a, b) in enumerate(zip(P["values"], D["values"])):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            c = cmp_tensor(a, b, rtol, atol)
            if c:
                issues.append(("value", f"call {i}: {c}"))
        else:
            c = cmp_nested(a, b, rtol, atol)
            if c:
                issues.append(("value", f"call {i}: {c}"))
    c = cmp_tensor(P["grad_emb"], D["grad_emb"], rtol, atol)
    if c:
        issues.append(("grad_emb", c))
    c = cmp_tensor(P.get("grad_ref"), D.get("grad_ref"), rtol, atol)
    if c:
        issues.append(("grad_ref", c))
    if "grad_embs" in P:
        for i, (a, b) in enumerate(zip(P["grad_embs"], D["grad_embs"])):
            c = cmp_tensor(a, b, rtol, atol)
            if c:
                issues.append(("grad_cbm_batch", f"batch {i}: {c}"))
        for k in ("queue_labels", "queue_emb"):
            c = cmp_tensor(P[k], D[k], rtol, atol)
            if c:
                issues.append(("cbm_queue", f"{k}: {c}"))
        if P["queue_idx"] != D["queue_idx"]:
            issues.append(("cbm_queue", f"queue_idx {P['queue_idx']} vs {D['queue_idx']}"))
    if P["state_keys"] != D["state_keys"]:
        issues.append(("state_keys", f"{P['state_keys']} vs {D['state_keys']}"))
    else:
        for n in P["param_grads"]:
            c = cmp_tensor(P["param_grads"][n], D["param_grads"].get(n), rtol, atol)
            if c:
                issues.append(("grad_param", f"{n}: {c}"))
            c = cmp_tensor(P["params_after"][n], D["params_after"].get(n), rtol, atol)
            if c:
                issues.append(("param_after", f"{n}: {c}"))
    if "tuple" in P or "tuple" in D:
        det = spec["miner"][0] not in ("DistanceWeightedMiner", "UniformHistogramMiner")
        if P.get("miner_type") != D.get("miner_type"):
            issues.append(("miner_type", f"{P.get('miner_type')} vs {D.get('miner_type')}"))
        if P.get("tuple") != D.get("tuple"):
            issues.append(("miner_tuple" if det else "miner_tuple_random", diff_tuple(P.get("tuple"), D.get("tuple"))))
    issues += pickle_issues(P, D)
    return issues


def diff_tuple(a, b):
    if a is None or b is None or a[0] != b[0]:
        return f"{str(a)[:200]} vs {str(b)[:200]}"
    out = []
    for i, (x, y) in enumerate(zip(a[1:], b[1:])):
        if x != y:
            if isinstance(x, Counter):
                out.append(f"part{i}: pml {sum(x.values())} dml {sum(y.values())}; only pml {list((x - y).items())[:4]} only dml {list((y - x).items())[:4]}")
            else:
                out.append(f"part{i}: {str(x)[:100]} vs {str(y)[:100]}")
    return "; ".join(out)


# ---------------------------------------------------------------- autocast mode
def flat_tensors(o):
    """The tensors (and numbers) of a nested output, in a fixed order."""
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in flat_tensors(x)]
    if isinstance(o, dict):
        return [t for k in sorted(o, key=str) for t in flat_tensors(o[k])]
    if isinstance(o, (int, float)) and not isinstance(o, bool):
        return [torch.tensor(float(o), dtype=torch.float64)]
    return []


def rel_err(x, t):
    """(error, |truth|): ||x - t|| / ||t|| over the entries finite in t (||x - t|| where ||t|| = 0);
    inf where the shapes or the NaN / +-inf pattern of x differ from t's."""
    xs, ts = flat_tensors(x), flat_tensors(t)
    if len(xs) != len(ts) or any(a.shape != b.shape for a, b in zip(xs, ts)):
        return math.inf, math.nan
    if not xs or sum(a.numel() for a in xs) == 0:
        return 0.0, 0.0
    xv = torch.cat([a.detach().double().flatten() for a in xs])
    tv = torch.cat([a.detach().double().flatten() for a in ts])
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(f(xv), f(tv)):
            return math.inf, math.nan
    m = torch.isfinite(tv)
    d = (xv[m] - tv[m]).norm().item()
    n = tv[m].norm().item()
    return (d / n if n > 0 else d), n


def tuple_size(tm):
    if tm is None or tm[0] == "other":
        return 0
    return sum(sum(c.values()) for c in tm[1:])


def tuple_symdiff(a, b):
    """the number of tuples in one multiset of a tuple description and not the other"""
    if a is None or b is None or a[0] != b[0] or a[0] == "other":
        return None if a != b else 0
    return sum(sum((x - y).values()) + sum((y - x).values()) for x, y in zip(a[1:], b[1:]))


def strip_dtypes(d):
    if isinstance(d, tuple):
        if len(d) == 3 and d[0] == "Tensor":
            return ("Tensor", d[2])
        return tuple(strip_dtypes(x) for x in d)
    if isinstance(d, list):
        return [strip_dtypes(x) for x in d]
    return d


def compare_ac(spec, P, D, T):
    """Autocast mode: structure of P (PML, autocast) against D (dmlkern, autocast); numbers of each
    against T (PML, fp64, no autocast). Returns (issues, errs) with errs {what: [dml, pml]}."""
    issues, errs = [], {}
    if P["raised"] or D["raised"]:
        if P["raised"] and D["raised"]:
            return [("both_raise", f"pml {P['raised'][:120]} | dml {D['raised'][:120]}")], errs
        if P["raised"]:
            return [("pml_raise_only", f"pml: {P['raised']}")], errs
        return [("dml_raise_only", f"dml: {D['raised']}\n{D.get('tb', '')[-800:]}")], errs
    random_miner = lambda m: m is not None and m[0] in ("DistanceWeightedMiner", "UniformHistogramMiner")

    def tuples(key):
        """miner tuples of P and D compared (with T's for scale)"""
        a, b, t = P.get(key), D.get(key), T.get(key) if not T["raised"] else None
        if a == b:
            return False
        mspec = spec["miner"] if spec["kind"] == "miner" else spec.get("miner")
        n = tuple_symdiff(a, b)
        msg = (f"pml vs dml differ in {n} of {tuple_size(a)} (pml) / {tuple_size(b)} (dml) tuples; "
               f"vs fp64 ({tuple_size(t)}): pml {tuple_symdiff(a, t)}, dml {tuple_symdiff(b, t)}; "
               + diff_tuple(a, b)[:300])
        issues.append(("ac_tuple_random" if random_miner(mspec) else "ac_tuple", msg))
        return True

    if spec["kind"] == "miner":
        if P["out_type"] != D["out_type"]:
            issues.append(("miner_type", f"{P['out_type']} vs {D['out_type']}"))
        tuples("tuple")
        return issues, errs
    if P["out_type"] != D["out_type"]:
        kind = "ac_dtype" if strip_dtypes(P["out_type"]) == strip_dtypes(D["out_type"]) else "return_type"
        issues.append((kind, f"{P['out_type']} vs {D['out_type']}"))
    tup_differs = False
    if "tuple" in P or "tuple" in D:
        if P.get("miner_type") != D.get("miner_type"):
            issues.append(("miner_type", f"{P.get('miner_type')} vs {D.get('miner_type')}"))
        tup_differs = tuples("tuple")
    if P["state_keys"] != D["state_keys"]:
        issues.append(("state_keys", f"{P['state_keys']} vs {D['state_keys']}"))
    if T["raised"]:
        issues.append(("ac_truth_raise", f"fp64 PML raised, cannot judge numbers: {T['raised'][:200]}"))
    else:
        pairs = [(f"value{i}", "ac_value", P["values"][i], D["values"][i], T["values"][i])
                 for i in range(min(len(P["values"]), len(D["values"]), len(T["values"])))]
        pairs += [("grad_emb", "ac_grad_emb", P["grad_emb"], D["grad_emb"], T["grad_emb"]),
                  ("grad_ref", "ac_grad_ref", P.get("grad_ref"), D.get("grad_ref"), T.get("grad_ref"))]
        if "grad_embs" in P and "grad_embs" in D and "grad_embs" in T:
            pairs += [(f"grad_cbm{i}", "ac_grad_cbm_batch", a, b, t)
                      for i, (a, b, t) in enumerate(zip(P["grad_embs"], D["grad_embs"], T["grad_embs"]))]
            pairs += [("queue_emb", "ac_cbm_queue", P["queue_emb"], D["queue_emb"], T["queue_emb"])]
            for k in ("queue_labels", "queue_idx"):
                a, b = P[k], D[k]
                if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                    same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                            and a.shape == b.shape and torch.equal(a, b))
                else:
                    same = a == b
                if not same:
                    issues.append(("cbm_queue", f"{k}: {a if not isinstance(a, torch.Tensor) else fmt(a.double())} vs "
                                                f"{b if not isinstance(b, torch.Tensor) else fmt(b.double())}"))
        if P["state_keys"] == D["state_keys"] == T["state_keys"]:
            for n in P["param_grads"]:
                pairs.append((f"grad_param:{n}", "ac_grad_param", P["param_grads"][n], D["param_grads"].get(n), T["param_grads"].get(n)))
                pairs.append((f"param_after:{n}", "ac_param_after", P["params_after"][n], D["params_after"].get(n), T["params_after"].get(n)))
        for what, kind, a, b, t in pairs:
            if a is None or b is None:
                if (a is None) != (b is None):
                    issues.append(("grad_none" if "grad" in what else "value_none", f"{what}: pml None={a is None} dml None={b is None}"))
                continue
            if t is None:
                continue
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
                issues.append(("shape", f"{what}: {tuple(a.shape)} vs {tuple(b.shape)}"))
                continue
            ep, n = rel_err(a, t)
            ed, _ = rel_err(b, t)
            errs[what] = [ed, ep]
            if ed > 2 * ep + 1e-6:
                issues.append((kind + ("_tupdiff" if tup_differs else ""),
                               f"{what}: dml err {ed:.3e} vs pml err {ep:.3e} (rel. to fp64 PML, |truth| {n:.3e}); "
                               f"dml={fmt_any(b)} pml={fmt_any(a)} fp64={fmt_any(t)}"))
    issues += pickle_issues(P, D)
    return issues, errs


def fmt_any(o):
    ts = flat_tensors(o)
    if len(ts) == 1:
        return fmt(ts[0].detach().double())
    return f"<{len(ts)} tensors>"


def run_case_ac(seed):
    """Autocast mode: PML and dmlkern under CPU bf16 autocast on fp32 inputs, PML in fp64 as truth.
    The same fp32 case also runs without autocast, to tell autocast's differences from others: a
    structural issue seen there too is "noac_also_<kind>"; a numeric one where dmlkern's fp32 error
    without autocast is already over half its autocast error (and over 2 x PML's fp32 error + 1e-6)
    is "fp32_<kind>" (an fp32 accuracy gap, not autocast's)."""
    spec = gen_spec(seed)
    spec["inputs"]["dtype"] = "float32"
    spec["_autocast"] = True
    emb, lab, ref, reflab = make_inputs(spec)
    P = run_side("pml", spec, emb, lab, ref, reflab)
    Dd = run_side("dml", dict(spec), emb, lab, ref, reflab)
    spec64 = gen_spec(seed)
    spec64["inputs"]["dtype"] = "float64"
    spec64["cast_params"] = True  # the fp32 parameters widened (exactly) to fp64
    spec64["_via32"] = True
    if spec.get("_pml_state") is not None:
        spec64["_pml_state"] = spec["_pml_state"]
    d64 = lambda t: t.double() if t is not None and t.is_floating_point() else t
    T = run_side("pml", spec64, d64(emb), lab, d64(ref), reflab)
    issues, errs = compare_ac(spec, P, Dd, T)
    # the same fp32 case without autocast
    spec0 = gen_spec(seed)
    spec0["inputs"]["dtype"] = "float32"
    P0 = run_side("pml", spec0, emb, lab, ref, reflab)
    D0 = run_side("dml", dict(spec0), emb, lab, ref, reflab)
    try:
        iss0 = compare(spec0, P0, D0, emb)
    except Exception:
        iss0 = [("harness", traceback.format_exc()[-300:])]
    _, errs0 = compare_ac(spec0, P0, D0, T)
    for w, e in errs.items():
        e += errs0.get(w, [math.nan, math.nan])  # [dml ac, pml ac, dml fp32, pml fp32]
    spec["_errs"] = errs
    structural = {"pml_raise_only", "dml_raise_only", "grad_none", "value_none", "return_type", "shape",
                  "state_keys", "miner_type", "pickle", "cbm_queue"}
    k0 = {k for k, _ in iss0}
    none0 = any("one is None" in m for _, m in iss0)
    out = []
    for k, m in issues:
        if k in structural and (k in k0 or (k == "grad_none" and none0)):
            k = "noac_also_" + k
        elif k.startswith("ac_") and "tuple" not in k and k != "ac_dtype":
            what = m.split(":")[0]
            e = errs.get(what, [])
            if len(e) == 4 and not any(math.isinf(x) for x in e[:2]):
                m += f" || without autocast (fp32): dml err {e[2]:.3e}, pml err {e[3]:.3e}"
                if e[2] > 0.5 * e[0] and e[2] > 2 * e[3] + 1e-6:
                    k = "fp32_" + k
            elif k[3:].replace("_tupdiff", "") in k0:
                k = "noac_also_" + k
                m += " || without autocast: " + "; ".join(m0[:150] for k0_, m0 in iss0
                                                           if k0_ == k[13:].replace("_tupdiff", ""))
        out.append((k, m))
    return spec, out, P, Dd


def strip_spec(spec):
    return {k: v for k, v in spec.items() if not k.startswith("_")}


def min_unit_distance(*tensors):
    """The smallest distance between two distinct rows of the inputs once unit-normalised (finite
    rows only), in fp64: below ~1e-3 a pair's sqrt(2 - 2s) and its gradient are rounding noise in
    fp32 in either library (README, near-duplicate rows)."""
    parts = [t.detach().double() for t in tensors if t is not None and t.dim() == 2 and t.shape[0] > 0]
    if not parts or len({t.shape[1] for t in parts}) > 1:
        return None
    rows = torch.cat(parts)
    rows = rows[torch.isfinite(rows).all(dim=1)]
    if rows.shape[0] < 2 or rows.shape[1] == 0:
        return None
    unit = torch.nn.functional.normalize(rows, dim=1)
    d = torch.cdist(unit, unit, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def run_case(seed):
    if AUTOCAST:
        return run_case_ac(seed)
    spec = gen_spec(seed)
    emb, lab, ref, reflab = make_inputs(spec)
    spec["inputs"]["min_unit_dist"] = min_unit_distance(emb, ref)
    P = run_side("pml", spec, emb, lab, ref, reflab)
    spec_d = dict(spec)
    Dd = run_side("dml", spec_d, emb, lab, ref, reflab)
    issues = compare(spec, P, Dd, emb)
    numeric = {"value", "grad_emb", "grad_ref", "grad_param", "grad_cbm_batch", "param_after"}
    if emb.dtype == torch.float32 and any(k in numeric for k, _ in issues):
        try:
            spec64 = gen_spec(seed)
            spec64["inputs"]["dtype"] = "float64"
            e64, l64, r64, rl64 = make_inputs(spec64)
            P64 = run_side("pml", spec64, e64, l64, r64, rl64)
            D64 = run_side("dml", dict(spec64), e64, l64, r64, rl64)
            iss64 = compare(spec64, P64, D64, e64)
            if not any(k in numeric for k, _ in iss64):
                issues = [("fp32only_" + k if k in numeric else k, m) for k, m in issues]
        except Exception:
            pass
    return spec, issues, P, Dd


def main():
    # An allocation past 8 GiB fails (a "raise" difference) instead of the OOM killer ending the run:
    # PML's NT-Xent on a tuple of all triplets of 130 rows builds a pairs x pairs matrix (22 GB).
    import resource
    resource.setrlimit(resource.RLIMIT_DATA, (8 << 30, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    if sys.argv[1] == "show":
        seed = int(sys.argv[2])
        spec, issues, P, D = run_case(seed)
        print(json.dumps(strip_spec(spec), default=str, indent=1))
        for i in issues:
            print(i[0], "::", i[1])
        if AUTOCAST:
            print("errors vs fp64 [dml, pml]:", spec.get("_errs"))
        if P.get("raised"):
            print("PML TB", P["tb"])
        if D.get("raised"):
            print("DML TB", D["tb"])
        return
    start, count, outfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    prog = outfile + ".progress"
    with open(outfile, "a") as f:
        for seed in range(start, start + count):
            with open(prog, "w") as pf:
                pf.write(str(seed))
            ran = {}
            try:
                spec, issues, _, ran = run_case(seed)
            except Exception as e:
                spec, issues = {"seed": seed}, [("harness", traceback.format_exc()[-600:])]
            rec = dict(seed=seed, spec=strip_spec(spec), issues=issues, backend=ran.get("backend"))
            if AUTOCAST:
                rec["errs"] = spec.get("_errs", {})
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()


if __name__ == "__main__":
    main()
