"""What the fused losses share: when a configuration is fusable, the backend choice, the
normalisation, and pair counts from labels in O(N) (no N x M mask)."""
import torch
import torch.nn.functional as F

from .. import distances as dist
from ..ops import pair_engine as pe
from ..reducers import MeanReducer

CPP_CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def is_unit_cosine(distance):
    """Cosine similarity of L2-normalised rows (CosineSimilarity, or the default DotProductSimilarity)."""
    return (type(distance) in (dist.CosineSimilarity, dist.DotProductSimilarity)
            and distance.normalize_embeddings and distance.power == 1 and distance.is_inverted)


def is_unit_euclidean(distance):
    """PML's default LpDistance: Euclidean distance of L2-normalised rows, not squared."""
    return (type(distance) is dist.LpDistance and distance.normalize_embeddings and distance.p == 2
            and distance.power == 1 and not distance.is_inverted)


def is_plain_mean(reducer):
    return type(reducer) is MeanReducer


def engine_backend(tensor, backend):
    """The engine backend for `tensor`, or None when only the reference can run this call."""
    chosen = pe.choose_backend(backend, tensor.device)
    if chosen == "reference":
        return None
    if tensor.device.type == "cpu" and tensor.dtype not in CPP_CPU_DTYPES:
        return None  # fp16/bf16 on CPU: no kernel, the reference handles it
    if tensor.device.type == "cuda" and tensor.dtype not in GPU_DTYPES:
        return None
    return chosen


def unit_rows(x):
    return F.normalize(x, p=2, dim=1)


def label_stats(labels, ref_labels, exclude_diag):
    """Per query row: the number of same-label reference rows (self-pair removed when
    exclude_diag), plus the inverse index of each label for per-class sums. O(N + M)."""
    n = labels.shape[0]
    uniq, inv = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
    inv_q, inv_r = inv[:n], inv[n:]
    ref_counts = torch.bincount(inv_r, minlength=uniq.numel())
    same = ref_counts[inv_q]
    self_pair = torch.zeros_like(same)
    if exclude_diag:
        k = min(n, ref_labels.shape[0])
        self_pair[:k] = (labels[:k] == ref_labels[:k]).to(same.dtype)
    return {"pos": same - self_pair, "neg": ref_labels.shape[0] - same, "self_pair": self_pair,
            "inv_q": inv_q, "inv_r": inv_r, "num_labels": uniq.numel()}


def short_circuit(stats):
    """PML's `len <= 1` rule on all pairs from labels: at most one positive and one negative pair."""
    return int(stats["pos"].sum()) <= 1 and int(stats["neg"].sum()) <= 1
