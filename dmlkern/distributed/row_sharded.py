"""Row-sharded forms of global-batch losses: each rank computes only its own rows against the
gathered columns (work O(N_local · N_g · D), memory O(N_g · D)), exact for the global batch.

The columns are every rank's rows, own rows first (`collectives.gather_columns`), so a row's
self-pair is the diagonal, which the engine excludes (exclude_diag with y ≠ x). Per-row losses
go to the reducer through `gather_values`, so the reducer sees the global batch's per-row losses
(any element reducer). NT-Xent's mean over positive pairs divides the gathered per-row sums by the
global number of positive pairs. The columns' gradients return to their owners in the
all-reduce of `gather_columns`' backward.

Every choice between this path and the wrapper's gathered one depends only on what every rank
has alike (the module's configuration, the shard sizes, the gathered labels), so all ranks take
the same path and call the same collectives. Batches PML treats as degenerate (a global batch
without a positive or negative pair, one row) take the gathered path.
"""
import torch

from .. import _validation
from ..engine_spec import EngineParams
from ..fused import _common
from ..fused._epilogue import _element, _log1p_exp, _lse2, _per_row
from ..fused.ntxent import _apply_ntxent_rows
from ..reducers import DoNothingReducer, MeanReducer
from . import collectives as co


def _multi_similarity(module, x, y, ids, col_ids, backend):
    a, b, base = float(module.alpha), float(module.beta), float(module.base)
    params = EngineParams(sc_pos=-a, off_pos=a * base, sc_neg=b, off_neg=-b * base)
    softplus = _log1p_exp(_lse2(x, y, ids, col_ids, params, True, backend))
    return softplus[:, 0] / a + softplus[:, 1] / b


def _supcon(module, x, y, ids, col_ids, backend):
    inv_t = 1.0 / float(module.temperature)
    lse = _lse2(x, y, ids, col_ids, EngineParams(sc_pos=inv_t, sc_neg=inv_t), True, backend)
    stats = _common.LabelStats(ids, col_ids)  # two tensors: `same` counts the row itself
    pos_sim_sum = (x * _common.class_sums_for_rows(stats, y)).sum(dim=1) - (x * y[:x.shape[0]]).sum(dim=1)
    count = (stats.same - 1).to(lse.dtype)
    pos_sim_mean = pos_sim_sum.to(lse.dtype) / (count + torch.finfo(x.dtype).tiny)
    # fused/supcon.py's arrangement: nothing of size 1/t cancels
    lse_pos = torch.where(count > 0, lse[:, 0], 0.0)
    pos_spread = torch.where(count == 1, 0.0, lse_pos - pos_sim_mean * inv_t)
    return torch.where(count > 0, pos_spread + _log1p_exp(lse[:, 1] - lse_pos), 0.0)


def _ntxent_row_sums(module, x, y, ids, col_ids, backend):
    inv_t = 1.0 / float(module.temperature)
    return _apply_ntxent_rows(x, y, ids, col_ids, EngineParams(sc_pos=inv_t, sc_neg=inv_t), True, backend)[0]


def _types():
    from .. import losses

    return {
        losses.MultiSimilarityLoss: (_multi_similarity, "per_row", lambda r: not isinstance(r, DoNothingReducer)),
        losses.SupConLoss: (_supcon, "element", lambda r: not isinstance(r, DoNothingReducer)),
        losses.NTXentLoss: (_ntxent_row_sums, "mean_over_pos", lambda r: type(r) is MeanReducer),
    }


def _eligible(module, emb, labels, indices_tuple, ref_emb, ref_labels):
    """The row form of this call, from the module's configuration and the inputs' kinds alone
    (no collective: every rank decides alike), or None."""
    form = _types().get(type(module))
    if form is None or labels is None or indices_tuple is not None or ref_emb is not None or ref_labels is not None:
        return None
    if not _common.is_unit_cosine(module.distance) or getattr(module, "embedding_regularizer", None) is not None:
        return None
    if not form[2](module.reducer) or getattr(module.reducer, "collect_stats", False):
        return None
    if emb.dim() != 2 or labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        return None  # the gathered path's loss raises PML's error naming the argument
    if _common.engine_backend(emb, module.backend) is None:
        return None
    return form


def _globally_degenerate(global_ids, kind):
    stats = _common.LabelStats(global_ids, global_ids)
    if kind == "per_row":  # Multi-Similarity: PML's `len <= 1` rule: no pair at all
        return global_ids.shape[0] <= 1
    return bool(_common.no_pos_or_neg(stats))


def loss(module, emb, labels, indices_tuple, ref_emb, ref_labels):
    """The loss of the global batch computed from this rank's rows, or None (the wrapper gathers)."""
    form = _eligible(module, emb, labels, indices_tuple, ref_emb, ref_labels)
    if form is None:
        return None
    per_row_fn, kind, _ = form
    sizes = co.shard_sizes(emb.shape[0], emb.device)
    if min(sizes) == 0:
        return None
    labels = labels.to(emb.device)
    raw_cols = co.gather_labels(labels, sizes)  # own first
    col_ids = _validation.as_class_ids(raw_cols, emb.device)  # float labels: ids from the global values
    if _globally_degenerate(col_ids, kind):
        return None
    backend = _common.engine_backend(emb, module.backend)
    n = emb.shape[0]
    ids = col_ids[:n]
    x = _common.unit_rows(emb)
    y = _common.unit_rows(co.gather_columns(emb, sizes))
    per_row = per_row_fn(module, x, y, ids, col_ids, backend)
    module.last_backend, module.last_fallback = backend, None
    all_rows = co.gather_values(per_row, sizes)  # rank order, the same on every rank
    if kind == "mean_over_pos":
        global_ids = co.gather_labels(col_ids[:n], sizes, own_first_order=False)
        pos_pairs = _common.LabelStats(global_ids, global_ids).pos_total.clamp(min=1)
        return (all_rows.sum() / pos_pairs).to(emb.dtype)
    global_ids = co.gather_labels(ids, sizes, own_first_order=False)
    entry = _per_row(all_rows, emb) if kind == "per_row" else _element(all_rows.to(emb.dtype), all_rows.shape[0])
    rank_order_stand_in = emb[:0]  # reducers read only its dtype and device, and sum it for a zero with a gradient
    return module.reducer({"loss": entry}, rank_order_stand_in, global_ids)
