"""NCA on the engine: one lse2 pass. PML's row i is -log sum_{same label} softmax_j(scale * mat_ij)
with the diagonal excluded when the references are the batch itself; with lse_pos / lse_neg the
log-sum-exps of the logits over the same-label / other-label references, that is
logaddexp(lse_pos, lse_neg) - lse_pos = log(1 + e^(lse_neg - lse_pos)).

| distance | mat | logit = sc * v + off (engine) |
| --- | --- | --- |
| LpDistance(power=2), the default | -d^2 = -(2 - 2s) | sc = 2 scale, off = -2 scale on s |
| CosineSimilarity, DotProductSimilarity | s | sc = scale on s |
| LpDistance() (power 1) | -d | sc = -scale on v = d (transform 1) |

(unit rows, or for normalize_embeddings=False the raw rows (dot product) or the augmented rows
of `_common.euclidean_rows`, whose s is 1 - d^2 / 2.)

PML drops the rows whose positive probability is exactly 0 (no positive, or an underflow past
~104 in fp32 / ~745 in fp64). Here a row is dropped when it has no positive or when
exp(-loss) is 0 in the embeddings' dtype (as the fused ProxyNCA does). Residual deviation: PML
rounds each positive's probability to the dtype before summing them, so a row whose positives
are each below the smallest subnormal but whose sum is not (or the reverse at the subnormal
boundary) is dropped by one side only; its loss is ~104 (fp32) either way.

Eager on the CPU the per-row dict of the kept rows is returned, as the reference's. On CUDA and
under torch.compile (no host sync, static shapes) the default MeanReducer gets the mean over the
kept rows already reduced; other reducers read the kept rows on the host on CUDA (eager) and run
the reference under torch.compile."""
import torch

from .._determinism import fixed_order_sum
from . import _stats
from ._common import Degenerate, branch_free, decline, engine_rows, is_plain_mean, static_shapes, value_params
from ._epilogue import ZERO_LOSS, _element, _log1p_exp_as_pml, _lse2, _rows_backend, kept_rows_loss


def _params(distance, scale):
    """PML's logits scale * mat (mat: the similarity, or minus the distance) as the engine's
    sc * v + off (`value_params`: the squared distances are 2 - 2s on the engine's rows)."""
    sc = scale if distance.is_inverted else -scale
    return value_params(distance, sc_pos=sc, sc_neg=sc)


def nca(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _rows_backend(module, embeddings, labels, indices_tuple, ref_emb)
    if backend is None:
        return None
    degenerate = Degenerate(embeddings, embeddings.shape[0] <= 1)  # PML's len(embeddings) <= 1
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    self_ref = ref_emb is embeddings  # PML: `query is reference` excludes the diagonal
    if self_ref and ref_labels is not labels:
        # the engine excludes self-pairs from the positives only; PML from both sides
        return decline(module, "ref_emb is embeddings with separate ref_labels")
    if ref_labels.shape[0] != ref_emb.shape[0]:
        return decline(module, "ref_labels of another length than ref_emb")  # the reference raises
    _stats.record_distance(module.distance, embeddings, ref_emb)  # PML calls its distance here
    x, y, transform = engine_rows(module.distance, embeddings, ref_emb)
    lse = _lse2(x, y, labels, ref_labels, _params(module.distance, float(module.softmax_scale)), self_ref,
                backend, transform=transform)
    lse_pos, lse_neg = lse[:, 0], lse[:, 1]
    # PML keeps a row whose positive probability is not 0: NaN counts, also without positives (0 *
    # a NaN probability, where a NaN similarity anywhere in the row makes its softmax NaN: lse_neg)
    has_pos = ~torch.isneginf(lse_pos) | torch.isnan(lse_neg)
    # -log p = log(1 + e^(lse_neg - lse_pos)), exactly 0 where PML's p rounds to 1
    losses = _log1p_exp_as_pml(lse_neg - torch.where(has_pos, lse_pos, 0.0), embeddings.dtype)  # no -inf - -inf
    kept = has_pos & (torch.exp(-losses.detach().to(embeddings.dtype)) != 0)
    if branch_free(losses):
        if is_plain_mean(module.reducer):
            count = kept.sum()
            total = fixed_order_sum(torch.where(kept, losses, 0.0))  # no row kept: PML's zero (grad 0)
            loss = degenerate.zero_where(total / count.clamp(min=1).to(total.dtype))
            return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None,
                             "reduction_type": "already_reduced",
                             **_stats.already_reduced_size(module.reducer, count)}}, backend
        if static_shapes():
            return decline(module, f"{type(module.reducer).__name__} with NCALoss under torch.compile "
                                   "(the kept rows are data-dependent; fused with MeanReducer)")
    return kept_rows_loss(module, _element(losses.to(embeddings.dtype), len(losses)), kept), backend
