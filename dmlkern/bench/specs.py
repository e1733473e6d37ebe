"""What the benchmark can run: losses, providers, dtypes, and the memory estimate used to skip
points a materialising provider cannot hold. Torch-free, so the driver process stays small."""
from __future__ import annotations

import math
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class LossInfo:
    name: str
    title: str  # what the provider runs, for --help / summary.md
    labels: str  # "classes": N/8 classes of 8; "simclr": cat([arange(N/2)] * 2)
    pml: bool  # has a pytorch-metric-learning counterpart
    # Conservative bytes per element for the materialising providers (see estimate_bytes):
    mat_coef: float  # x (N x N matrix elements) x itemsize (or N x C for proxy losses)
    pair_coef: float = 0.0  # x (#positive pairs x #negative pairs) x itemsize (PML's P x Nneg tensors)


LOSSES: dict[str, LossInfo] = {
    info.name: info
    for info in (
        LossInfo("multi_similarity_miner", "MultiSimilarityLoss(emb, labels, MultiSimilarityMiner()(emb, labels))",
                 "classes", True, mat_coef=40.0),
        LossInfo("multi_similarity", "MultiSimilarityLoss()(emb, labels)", "classes", True, mat_coef=16.0),
        LossInfo("ntxent", "NTXentLoss()(emb, labels), SimCLR labels cat([arange(N/2)] * 2)",
                 "simclr", True, mat_coef=16.0, pair_coef=7.0),
        LossInfo("supcon", "SupConLoss()(emb, labels)", "classes", True, mat_coef=20.0),
        LossInfo("lifted", "LiftedStructureLoss()(emb, labels)", "classes", True, mat_coef=16.0, pair_coef=8.0),
        LossInfo("generalized_lifted", "GeneralizedLiftedStructureLoss()(emb, labels)", "classes", True,
                 mat_coef=16.0),
        LossInfo("npairs", "NPairsLoss()(emb, labels)", "classes", True, mat_coef=8.0),
        LossInfo("proxy_anchor", "ProxyAnchorLoss(num_classes=N/8, embedding_size=D)(emb, labels)", "classes",
                 True, mat_coef=16.0),
        LossInfo("masked_lse", "dmlkern.ops.masked_lse(emb, x_labels=labels, mask='diff')", "classes", False,
                 mat_coef=12.0),
    )
}

FLOOR_LOSS = "matmul_floor"  # the T_mm rows: one x @ x.T
FLOOR_PROVIDER = "torch"

# ------------------------------------------------------------------------------------- providers

PROVIDERS = {
    "dmlkern": "dmlkern class, DMLKERN_BACKEND unset (auto); backend column = module.last_backend",
    "dmlkern-compiled": "torch.compile of the same dmlkern call (auto backend): the small O(N) ops around the "
                        "kernels fused, so it shows what eager per-op overhead costs; compile time excluded by warm-up",
    "dmlkern-cpp": "dmlkern class with DMLKERN_BACKEND=cpp",
    "dmlkern-triton": "dmlkern class with DMLKERN_BACKEND=triton (GPU, or CPU under TRITON_INTERPRET=1)",
    "reference": "dmlkern class with DMLKERN_BACKEND=reference (materialising PyTorch path)",
    "compile": "torch.compile(dmlkern.reference.<loss function>); compile time excluded by warm-up",
    "pml": "pytorch_metric_learning 2.9.0 class (if importable)",
}
# Providers that build N x N (or worse) intermediates: skipped above the memory estimate.
MATERIALISING = {"reference", "compile", "pml"}
# The order points run in: if the sweep budget runs out, the later providers lose points.
PROVIDER_PRIORITY = ["dmlkern", "dmlkern-compiled", "dmlkern-triton", "dmlkern-cpp", "pml", "reference", "compile"]
# Providers whose first call may JIT-compile (torch.compile; Triton autotuning on a GPU):
# that first call gets --compile-limit on top of --time-limit.


def jit_provider(provider: str, device: str) -> bool:
    return provider in ("compile", "dmlkern-compiled") or (device == "cuda" and provider.startswith("dmlkern"))


def supported(loss: str, provider: str) -> bool:
    if provider == "pml":
        return LOSSES[loss].pml
    return True


# ---------------------------------------------------------------------------------------- dtypes

DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}  # name -> itemsize
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                 "float64": "fp64", "double": "fp64"}


def canonical_dtype(name: str) -> str:
    name = name.lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return name


# ------------------------------------------------------------------------------- labels / sizes


def num_classes(loss: str, n: int) -> int:
    if LOSSES[loss].labels == "simclr":
        return max(1, n // 2)
    return max(1, n // 8)


def pair_counts(loss: str, n: int) -> tuple[int, int]:
    """(#positive pairs, #negative pairs) of the batch the benchmark builds (self-pairs excluded)."""
    c = num_classes(loss, n)
    per_class = n / c
    pos = n * max(per_class - 1, 0)
    neg = n * (n - per_class)
    return int(pos), int(neg)


def estimate_bytes(loss: str, n: int, dtype: str) -> int:
    """A conservative estimate of the peak extra memory of one materialising forward+backward.

    Coefficients: measured peak RSS growth of the reference and PML paths at N = 128..512 (CPU,
    fp32; e.g. MultiSimilarity ~11 N^2 floats, with the miner ~19, NTXent ~4.3 and Lifted ~5.2 per
    (pos pair x neg pair)), rounded up 1.5-2x. Most losses hold a few N x N matrices (values, masks,
    sort indices); NTXent and LiftedStructure in PML's form build (#pos pairs x #neg pairs) tensors,
    which is O(N^3). Low-precision dtypes still keep int64 indices and bool masks, so itemsize is
    floored at 4 bytes.
    """
    info = LOSSES[loss]
    item = max(DTYPES[dtype], 4)
    if loss == "proxy_anchor":
        cols = num_classes(loss, n)
    elif loss == "npairs":  # one anchor per class: C x C, plus the N x N label-equality mask
        cols = n  # the mask dominates; keep it (conservative)
    else:
        cols = n
    total = info.mat_coef * n * cols * item
    if info.pair_coef:
        pos, neg = pair_counts(loss, n)
        total += info.pair_coef * pos * neg * item
    return int(total)


def matrix_bytes(n: int, dtype: str) -> int:
    """One N x N matrix of `dtype` (the memory plots draw it as a guide)."""
    return n * n * DTYPES[dtype]


def fmt_bytes(b: float) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"
