"""What the benchmark can run, and the memory estimate that skips points a materialising provider
cannot hold. Torch-free: the driver process stays small."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossInfo:
    title: str  # the call, for summary.md; a class loss's title starts with its class name
    labels: str  # "classes": N/8 classes of 8; "simclr": cat([arange(N/2)] * 2); "uniform": randint(0, C)
    pml: bool  # has a pytorch-metric-learning counterpart
    mat_coef: float  # estimate_bytes: N x N (class-weight losses: N x C*K) elements x itemsize, materialising
    pair_coef: float = 0.0  # and (#positive pairs x #negative pairs) x itemsize (PML's P x Nneg tensors)
    per_class: int = 1  # K: weight columns per class (a class-weight loss's W has C*K columns)
    miner: tuple = ()  # (miner class, its keyword arguments): the call is loss(emb, labels, miner(emb, labels))
    default: bool = True  # in the default sweep (else only with --losses)
    compiled_reference: bool = True  # has a "compile" provider (torch.compile of a dmlkern.reference function)
    loss_kw: tuple = ()  # (name, value) arguments of the loss class (and of its reference function)

    @property
    def cls(self):
        return self.title.split("(")[0]

    @property
    def classes(self):
        """A class-weight loss: swept over C (--classes) at a fixed N (--class-n)."""
        return self.labels == "uniform"


def _class_loss(cls, mat_coef, pml=True, per_class=1, kw=""):
    return LossInfo(f"{cls}(num_classes=C, embedding_size=D{kw})(emb, labels)", "uniform", pml, mat_coef,
                    per_class=per_class)


LOSSES = {
    "multi_similarity_miner": LossInfo("MultiSimilarityLoss(emb, labels, MultiSimilarityMiner()(emb, labels))",
                                       "classes", True, 40.0, miner=("MultiSimilarityMiner", ())),
    "multi_similarity": LossInfo("MultiSimilarityLoss()(emb, labels)", "classes", True, 16.0),
    "ntxent": LossInfo("NTXentLoss()(emb, labels), SimCLR labels cat([arange(N/2)] * 2)", "simclr", True, 16.0, 7.0),
    "supcon": LossInfo("SupConLoss()(emb, labels)", "classes", True, 20.0),
    "lifted": LossInfo("LiftedStructureLoss()(emb, labels)", "classes", True, 16.0, 8.0),
    "generalized_lifted": LossInfo("GeneralizedLiftedStructureLoss()(emb, labels)", "classes", True, 16.0),
    "npairs": LossInfo("NPairsLoss()(emb, labels)", "classes", True, 8.0),
    "proxy_anchor": LossInfo("ProxyAnchorLoss(num_classes=N/8, embedding_size=D)(emb, labels)", "classes", True,
                             16.0),
    "contrastive": LossInfo("ContrastiveLoss()(emb, labels)", "classes", True, 16.0),
    # PML converts to every triplet: an N x N x N mask, then 3 int64 per triplet (~7 N^2 here)
    "margin": LossInfo("MarginLoss()(emb, labels)", "classes", True, 200.0, 0.05),
    "nca": LossInfo("NCALoss()(emb, labels)", "classes", True, 12.0),
    "tuplet_margin": LossInfo("TupletMarginLoss()(emb, labels)", "classes", True, 16.0, 4.0),
    "circle": LossInfo("CircleLoss()(emb, labels)", "classes", True, 18.0),
    # PML: about six N x N buffers per positive pair's row set (4.6 GB measured at N=5120)
    "angular": LossInfo("AngularLoss()(emb, labels)", "classes", True, 48.0),
    "triplet": LossInfo("TripletMarginLoss()(emb, labels), every triplet", "classes", True, 200.0, 0.05),
    "triplet_swap": LossInfo("TripletMarginLoss(swap=True)(emb, labels), every triplet", "classes", True, 200.0, 0.05,
                             default=False, loss_kw=(("swap", True),)),
    # PML: the N x N distance matrix for the T = 16 N triplets it draws
    "triplet_random": LossInfo("TripletMarginLoss(triplets_per_anchor=16)(emb, labels), PML's random triplets",
                               "classes", True, 8.0, default=False, compiled_reference=False,
                               loss_kw=(("triplets_per_anchor", 16),)),
    "triplet_semihard": LossInfo(
        "TripletMarginLoss()(emb, labels, TripletMarginMiner(type_of_triplets='semihard')(emb, labels))", "classes",
        True, 200.0, 0.05, miner=("TripletMarginMiner", (("type_of_triplets", "semihard"),))),
    "triplet_batch_hard": LossInfo("TripletMarginLoss()(emb, labels, BatchHardMiner()(emb, labels))", "classes", True,
                                   8.0, miner=("BatchHardMiner", ())),  # PML: 1.81 GiB at N=8192 (7.2)
    # PML's README pairing: PML turns the pairs into ~N^3 triplets through a (positive pairs x
    # negative pairs) bool match matrix (8.8 GiB measured at N=1024)
    "triplet_ms_miner": LossInfo(
        "TripletMarginLoss()(emb, labels, MultiSimilarityMiner()(emb, labels)), PML's README example", "classes",
        True, 40.0, 0.3, default=False, compiled_reference=False, miner=("MultiSimilarityMiner", ())),
    "contrastive_pair_margin": LossInfo("ContrastiveLoss()(emb, labels, PairMarginMiner()(emb, labels))", "classes",
                                        True, 16.0, miner=("PairMarginMiner", ())),
    # the rest of PML's losses with an N^3 (PNP, DynamicSoftMargin) or N^2 D (TCM) PML form; --losses only
    "pnp": LossInfo("PNPLoss()(emb, labels)", "classes", True, 8.0, 1.5, default=False, compiled_reference=False),
    "tcm": LossInfo("ThresholdConsistentMarginLoss()(emb, labels)", "classes", True, 600.0, default=False,
                    compiled_reference=False),  # PML gathers both rows of every pair: ~4 D items per pair
    "dynamic_soft_margin": LossInfo("DynamicSoftMarginLoss()(emb, labels)", "classes", True, 100.0, 0.1,
                                    default=False, compiled_reference=False),  # PML: an N^3 bool mask
    "masked_lse": LossInfo("dmlkern.ops.masked_lse(emb, x_labels=labels, mask='diff')", "classes", False, 12.0),
    "arcface": _class_loss("ArcFaceLoss", 10.0),
    "cosface": _class_loss("CosFaceLoss", 10.0),
    "sphereface": _class_loss("SphereFaceLoss", 10.0),
    "large_margin_softmax": _class_loss("LargeMarginSoftmaxLoss", 12.0),
    "normalized_softmax": _class_loss("NormalizedSoftmaxLoss", 6.0),
    "subcenter_arcface": _class_loss("SubCenterArcFaceLoss", 5.0, per_class=3, kw=", sub_centers=3"),
    "proxy_nca": _class_loss("ProxyNCALoss", 9.0),
    "soft_triple": _class_loss("SoftTripleLoss", 7.0, per_class=10, kw=", centers_per_class=10"),
    "softmax": _class_loss("SoftmaxLoss", 5.0, pml=False),
    "center": _class_loss("CenterLoss", 0.5, pml=False),
}
FLOOR_LOSS, FLOOR_PROVIDER = "matmul_floor", "torch"  # the T_mm rows: one x @ x.T (class axis: x @ W, W (D, C))

PROVIDERS = {
    "dmlkern": "dmlkern class, DMLKERN_BACKEND unset (auto)",
    "dmlkern-compiled": "torch.compile of that call (what eager per-op overhead costs)",
    "dmlkern-cpp": "DMLKERN_BACKEND=cpp",
    "dmlkern-triton": "DMLKERN_BACKEND=triton (GPU, or CPU under TRITON_INTERPRET=1)",
    "reference": "DMLKERN_BACKEND=reference (materialising PyTorch path)",
    "compile": "torch.compile(dmlkern.reference.<loss function>)",
    "pml": "pytorch_metric_learning 2.9.0 class (if importable)",
}
MATERIALISING = {"reference", "compile", "pml"}  # build N x N (or worse): skipped above the memory estimate
# The order points run in: if the sweep budget runs out, the later providers lose points.
PROVIDER_PRIORITY = ["dmlkern", "dmlkern-compiled", "dmlkern-triton", "dmlkern-cpp", "pml", "reference", "compile"]
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def jit_provider(provider: str, device: str) -> bool:
    """Whether the first call may compile (torch.compile; Triton autotuning on a GPU): --compile-limit."""
    return provider in ("compile", "dmlkern-compiled") or (device == "cuda" and provider.startswith("dmlkern"))


def supported(loss: str, provider: str) -> bool:
    info = LOSSES[loss]
    return (provider != "pml" or info.pml) and (provider != "compile" or info.compiled_reference or info.classes)


def canonical_dtype(name: str) -> str:
    aliases = {"float": "fp32", "half": "fp16", "double": "fp64", **{v: k for k, v in TORCH_DTYPES.items()}}
    name = aliases.get(name.lower(), name.lower())
    if name not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(TORCH_DTYPES)}")
    return name


def num_classes(loss: str, n: int) -> int:
    return max(1, n // 2) if loss in LOSSES and LOSSES[loss].labels == "simclr" else max(1, n // 8)


def size(pt) -> int:
    """A point's swept size: C for a class-weight loss (and its T_mm), else N."""
    return pt.get("c") or pt["n"]


def point_label(pt) -> str:
    return f"N={pt['n']}" + (f" C={pt['c']}" if pt.get("c") else "")


def weight_bytes(loss: str, c: int, d: int, dtype: str) -> int:
    """The size of a class-weight loss's W (D x C*K; CenterLoss: its centers)."""
    return c * LOSSES[loss].per_class * d * ITEMSIZE[dtype]


def estimate_bytes(loss: str, n: int, dtype: str, c=None, d=128) -> int:
    """Peak extra memory of one materialising forward + backward: measured peaks of the reference and
    PML paths at N = 128..512 (class-weight losses: N = 1024, C = 4096..16384, plus 4 W-sized tensors;
    CPU, fp32) rounded up 1.5-2x; PML's NTXent and LiftedStructure are O(N^3). Itemsize floored at 4
    bytes (int64 indices and bool masks remain)."""
    info, item = LOSSES[loss], max(ITEMSIZE[dtype], 4)
    if info.classes:
        return int((info.mat_coef * n + 4 * d) * c * info.per_class * item)
    total = info.mat_coef * n * (num_classes(loss, n) if loss == "proxy_anchor" else n) * item
    if info.pair_coef:
        per_class = n / num_classes(loss, n)
        total += info.pair_coef * int(n * max(per_class - 1, 0)) * int(n * (n - per_class)) * item
    return int(total)


def fmt_bytes(b: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"
