"""ThresholdConsistentMarginLoss over all pairs without listing them (backend "blocked").

PML lists every positive and negative pair of the batch and gathers both rows of each ((pairs, D)
tensors: ~8 GiB per tensor at N = 4096, D = 128). The loss needs four numbers per row: the sums of
margin_plus - s over its positive pairs with s <= margin_plus and of s - margin_minus over its
negative pairs with s >= margin_minus, and how many pairs each sum has (s the cosine).
`ranking.row_stats` gets them from row blocks of a `fixed_mm` product (its backward recomputes
each block: -1 or 1 on the kept pairs); memory O(B N + N D). The products by the 0/1 masks are
PML's, so a NaN cosine of a pair makes its side NaN (on CUDA; eagerly on the CPU a NaN entry runs
the reference, whose gradient has PML's NaN pattern). An indices_tuple (pairs already listed:
PML's work is O(pairs D)), a ref_emb, rows shorter than F.cosine_similarity's eps and other dtypes
run the reference.
"""
import torch

from .._determinism import fixed_order_sum
from ._common import decline, has_entry
from .ranking import _block_labels, _common_checks, _rows_of, _Spec, row_stats

BACKEND = "blocked"
_COSINE_EPS = 1e-8  # F.cosine_similarity's: shorter rows divide by it, unlike a unit row


class _TCMSpec(_Spec):
    width = 4
    values_per_row = 6

    def __init__(self, labels, margin_plus, margin_minus):
        self.labels, self.margin_plus, self.margin_minus = labels, margin_plus, margin_minus

    def _kept(self, s, r0):
        """The block's positive and negative pairs, and where s <= margin_plus / s >= margin_minus."""
        same, diag = _block_labels(self.labels, r0, s.shape[0])
        return same & ~diag, ~same, s <= self.margin_plus, s >= self.margin_minus

    def rows(self, s, r0, differentiable=False):
        """Per row: the positive side's hinge sum and count, then the negative side's."""
        positive, negative, below, above = self._kept(s, r0)
        pos_sum = torch.where(positive, (self.margin_plus - s) * below, 0).sum(dim=1)
        neg_sum = torch.where(negative, (s - self.margin_minus) * above, 0).sum(dim=1)
        counts = [(side & kept).sum(dim=1).to(s.dtype) for side, kept in ((positive, below), (negative, above))]
        return torch.stack([pos_sum, counts[0], neg_sum, counts[1]], dim=1)

    def grad_rows(self, s, r0, g_out):
        """d pos_sum / ds = -1 on the kept positive pairs, d neg_sum / ds = 1 on the kept negative
        ones (the counts have none): no autograd graph of the block."""
        positive, negative, below, above = self._kept(s, r0)
        return torch.where(positive & below, -g_out[:, :1], torch.where(negative & above, g_out[:, 2:3], 0))


def _side(total, count):
    """PML's side: 0 when no pair is kept, else the mean hinge."""
    return total / count if count > 0 else 0


def tcm(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    why = None
    if ref_emb is not embeddings or ref_labels is not labels:
        why = "ref_emb or ref_labels (PML pairs ref_labels' indices with rows of embeddings)"
    why = why or _common_checks(module, embeddings, labels, indices_tuple, ref_emb)
    if why is None and bool((torch.linalg.vector_norm(embeddings.detach(), dim=1) < _COSINE_EPS).any()):
        why = "an embedding row shorter than 1e-8 (F.cosine_similarity divides by its eps there)"
    if why is None and has_entry(torch.isnan, embeddings):
        why = "a NaN embedding entry (the reference's F.cosine_similarity gives PML's NaN pattern in the gradient)"
    if why is not None:
        return decline(module, why)
    # full precision: F.cosine_similarity is not on autocast's lists (PML's cosines are fp32 ones)
    rows = _rows_of(embeddings, "euclidean")
    stats = row_stats(rows, _TCMSpec(labels, module.margin_plus, module.margin_minus))
    stats = stats.to(embeddings.dtype)
    # counts summed in float64: exact past float32's 2^24
    pos_count, neg_count = (float(stats[:, i].detach().double().sum()) for i in (1, 3))
    loss = (module.lambda_plus * _side(fixed_order_sum(stats[:, 0]), pos_count)
            + module.lambda_minus * _side(fixed_order_sum(stats[:, 2]), neg_count))
    # no pair kept on either side: PML's Python 0, which the reducer turns into its zero
    return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}, BACKEND


__all__ = ["tcm"]
