"""Row-sharded forms of global-batch losses: each rank computes only its own rows against the
gathered columns (work O(N_local · N_g · D), memory O(N_g · D)), exact for the global batch.

The columns are every rank's rows, own rows first (`collectives.gather_columns`), so a row's
self-pair is the diagonal, which the engine excludes (exclude_diag with y ≠ x). A form's `rows`
gives this rank's per-row statistics; they go to `combine` through `gather_values`, so every rank
combines the global batch's per-row statistics alike: the reducer on the per-row losses
(Multi-Similarity, SupCon, Generalized Lifted, Circle: any element reducer), NT-Xent's sum over positive pairs divided by the
global number of them, Contrastive's hinge totals reduced per sub-loss. The columns' gradients
return to their owners in the all-reduce of `gather_columns`' backward.

Every choice between this path and the wrapper's gathered one depends only on what every rank
has alike (the module's configuration, the shard sizes, the gathered labels and columns), so all
ranks take the same path and call the same collectives. Batches PML treats as degenerate (one
row; no positive or no negative pair for SupCon and NT-Xent) take the gathered path.
"""
import torch

from .. import _tracing, _validation
from ..engine_spec import MINING_MULTI_SIMILARITY, PASS_EXTREMA, PASS_HINGE, stats_dtype
from ..fused import _common
from ..fused import contrastive as fused_contrastive
from ..fused.circle import circle_rows
from ..fused.generalized_lifted import generalized_lifted_rows
from ..fused._epilogue import _already_reduced, _already_reduced_kinds, _element, _log1p_exp_as_pml, _lse2, _per_row
from ..fused import triplet as fused_triplet
from ..fused.lazy_pairs import LazyMinedPairs, LazyMinedTriplets
from ..fused.multi_similarity import multi_similarity_params
from ..fused.ntxent import _apply_ntxent_rows, ntxent_params
from ..fused.proxy_anchor import proxy_anchor_params
from ..fused.supcon import supcon_rows
from ..ops import pair_engine as pe
from ..reducers import DoNothingReducer, MeanReducer
from . import collectives as co


class _MultiSimilarity:
    @staticmethod
    def accepts(module):
        return not isinstance(module.reducer, DoNothingReducer)

    @staticmethod
    def rows(module, x, y, ids, col_ids, backend, transform):
        params = multi_similarity_params(module, 0.0, module.distance)
        softplus = _log1p_exp_as_pml(_lse2(x, y, ids, col_ids, params, True, backend, transform=transform), x.dtype)
        a, b = float(module.alpha), float(module.beta)  # (params' scales carry the distance's sign and scale)
        return softplus[:, 0] / a + softplus[:, 1] / b

    @staticmethod
    def degenerate(global_ids):  # PML's `len <= 1` rule: no pair at all
        return global_ids.shape[0] <= 1

    @staticmethod
    def combine(module, all_rows, global_ids, zero_like):
        return module.reducer({"loss": _per_row(all_rows, zero_like)}, zero_like, global_ids)


def _holds_global_batch(mined, sizes, cols, r):
    """Whether a miner's lazy result was mined on this global batch in rank order (as
    DistributedMinerWrapper mines it; cols: the batch with this rank's rows first)."""
    n, before = sizes[r], sum(sizes[:r])
    if mined.mining.n != sum(sizes) or mined.mining.m != sum(sizes):
        return False
    rank_order = torch.cat([cols[n:n + before], cols[:n], cols[n + before:]]).detach()
    return mined.mining.query.holds(rank_order)


def _minable(indices_tuple):
    """A MultiSimilarityMiner's lazy pairs the kernel can mine itself (checked against the global
    batch once gathered: `_MultiSimilarityMined.holds`)."""
    return (isinstance(indices_tuple, LazyMinedPairs) and not indices_tuple.is_materialized
            and _common.is_unit_cosine(indices_tuple.distance) and indices_tuple.kernel_can_mine
            and indices_tuple.exclude_diag)


class _MultiSimilarityMined(_MultiSimilarity):
    """With DistributedMinerWrapper(MultiSimilarityMiner)'s lazy pairs, mined on the global batch
    (rank order): each row's extrema over all columns, then lse2 with the miner's masks, as the
    fused loss does in one process. Batches in which at most one row has a mined positive or
    negative pair (PML's `len <= 1` rule may apply) take the gathered path."""

    @staticmethod
    def rows(module, x, y, ids, col_ids, backend, eps):
        params = multi_similarity_params(module, eps)
        a, b = -params.sc_pos, params.sc_neg
        with torch.no_grad():
            extrema = pe.engine_forward(x, y, ids, col_ids, pass_kind=PASS_EXTREMA, params=params, exclude_diag=True,
                                        backend=backend)
        row_in = torch.cat([extrema, torch.zeros_like(extrema[:, :1])], dim=1)
        lse = _lse2(x, y, ids, col_ids, params, True, backend, row_in, mining=MINING_MULTI_SIMILARITY)
        softplus = _log1p_exp_as_pml(lse, x.dtype)
        rows_with_pairs = torch.stack([torch.isfinite(lse[:, 0]).sum(), torch.isfinite(lse[:, 1]).sum()])
        return softplus[:, 0] / a + softplus[:, 1] / b, rows_with_pairs


class _SupCon(_MultiSimilarity):
    @staticmethod
    def rows(module, x, y, ids, col_ids, backend, transform):  # (the similarities: transform 0)
        stats = _common.LabelStats(ids, col_ids, exclude_diag=True)  # row i's self pair is column i
        return supcon_rows(module, x, y, ids, col_ids, stats, True, backend, x.dtype)

    @staticmethod
    def degenerate(global_ids):
        return bool(_common.no_pos_or_neg(_common.LabelStats(global_ids, global_ids)))

    @staticmethod
    def combine(module, all_rows, global_ids, zero_like):
        entry = _element(all_rows.to(zero_like.dtype), all_rows.shape[0])
        return module.reducer({"loss": entry}, zero_like, global_ids)


class _NTXent(_SupCon):
    @staticmethod
    def accepts(module):
        return type(module.reducer) is MeanReducer

    @staticmethod
    def rows(module, x, y, ids, col_ids, backend, transform):  # per row: the sum over its positives
        return _apply_ntxent_rows(x, y, ids, col_ids, ntxent_params(module, x), True, backend, transform)[0]

    @staticmethod
    def combine(module, all_rows, global_ids, zero_like):
        pos_pairs = _common.LabelStats(global_ids, global_ids).pos_total.clamp(min=1)
        return (all_rows.sum() / pos_pairs).to(zero_like.dtype)


class _GeneralizedLifted(_MultiSimilarity):
    @staticmethod
    def rows(module, x, y, ids, col_ids, backend, transform):
        return generalized_lifted_rows(module, x, y, ids, col_ids, True, backend, module.distance)


class _Circle(_MultiSimilarity):
    @staticmethod
    def rows(module, x, y, ids, col_ids, backend, transform):  # (unit cosine only)
        stats = _common.LabelStats(ids, col_ids)  # two tensors: `same` counts the row itself
        complete = (stats.same > 1) & (stats.m - stats.same > 0)
        return circle_rows(module, x, y, ids, col_ids, True, backend, complete)


def _reducer_kinds(module):
    """{sub-loss: (kind, reducer)} when each of Contrastive's reducers follows from the hinge totals."""
    return _already_reduced_kinds(module, fused_contrastive.SUB_LOSSES, fused_contrastive._KINDS)


class _Contrastive(_MultiSimilarity):
    @staticmethod
    def accepts(module):
        return _reducer_kinds(module) is not None

    @staticmethod
    def rows(module, x, y, ids, col_ids, backend, transform):  # per row: the hinge pass's sums and counts
        params = fused_contrastive.hinge_params(module, module.distance)
        return pe.engine_forward(x, y, ids, col_ids, pass_kind=PASS_HINGE, transform=transform, params=params,
                                 exclude_diag=True, backend=backend)

    @staticmethod
    def combine(module, all_rows, global_ids, zero_like):
        pos_sum, pos_nonzero, neg_sum, neg_nonzero = fused_contrastive.hinge_totals(all_rows)
        stats = _common.LabelStats(global_ids, global_ids)
        kinds = _reducer_kinds(module)
        loss_dict = {}
        for name, total, nonzero, count in (("pos_loss", pos_sum, pos_nonzero, stats.pos_total),
                                            ("neg_loss", neg_sum, neg_nonzero, stats.neg_total)):
            kind, reducer = kinds[name]
            value = _common.reduced_sub_loss(kind, total, nonzero.detach(), count, reducer, zero_like)
            loss_dict[name] = _already_reduced(value, zero_like)
        return module.reducer(loss_dict, zero_like, global_ids)


def _forms():
    from .. import losses

    return {losses.MultiSimilarityLoss: _MultiSimilarity, losses.SupConLoss: _SupCon, losses.NTXentLoss: _NTXent,
            losses.ContrastiveLoss: _Contrastive, losses.GeneralizedLiftedStructureLoss: _GeneralizedLifted,
            losses.CircleLoss: _Circle}


def _distance_ok(form, module):
    """The distances each form's fused loss takes in one process (`_common.engine_rows` kinds)."""
    if form in (_Circle, _MultiSimilarityMined):
        return _common.is_unit_cosine(module.distance)
    kind = _common.engine_distance(module.distance)
    return kind is not None and (form is not _SupCon or kind in _common.DOT_KINDS)


def _eligible(module, emb, labels, indices_tuple, ref_emb, ref_labels):
    """The row form of this call, from the module's configuration and the inputs' kinds alone
    (no collective: every rank decides alike), or None."""
    form = _forms().get(type(module))
    if form is _MultiSimilarity and _minable(indices_tuple):
        form = _MultiSimilarityMined
    elif indices_tuple is not None:
        return None
    if form is None or labels is None or ref_emb is not None or ref_labels is not None:
        return None
    if not _distance_ok(form, module) or getattr(module, "embedding_regularizer", None) is not None:
        return None
    if not form.accepts(module) or getattr(module.reducer, "collect_stats", False):
        return None
    if emb.dim() != 2 or labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        return None  # the gathered path's loss raises PML's error naming the argument
    if _common.engine_backend(emb, module.backend) is None:
        return None
    return form


def _proxy_anchor_eligible(module, emb, labels, indices_tuple, ref_emb, ref_labels):
    from ..losses import ProxyAnchorLoss

    return (type(module) is ProxyAnchorLoss and labels is not None and indices_tuple is None and ref_emb is None
            and ref_labels is None and _common.is_unit_cosine(module.distance)
            and getattr(module, "embedding_regularizer", None) is None
            and getattr(module, "weight_regularizer", None) is None
            and not getattr(module.reducer, "collect_stats", False) and not isinstance(module.reducer, DoNothingReducer)
            and emb.dim() == 2 and labels.dim() == 1 and labels.shape[0] == emb.shape[0]
            and not (labels.dtype.is_floating_point or labels.dtype == torch.bool)
            and emb.shape[1] == module.proxies.shape[1] and _common.engine_backend(emb, module.backend) is not None)


def _proxy_anchor(module, emb, labels):
    """ProxyAnchor with the samples sharded: each proxy's log-sum-exps over this rank's samples
    (the engine with the proxies as rows), combined over ranks as log Σ_r exp(lse_r), so the
    per-proxy losses and the reducer are the global batch's on every rank. The proxies' gradient
    is summed over ranks (each rank's part from its own samples), and scaled by 1/world_size
    against the wrapper's ×world_size."""
    sizes = co.shard_sizes(emb.shape[0], emb.device)
    if min(sizes) == 0:
        return None
    labels = labels.to(device=emb.device, dtype=torch.int64)
    global_labels = co.gather_labels(labels, sizes, own_first_order=False)
    num_classes = module.proxies.shape[0]
    if bool(((global_labels < 0) | (global_labels >= num_classes)).any()):
        return None  # the gathered loss raises the error naming `labels`, on every rank
    module.cast_types(emb.dtype, emb.device)
    backend = _common.engine_backend(emb, module.backend)
    proxies = co.sum_grad_over_ranks(co.scale_grad(module.proxies, 1.0 / co.world_size()))
    proxy_ids = torch.arange(num_classes, device=emb.device)
    lse = _lse2(_common.unit_rows(proxies), _common.unit_rows(emb), proxy_ids, labels, proxy_anchor_params(module),
                False, backend)
    per_rank = co.gather_values(lse, [num_classes] * len(sizes)).view(len(sizes), num_classes, 2)
    lse = _logsumexp_over_ranks(per_rank)
    module.last_backend, module.last_fallback = backend, None
    with_pos = torch.zeros(num_classes, dtype=torch.bool, device=emb.device).index_fill(0, global_labels, True)
    loss_dict = {
        "pos_loss": {"losses": _log1p_exp_as_pml(lse[:, 0], emb.dtype).to(emb.dtype), "indices": proxy_ids,
                     "reduction_type": "element", "divisor": int(with_pos.sum())},
        "neg_loss": {"losses": _log1p_exp_as_pml(lse[:, 1], emb.dtype).to(emb.dtype), "indices": proxy_ids,
                     "reduction_type": "element", "divisor": num_classes},
    }
    return module.reducer(loss_dict, emb[:0], global_labels)


def _logsumexp_over_ranks(parts):
    """log Σ_r exp(parts[r]) over dim 0; -inf (gradient 0) where every part is -inf (an empty set)."""
    top = parts.detach().amax(dim=0)
    top = torch.where(torch.isneginf(top), 0.0, top)
    total = torch.exp(parts - top).sum(dim=0)
    return torch.where(total > 0, top + torch.log(torch.where(total > 0, total, 1.0)), float("-inf"))


def _triplet_eligible(module, emb, labels, indices_tuple, ref_emb, ref_labels):
    """TripletMarginLoss on the blocked path's configurations: every triplet, or
    DistributedMinerWrapper(TripletMarginMiner)'s lazy triplets (checked against the gathered
    batch later)."""
    from ..losses import TripletMarginLoss

    if type(module) is not TripletMarginLoss or labels is None or ref_emb is not None or ref_labels is not None:
        return False
    if indices_tuple is None:
        if module.triplets_per_anchor != "all":
            return False
    elif not (isinstance(indices_tuple, LazyMinedTriplets) and not indices_tuple.is_materialized
              and indices_tuple.kernel_can_mine and indices_tuple.exclude_diag
              and indices_tuple.distance_kind == fused_triplet.distance_kind(module.distance)):
        return False
    return (not module.swap and fused_triplet.distance_kind(module.distance) is not None
            and not module.distance.collect_stats and fused_triplet._reduction(module.reducer) is not None
            and getattr(module, "embedding_regularizer", None) is None and not _tracing.static_shapes()
            and emb.dtype in (torch.float32, torch.float64) and emb.dim() == 2 and labels.dim() == 1
            and labels.shape[0] == emb.shape[0] and pe.choose_backend(module.backend, emb.device) != "reference")


def _triplet(module, emb, labels, lazy):
    """TripletMarginLoss from this rank's anchors: the blocked path's totals (sum of the kept terms,
    non-zero and kept counts) over its rows against the gathered columns, added over ranks in rank
    order (the same bits everywhere), then the reducer's ratio. No kept triplet in the global batch,
    or a NaN total with AvgNonZeroReducer: the gathered path (PML's zero, or the reference)."""
    sizes = co.shard_sizes(emb.shape[0], emb.device)
    if min(sizes) == 0:
        return None
    raw_cols = co.gather_labels(labels.to(emb.device), sizes)
    col_ids = _validation.as_class_ids(raw_cols, emb.device)
    cols = co.gather_columns(emb, sizes)
    euclidean = fused_triplet.distance_kind(module.distance) == "euclidean"
    if euclidean and _common.has_short_rows(cols):
        return None
    window, window_margin = "every", 0.0
    if lazy is not None:
        if not _holds_global_batch(lazy, sizes, cols, co.rank()):
            return None
        window, window_margin = lazy.window, lazy.window_margin
    rule = fused_triplet.TripletRule(float(module.margin), bool(module.smooth_loss), euclidean, window, window_margin,
                                     triton=pe.choose_backend(module.backend, emb.device) == "triton")
    x = _common.unit_rows(emb).to(stats_dtype(emb.dtype))
    y = _common.unit_rows(cols).to(x.dtype)
    with_grad = torch.is_grad_enabled() and emb.requires_grad
    total, nonzero, kept, _, _ = fused_triplet.triplet_totals(x, y, col_ids[:emb.shape[0]], col_ids, rule, True,
                                                             with_grad, None)
    world = len(sizes)
    total = co.gather_values(total.view(1), [1] * world).sum()
    counts = co.gather_labels(torch.stack([nonzero, kept]).view(1, 2), [1] * world, own_first_order=False).sum(dim=0)
    nonzero, kept = int(counts[0]), int(counts[1])
    reduction = fused_triplet._reduction(module.reducer)
    if kept == 0 or (reduction == "nonzero" and bool(torch.isnan(total))):
        return None
    module.last_backend, module.last_fallback = fused_triplet.BACKEND, None
    if reduction == "nonzero":
        value = total / nonzero if nonzero > 0 else module.reducer.zero_loss(emb[:0]).to(total.dtype)
    else:
        value = total / kept if reduction == "mean" else total
    return value.to(emb.dtype)


def loss(module, emb, labels, indices_tuple, ref_emb, ref_labels):
    """The loss of the global batch computed from this rank's rows, or None (the wrapper gathers)."""
    if _proxy_anchor_eligible(module, emb, labels, indices_tuple, ref_emb, ref_labels):
        return _proxy_anchor(module, emb, labels)
    if _triplet_eligible(module, emb, labels, indices_tuple, ref_emb, ref_labels):
        return _triplet(module, emb, labels, indices_tuple)
    form = _eligible(module, emb, labels, indices_tuple, ref_emb, ref_labels)
    if form is None:
        return None
    sizes = co.shard_sizes(emb.shape[0], emb.device)
    if min(sizes) == 0:
        return None
    raw_cols = co.gather_labels(labels.to(emb.device), sizes)  # own first
    col_ids = _validation.as_class_ids(raw_cols, emb.device)  # float labels: ids from the global values
    if form.degenerate(col_ids):
        return None
    cols = co.gather_columns(emb, sizes)
    # Short rows (unit Euclidean), half-precision raw Lp: decided on the columns, the same on every
    # rank. The raw Lp rows are centred on the columns' median, so every rank shifts alike.
    if _common.engine_rows_reason(module.distance, cols, cols) is not None:
        return None
    backend = _common.engine_backend(emb, module.backend)
    n = emb.shape[0]
    x, y, transform = _common.engine_rows(module.distance, emb, cols)
    if form is _MultiSimilarityMined:
        if not _holds_global_batch(indices_tuple, sizes, cols, co.rank()):
            return None
        per_row, rows_with_pairs = form.rows(module, x, y, col_ids[:n], col_ids, backend, indices_tuple.epsilon)
        if bool((co.all_reduce_sum(rows_with_pairs) <= 1).any()):
            return None
    else:
        per_row = form.rows(module, x, y, col_ids[:n], col_ids, backend, transform)
    all_rows = co.gather_values(per_row, sizes)  # rank order, the same on every rank
    if form is _Contrastive and fused_contrastive.nan_in(*fused_contrastive.hinge_totals(all_rows)[::2]):
        return None  # PML's reducers drop or keep each NaN pair loss: the gathered reference decides
    module.last_backend, module.last_fallback = backend, None
    global_ids = co.gather_labels(col_ids[:n], sizes, own_first_order=False)
    zero_like = emb[:0]  # reducers read its dtype and device, and sum it for a zero with a gradient
    return form.combine(module, all_rows, global_ids, zero_like)
