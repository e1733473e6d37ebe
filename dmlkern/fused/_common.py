"""What the fused losses share: when a configuration is fusable, the backend choice, the
normalisation, and pair counts from labels in O(N) (no N x M mask)."""
import torch
import torch.nn.functional as F

from .. import distances as dist
from ..ops import pair_engine as pe
from .._tracing import static_shapes  # noqa: F401 (the fused losses import it from here)
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
    exclude_diag) and of different-label ones, in O((N + M) log M) with static shapes (sort +
    searchsorted, so torch.compile can trace it). `run_q` / `run_r`: where each query / reference
    row's label run starts among the sorted reference labels, an id for per-class sums."""
    n, m = labels.shape[0], ref_labels.shape[0]
    sorted_ref = torch.sort(ref_labels).values
    run_q = torch.searchsorted(sorted_ref, labels)
    same = torch.searchsorted(sorted_ref, labels, right=True) - run_q
    self_pair = torch.zeros_like(same)
    if exclude_diag:
        k = min(n, m)
        self_pair[:k] = (labels[:k] == ref_labels[:k]).to(same.dtype)
    return {"pos": same - self_pair, "neg": m - same, "same": same, "self_pair": self_pair,
            "run_q": run_q, "run_r": torch.searchsorted(sorted_ref, ref_labels)}


def class_sums_for_rows(stats, y):
    """For each query row, the sum of the reference rows y with its label (0 if none): O(M D)."""
    sums = y.new_zeros(y.shape[0] + 1, y.shape[1]).index_add(0, stats["run_r"], y)
    return sums[stats["run_q"]] * (stats["same"] > 0).to(y.dtype)[:, None]


def short_circuit(stats):
    """PML's `len <= 1` rule on all pairs from labels: at most one positive and one negative
    pair. A 0-dim bool tensor (no host sync under torch.compile)."""
    return (stats["pos"].sum() <= 1) & (stats["neg"].sum() <= 1)


def no_pos_or_neg(stats):
    """No positive pair, or no negative pair, anywhere in the batch (0-dim bool tensor)."""
    return (stats["pos"].sum() == 0) | (stats["neg"].sum() == 0)


def _without_branch(degenerate):
    """Under torch.compile (no data-dependent branch) and for CUDA tensors (no host sync: the
    GPU keeps its queue), degenerate batches are zeroed with torch.where, not returned early."""
    return static_shapes() or degenerate.is_cuda


def returns_zero_now(degenerate):
    """Eager on the CPU: True when the batch is degenerate, so the caller returns the
    reference's zero loss at once (last_backend "zero"). Under torch.compile and on CUDA:
    False; the caller then zeroes its losses with `zero_where`, which has the same value and
    gradient (0)."""
    if _without_branch(degenerate):
        return False
    return bool(degenerate)


def zero_where(degenerate, losses):
    if not _without_branch(degenerate):
        return losses
    return torch.where(degenerate, torch.zeros_like(losses), losses)
