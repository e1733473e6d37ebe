"""Distance / similarity modules with pytorch-metric-learning (PML 2.9.0) semantics.

Every distance maps ``(query_emb (B, D), ref_emb (R, D) or None)`` to a (B, R) matrix:

* the embeddings are L2-normalised first when ``normalize_embeddings`` (default True);
* ``compute_mat`` builds the matrix, which is then raised to ``power`` (default 1);
* ``is_inverted`` marks similarities (larger means closer); ``margin``, ``smallest_dist``
  and ``largest_dist`` take it into account.

``DotProductSimilarity`` normalises by default (the BaseDistance default), so its values equal
``CosineSimilarity``'s, exactly as in PML.

Differences from PML (values are the same everywhere):

* an inverted LpDistance/SNRDistance or a non-normalising CosineSimilarity raises
  ``InvalidInputError`` (a ValueError that is also an AssertionError; PML asserts or raises
  TypeError); ``DotProductSimilarity(is_inverted=...)`` is accepted and forced to True (PML:
  TypeError);
* LpDistance's float16 path works one query row at a time and SNRDistance in blocks of query
  rows, instead of materialising (B*R, D) / (B, R, D) tensors;

On CPU fp32 / fp64 tensors (eager, plain tensors) the matrices of DotProductSimilarity,
CosineSimilarity and LpDistance (p=2) come from ``dmlkern.ops.fixed_mm`` / ``fixed_cdist``: the
same values as torch.matmul / torch.cdist within rounding, bit-identical at any thread count
(MKL's products are not), gradients included.

Statistics (PML's, with ``collect_stats=True`` or ``dmlkern.utils.common_functions.COLLECT_STATS``):
``initial_avg_query_norm``, ``initial_avg_ref_norm``, ``final_avg_query_norm``,
``final_avg_ref_norm`` (mean p-norm of the rows before / after normalisation), reset and recorded
on every call. ``record_stats(query, ref)`` records them without building the matrix (the fused
losses call it where PML's loss would call the distance).
"""

import torch

from . import _pml_paths
from ._tracing import forward_ad_active
from ._validation import InvalidInputError
from .utils.common_functions import RecordsMixin

__all__ = [
    "BaseDistance",
    "LpDistance",
    "DotProductSimilarity",
    "CosineSimilarity",
    "SNRDistance",
    "BatchedDistance",
]


_NORM_STATS = ["initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm", "final_avg_ref_norm"]


def _fixed_ops(query_emb, ref_emb):
    """dmlkern.ops.fixed_mm_op where this product should go through it: plain 2-D CPU tensors of
    one dtype with its kernel (fp32, fp64), eager (torch.compile, CPU autocast, forward-mode AD,
    dispatch modes and functorch transforms other than grad / vjp keep torch's ops: autocast's
    bf16 matmul is PML's result there). There the matrix's bits (and its gradients') do not
    depend on the thread count, as torch.matmul's and torch.cdist's do (MKL splits a product by
    it): the reference path, the fallbacks and the small-problem shortcuts of the losses inherit
    the fused paths' determinism. Else None."""
    if (query_emb.device.type != "cpu" or query_emb.dim() != 2 or ref_emb.dim() != 2
            or query_emb.dtype != ref_emb.dtype or torch.is_autocast_enabled("cpu")
            or forward_ad_active()):  # forward-mode AD: torch's ops carry tangents
        return None
    from .ops import fixed_mm_op  # here: dmlkern.ops imports the reference, which imports this module
    if not fixed_mm_op.runs_kernel(query_emb) or not fixed_mm_op._direct_call_ok(query_emb, ref_emb):
        return None
    return fixed_mm_op


def matmul_t(query_emb, ref_emb):
    """query_emb @ ref_emb.T (over the last two dimensions), through fixed_mm where `_fixed_ops`
    allows."""
    fixed = _fixed_ops(query_emb, ref_emb)
    if fixed is not None:
        return fixed.fixed_mm(query_emb, ref_emb)
    return torch.matmul(query_emb, ref_emb.transpose(-1, -2))


def _empty_mat(query_emb, ref_emb):
    """The (0, R) matrix of an empty query batch in the graph of both inputs (their gradients:
    zeros), as PML's."""
    return query_emb.sum(dim=1, keepdim=True) + 0 * ref_emb.sum(dim=1)


class BaseDistance(RecordsMixin, torch.nn.Module):
    def __init__(self, normalize_embeddings=True, p=2, power=1, is_inverted=False, collect_stats=None, **kwargs):
        super().__init__(**kwargs)
        self._init_records(collect_stats)
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power
        self.is_inverted = is_inverted
        self.add_to_recordable_attributes(list_of_names=["p", "power"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=_NORM_STATS, is_stat=True)

    # ------------------------------------------------------------------ main entry
    def forward(self, query_emb, ref_emb=None):
        self.reset_stats()
        self.check_shapes(query_emb, ref_emb)
        query_n = self.maybe_normalize(query_emb)
        if ref_emb is None:
            ref_emb = query_emb
            ref_n = query_n
        else:
            ref_n = self.maybe_normalize(ref_emb)
        self.set_default_stats(query_emb, ref_emb, query_n, ref_n)
        mat = self.compute_mat(query_n, ref_n)
        if self.power != 1:
            mat = mat**self.power
        if mat.shape != (query_emb.shape[0], ref_emb.shape[0]):
            raise RuntimeError("distance matrix has the wrong shape")
        return mat

    def compute_mat(self, query_emb, ref_emb):
        raise NotImplementedError

    def pairwise_distance(self, query_emb, ref_emb):
        """Row-wise distance between matched rows (no normalisation, no power)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def smallest_dist(self, *args, **kwargs):
        """min for distances, max for similarities (the "closest" value)."""
        if self.is_inverted:
            return torch.max(*args, **kwargs)
        return torch.min(*args, **kwargs)

    def largest_dist(self, *args, **kwargs):
        """max for distances, min for similarities (the "farthest" value)."""
        if self.is_inverted:
            return torch.min(*args, **kwargs)
        return torch.max(*args, **kwargs)

    def margin(self, x, y):
        """How much farther x is than y: ``x - y`` for distances, ``y - x`` for similarities."""
        if self.is_inverted:
            return y - x
        return x - y

    def normalize(self, embeddings, dim=1, **kwargs):
        return torch.nn.functional.normalize(embeddings, p=self.p, dim=dim, **kwargs)

    def maybe_normalize(self, embeddings, dim=1, **kwargs):
        if self.normalize_embeddings:
            return self.normalize(embeddings, dim=dim, **kwargs)
        return embeddings

    def get_norm(self, embeddings, dim=1, **kwargs):
        return torch.norm(embeddings, p=self.p, dim=dim, **kwargs)

    # ------------------------------------------------------------------ statistics
    def set_default_stats(self, query_emb, ref_emb, query_emb_normalized, ref_emb_normalized):
        if self.collect_stats and not torch.compiler.is_compiling():
            with torch.no_grad():
                values = (query_emb, ref_emb, query_emb_normalized, ref_emb_normalized)
                for name, x in zip(_NORM_STATS, values):
                    setattr(self, name, torch.mean(self.get_norm(x)).item())

    def record_stats(self, query_emb, ref_emb=None):
        """Records the statistics a call ``self(query_emb, ref_emb)`` would, in O((B + R) D)
        without the matrix; a no-op unless the distance collects statistics."""
        if not self.collect_stats:
            return
        self.reset_stats()
        ref_emb = query_emb if ref_emb is None else ref_emb
        with torch.no_grad():
            self.set_default_stats(query_emb, ref_emb, self.maybe_normalize(query_emb), self.maybe_normalize(ref_emb))

    @staticmethod
    def check_shapes(query_emb, ref_emb):
        if query_emb.ndim != 2 or (ref_emb is not None and ref_emb.ndim != 2):
            raise ValueError("embeddings must be a 2D tensor of shape (batch_size, embedding_size)")

    def extra_repr(self):
        return (
            f"normalize_embeddings={self.normalize_embeddings}, p={self.p}, "
            f"power={self.power}, is_inverted={self.is_inverted}"
        )


class LpDistance(BaseDistance):
    """Minkowski distance ``||q - r||_p`` (default: normalised, non-squared Euclidean)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.is_inverted:
            raise InvalidInputError("LpDistance cannot be inverted")

    def compute_mat(self, query_emb, ref_emb):
        if ref_emb is None:
            ref_emb = query_emb
        if query_emb.dtype == torch.float16:
            # cdist has no fp16 kernel; go through matched rows, one query row at a time
            # (O(R*D) extra memory instead of PML's O(B*R*D)).
            rows = [self.pairwise_distance(q.unsqueeze(0).expand_as(ref_emb), ref_emb) for q in query_emb]
            if len(rows) == 0:
                return _empty_mat(query_emb, ref_emb)
            return torch.stack(rows, dim=0)
        fixed = _fixed_ops(query_emb, ref_emb) if self.p == 2 else None
        if fixed is not None:
            return fixed.fixed_cdist(query_emb, ref_emb)
        return torch.cdist(query_emb, ref_emb, p=self.p)

    def pairwise_distance(self, query_emb, ref_emb):
        return torch.nn.functional.pairwise_distance(query_emb, ref_emb, p=self.p)


class DotProductSimilarity(BaseDistance):
    """``q . r``; embeddings are normalised by default, so this equals cosine similarity."""

    def __init__(self, **kwargs):
        kwargs["is_inverted"] = True
        super().__init__(**kwargs)

    def compute_mat(self, query_emb, ref_emb):
        return matmul_t(query_emb, ref_emb)

    def pairwise_distance(self, query_emb, ref_emb):
        return torch.sum(query_emb * ref_emb, dim=1)


class CosineSimilarity(DotProductSimilarity):
    """Dot product of L2-normalised embeddings (normalisation is mandatory)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not self.normalize_embeddings:
            raise InvalidInputError("CosineSimilarity requires normalize_embeddings=True")


class SNRDistance(BaseDistance):
    """Signal-to-noise-ratio distance: ``var(q - r) / var(q)`` (unbiased variances over D)."""

    # Query rows per chunk, so the (chunk, R, D) difference tensor stays bounded.
    _chunk_elems = 1 << 24

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.is_inverted:
            raise InvalidInputError("SNRDistance cannot be inverted")

    def compute_mat(self, query_emb, ref_emb):
        q_var = torch.var(query_emb, dim=1)
        R, D = ref_emb.shape
        chunk = max(1, self._chunk_elems // max(1, R * D))
        pieces = []
        for s in range(0, query_emb.shape[0], chunk):
            diff = query_emb[s : s + chunk].unsqueeze(1) - ref_emb.unsqueeze(0)
            pieces.append(torch.var(diff, dim=2))
        if len(pieces) == 0:
            return _empty_mat(query_emb, ref_emb)
        return torch.cat(pieces, dim=0) / q_var.unsqueeze(1)

    def pairwise_distance(self, query_emb, ref_emb):
        return torch.var(query_emb - ref_emb, dim=1) / torch.var(query_emb, dim=1)


class BatchedDistance(torch.nn.Module):
    """Runs ``distance`` on blocks of ``batch_size`` query rows against all of ``ref_emb`` and
    passes each block to ``iter_fn(mat, s, e)`` (rows s:e); returns None, as PML. Other attributes
    are the wrapped distance's."""

    def __init__(self, distance, iter_fn=None, batch_size=32):
        super().__init__()
        self.distance = distance
        self.iter_fn = iter_fn
        self.batch_size = batch_size

    def forward(self, query_emb, ref_emb=None):
        ref_emb = query_emb if ref_emb is None else ref_emb
        for s in range(0, query_emb.shape[0], self.batch_size):
            e = s + self.batch_size
            self.iter_fn(self.distance(query_emb[s:e], ref_emb), s, e)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.distance, name)


_pml_paths.register(__name__, {
    "base_distance": ["BaseDistance"], "batched_distance": ["BatchedDistance"],
    "cosine_similarity": ["CosineSimilarity"], "dot_product_similarity": ["DotProductSimilarity"],
    "lp_distance": ["LpDistance"], "snr_distance": ["SNRDistance"],
})
