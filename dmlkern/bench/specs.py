"""What the benchmark can run: losses, providers, dtypes, and the memory estimate used to skip
points a materialising provider cannot hold. Torch-free, so the driver process stays small."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossInfo:
    title: str  # what the provider runs, for summary.md
    labels: str  # "classes": N/8 classes of 8; "simclr": cat([arange(N/2)] * 2)
    pml: bool  # has a pytorch-metric-learning counterpart
    mat_coef: float  # bytes per N x N matrix element / itemsize of a materialising run (estimate_bytes)
    pair_coef: float = 0.0  # x (#positive pairs x #negative pairs) x itemsize (PML's P x Nneg tensors)


LOSSES = {
    "multi_similarity_miner": LossInfo("MultiSimilarityLoss(emb, labels, MultiSimilarityMiner()(emb, labels))",
                                       "classes", True, 40.0),
    "multi_similarity": LossInfo("MultiSimilarityLoss()(emb, labels)", "classes", True, 16.0),
    "ntxent": LossInfo("NTXentLoss()(emb, labels), SimCLR labels cat([arange(N/2)] * 2)", "simclr", True, 16.0, 7.0),
    "supcon": LossInfo("SupConLoss()(emb, labels)", "classes", True, 20.0),
    "lifted": LossInfo("LiftedStructureLoss()(emb, labels)", "classes", True, 16.0, 8.0),
    "generalized_lifted": LossInfo("GeneralizedLiftedStructureLoss()(emb, labels)", "classes", True, 16.0),
    "npairs": LossInfo("NPairsLoss()(emb, labels)", "classes", True, 8.0),
    "proxy_anchor": LossInfo("ProxyAnchorLoss(num_classes=N/8, embedding_size=D)(emb, labels)", "classes", True,
                             16.0),
    "masked_lse": LossInfo("dmlkern.ops.masked_lse(emb, x_labels=labels, mask='diff')", "classes", False, 12.0),
}
FLOOR_LOSS, FLOOR_PROVIDER = "matmul_floor", "torch"  # the T_mm rows: one x @ x.T

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
MATERIALISING = {"reference", "compile", "pml"}  # build N x N (or worse): skipped above the memory estimate
# The order points run in: if the sweep budget runs out, the later providers lose points.
PROVIDER_PRIORITY = ["dmlkern", "dmlkern-compiled", "dmlkern-triton", "dmlkern-cpp", "pml", "reference", "compile"]
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}  # name -> itemsize
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                 "float64": "fp64", "double": "fp64"}


def jit_provider(provider: str, device: str) -> bool:
    """Whether the first call may JIT-compile (torch.compile; Triton autotuning on a GPU): it gets
    --compile-limit on top of --time-limit."""
    return provider in ("compile", "dmlkern-compiled") or (device == "cuda" and provider.startswith("dmlkern"))


def supported(loss: str, provider: str) -> bool:
    return provider != "pml" or LOSSES[loss].pml


def canonical_dtype(name: str) -> str:
    name = DTYPE_ALIASES.get(name.lower(), name.lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return name


def num_classes(loss: str, n: int) -> int:
    return max(1, n // 2) if LOSSES[loss].labels == "simclr" else max(1, n // 8)


def estimate_bytes(loss: str, n: int, dtype: str) -> int:
    """A conservative estimate of the peak extra memory of one materialising forward+backward:
    measured peak RSS growth of the reference and PML paths at N = 128..512 (CPU, fp32; e.g.
    MultiSimilarity ~11 N^2 floats, with the miner ~19, NTXent ~4.3 and Lifted ~5.2 per (pos pair
    x neg pair)), rounded up 1.5-2x. PML's NTXent and LiftedStructure build (#pos pairs x #neg
    pairs) tensors: O(N^3). Itemsize is floored at 4 bytes (int64 indices and bool masks remain)."""
    info, item = LOSSES[loss], max(DTYPES[dtype], 4)
    total = info.mat_coef * n * (num_classes(loss, n) if loss == "proxy_anchor" else n) * item
    if info.pair_coef:
        per_class = n / num_classes(loss, n)
        total += info.pair_coef * int(n * max(per_class - 1, 0)) * int(n * (n - per_class)) * item
    return int(total)


def matrix_bytes(n: int, dtype: str) -> int:
    """One N x N matrix of `dtype` (the memory plots draw it as a guide)."""
    return n * n * DTYPES[dtype]


def fmt_bytes(b: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"
