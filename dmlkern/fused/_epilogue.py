"""What the fused loss epilogues share (one module per loss next to this one): the reference's
zero for degenerate batches, the per-row loss dict shapes, the plain-configuration check and
backend choice, and the lse2 calls on the engine. An epilogue returns (loss_dict, backend),
ZERO_LOSS, or None after `decline` recorded why the reference runs (BaseMetricLossFunction.forward
sets last_backend / last_fallback from that)."""
import torch

from .._determinism import fixed_order_sum, logaddexp
from ..engine_spec import MINING_NONE, PASS_LSE2, TRANSFORM_DOT
from ..ops import pair_engine as pe
from . import _common
from .pair_lists import pair_dots, positive_pairs
from ._common import (Degenerate, LabelStats, decline, engine_rows_reason, no_engine_reason, no_pos_or_neg,
                      short_circuit, unit_rows)


class _ZeroLoss:
    """Returned for degenerate batches (no valid pair): the caller uses module.zero_losses(),
    exactly what the reference returns there, without building its N x M matrices."""


ZERO_LOSS = _ZeroLoss()


def _element(losses, n):
    idx = torch.arange(n, device=losses.device)
    return {"losses": losses, "indices": idx, "reduction_type": "element"}


def _pair_inputs(embeddings, ref_emb):
    x = unit_rows(embeddings)
    y = x if ref_emb is embeddings else unit_rows(ref_emb)
    return x, y


def _engine_or_decline(module, embeddings):
    """The engine backend for this call, or None after recording why there is none. The one place
    the fused losses look up `_common.engine_backend` (tests patch it there)."""
    backend = _common.engine_backend(embeddings, module.backend)
    if backend is None:
        return decline(module, no_engine_reason(embeddings, module.backend))
    return backend


def _plain_backend(module, embeddings, labels, indices_tuple, distance_ok):
    """The engine backend when the call is the plain configuration every fused loss covers
    (labels given, no indices_tuple, the default distance), else None (the reference runs)."""
    backend = _engine_or_decline(module, embeddings)
    if backend is None:
        return None
    if labels is None:
        return decline(module, "no labels (pairs from indices_tuple only)")
    if indices_tuple is not None:
        return decline(module, "an indices_tuple (the fused kernels use all pairs)")
    if not distance_ok(module.distance):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    return backend


def _rows_backend(module, embeddings, labels, indices_tuple, ref_emb, kinds=None):
    """`_plain_backend` for the distances `_common.engine_rows` expresses (kinds: the
    `engine_distance` kinds the loss allows, default all); then the rows' own checks."""
    backend = _plain_backend(module, embeddings, labels, indices_tuple,
                             lambda distance: _common.engine_distance(distance) is not None)
    if backend is None:
        return None
    reason = engine_rows_reason(module.distance, embeddings, ref_emb, kinds)
    if reason is not None:
        return decline(module, reason)
    return backend


def _lse2(x, y, xl, yl, params, exclude_diag, backend, row_in=None, transform=TRANSFORM_DOT,
          mining=MINING_NONE):
    return pe.engine_forward(x, y, xl, yl, row_in, pass_kind=PASS_LSE2, transform=transform,
                             mining=mining, params=params, exclude_diag=exclude_diag, backend=backend)


def _positive_pairs_and_neg_lse(x, y, labels, ref_labels, params, exclude_diag, backend, transform=TRANSFORM_DOT):
    """For each positive pair (a, p) of labels x ref_labels (PML's order, `positive_pairs`): a, p,
    <x_a, y_p> (O(pairs D), chunked) and the anchor's log-sum-exp over its negatives, lse_neg(a),
    from one lse2 pass (differentiable): the per-positive-pair losses of Tuplet and NT-Xent."""
    lse = _lse2(x, y, labels, ref_labels, params, exclude_diag, backend, transform=transform)
    a, p = positive_pairs(labels, ref_labels, exclude_diag)
    s_ap = pair_dots(x, None if y is x else y, a, p).to(lse.dtype)
    # index_select: its backward (index_add) is serial on the CPU; indexing's is not (atomics)
    return a, p, s_ap, lse[:, 1].index_select(0, a)


def _log1p_exp(x):
    """log(1 + e^x) without F.softplus's cut-off (it returns x above 20: a 2e-9 error in fp64);
    0 with gradient 0 for x = -inf (an empty set). Bits independent of the CPU thread count."""
    return logaddexp(x, torch.zeros_like(x))


def _one_plus_exp_is_one(softplus, dtype):
    """Where 1 + e^z rounds to 1 in `dtype`, for softplus = log(1 + e^z) (1 + e^z = 1 +
    expm1(softplus), exact for small z): there PML's form of log(1 + e^z) (its logsumexp with the
    added zero, or -log of a probability) is exactly 0."""
    return (1 + torch.expm1(softplus.detach())).to(dtype) == 1


def _pml_zeros(softplus, dtype):
    """softplus = log(1 + e^z) (accurate), exactly 0 where PML's is (_one_plus_exp_is_one in the
    embeddings' dtype): AvgNonZeroReducer and ThresholdReducer leave such terms out, so dmlkern
    counts the terms PML counts."""
    return torch.where(_one_plus_exp_is_one(softplus, dtype), 0.0, softplus)


def _log1p_exp_as_pml(x, dtype):
    """log(1 + e^x) with PML's exact zeros (_pml_zeros)."""
    return _pml_zeros(_log1p_exp(x), dtype)


def _per_row(losses, embeddings):
    """Per-row losses shaped (N, 1), as PML's logsumexp-based losses (MS, GenLifted) give them:
    reducers such as ClassWeightedReducer broadcast on that shape."""
    return _element(losses.to(embeddings.dtype).unsqueeze(1), len(losses))


def _empty_as_zero(lse):
    """PML's masked logsumexp gives 0 (not -inf) for an empty set; the gradient there is 0."""
    return torch.where(torch.isneginf(lse), 0.0, lse)


def _at_most_one_pair_each(stats):
    """PML's `len <= 1` rule (at most one positive and one negative pair) as a Degenerate term.
    With one labels tensor, pairs come in both orders, so the rule holds only when there is no
    pair at all: a one-row batch, decided from the shape (no work)."""
    if stats.exclude_diag:
        return stats.n == 1
    return lambda: short_circuit(stats)


def _rule_or_no_pos_or_neg(stats):
    """PML's `len <= 1` rule, or no positive or no negative pair at all (SupCon, NT-Xent,
    Lifted), as a Degenerate term. With one labels tensor the rule means no pair at all, which
    the second test covers: 4 small ops fewer."""
    if stats.exclude_diag:
        return lambda: no_pos_or_neg(stats)
    return lambda: short_circuit(stats) | no_pos_or_neg(stats)


def _stats_with_pair_rule(labels, ref_labels):
    """(LabelStats, Degenerate) for the losses that are zero under `_rule_or_no_pos_or_neg`."""
    stats = LabelStats(labels, ref_labels)
    return stats, Degenerate(labels, _rule_or_no_pos_or_neg(stats))


def _stats_with_pair_rule_of(plan, labels, ref_labels):
    """(exclude_diag, LabelStats, Degenerate) under `_rule_or_no_pos_or_neg`, for all pairs of
    labels x ref_labels, or for CrossBatchMemory's all-pairs `plan` (`_common.all_pairs_plan`)."""
    if plan is None:
        stats, degenerate = _stats_with_pair_rule(labels, ref_labels)
        return ref_labels is labels, stats, degenerate
    return plan.exclude_diag, plan.stats, Degenerate(labels, plan.pair_rule_or_no_pos_or_neg())


def _lse_neg_then(second_pass, x, y, labels, ref_labels, params, exclude_diag, transform, backend):
    """The chain NT-Xent and Lifted Structure share: the lse2 pass for each row's log-sum-exp over
    its negatives, then `second_pass` reading it as L (row_in column 2). Returns (row_in, the
    second pass's statistics)."""
    lse = pe.engine_forward(x, y, labels, ref_labels, pass_kind=PASS_LSE2, transform=transform, params=params,
                            exclude_diag=exclude_diag, backend=backend)
    neg_lse = lse[:, 1]
    zero = torch.zeros_like(neg_lse)
    row_in = torch.stack([zero, zero, neg_lse], dim=1)
    out = pe.engine_forward(x, y, labels, ref_labels, row_in, pass_kind=second_pass, transform=transform,
                            params=params, exclude_diag=exclude_diag, backend=backend)
    return row_in, out


def returns_loss_dict(module):
    """Whether the loss dict reaches the user as it is (DoNothingReducer): then its entries keep
    PML's form even where a reducer would see only a zero (e.g. an empty element entry)."""
    from ..reducers import DoNothingReducer
    return isinstance(module.reducer, DoNothingReducer)


def reduces_empty_on_graph(module):
    """Whether PML's reducer, handed a loss's empty entry (NCA with no row kept), answers on the
    loss's graph, so that ref_emb's gradient is zeros rather than None: a mean (MeanReducer,
    ClassWeightedReducer, also inside a PerAnchorReducer; NaN in PML, dmlkern's zero) or a sum.
    False where it answers with its zero from the embeddings alone (ThresholdReducer,
    AvgNonZeroReducer), for DoNothingReducer (the empty entry itself) and for the others."""
    from ..reducers import ClassWeightedReducer, MeanReducer, PerAnchorReducer, SumReducer

    reducers = _sub_loss_reducers(module, ["loss"])
    if reducers is None:
        return False
    reducer = reducers["loss"]
    while isinstance(reducer, PerAnchorReducer):
        reducer = reducer.reducer
    return type(reducer) in (MeanReducer, SumReducer, ClassWeightedReducer)


def kept_rows_loss(module, entry, kept):
    """{"loss": entry} of the rows `kept` (NCA / ProxyNCA leave out the rows whose probability is
    0, as PML does; eager: a data-dependent shape). None kept and the dict reduced: a zero on the
    losses' graph where PML's reducer answers on its graph (ref_emb's and the proxies' gradients
    are then zeros, as PML's, not None), else the reducer's zero; with DoNothingReducer PML's empty
    entry."""
    if not bool(kept.any()) and not returns_loss_dict(module):
        if reduces_empty_on_graph(module):
            zero = fixed_order_sum(torch.where(kept, entry["losses"], 0.0))
            return {"loss": {"losses": zero, "indices": None, "reduction_type": "already_reduced"}}
        return {"loss": module.zero_loss()}
    if not bool(kept.all()):
        entry["losses"], entry["indices"] = entry["losses"][kept], entry["indices"][kept]
    return {"loss": entry}


def _sub_loss_reducers(module, names):
    """The reducer each sub-loss in `names` gets from module.reducer (a MultipleReducers' own one or
    its default; a single reducer for a one-sub-loss loss), or None where a loss dict is returned
    as it is (DoNothingReducer)."""
    from ..reducers import DoNothingReducer

    if isinstance(module.reducer, DoNothingReducer):
        return None
    return {name: sub_loss_reducer(module, name) for name in names}


def sub_loss_reducer(module, name="loss"):
    """The reducer of one sub-loss: module.reducer, or a MultipleReducers' own one for `name` (PML
    builds one reducer per sub-loss when a regularizer adds a sub-loss)."""
    from ..reducers import MultipleReducers

    reducer = module.reducer
    if isinstance(reducer, MultipleReducers):
        return reducer.reducers[name] if name in reducer.reducers else reducer.default_reducer
    return reducer


def avg_non_zero(reducer):
    """Whether `reducer` filters exactly as PML's AvgNonZeroReducer: that class with its own
    threshold (low 0, no high), or a ThresholdReducer(low=0) without high, which PML's
    AvgNonZeroReducer is (PML's TripletMarginLoss examples pass ThresholdReducer(low=0))."""
    from ..reducers import AvgNonZeroReducer, ThresholdReducer

    low = getattr(reducer, "low", None)
    return (type(reducer) in (AvgNonZeroReducer, ThresholdReducer) and isinstance(low, (int, float))
            and low == 0 and reducer.high is None)


def _already_reduced_kinds(module, names, kinds):
    """{sub-loss: (kind, reducer)} when every sub-loss's reducer is one whose value follows from the engine's
    totals: kinds maps reducer classes (exact types) to a kind; AvgNonZeroReducer's kind also
    serves a ThresholdReducer(low=0) and only such thresholds (`avg_non_zero`). None after
    recording why (a DoNothingReducer, a reducer collecting statistics, another reducer)."""
    out = reduced_kinds_or_reason(module, names, kinds)
    return decline(module, out) if isinstance(out, str) else out


def reduced_kinds_or_reason(module, names, kinds):
    """`_already_reduced_kinds`'s answer, or why not as a str (nothing recorded)."""
    from ..reducers import AvgNonZeroReducer, ThresholdReducer

    reducers = _sub_loss_reducers(module, names)
    loss_name = type(module).__name__
    if reducers is None:
        return f"DoNothingReducer with {loss_name} (the per-pair losses are never listed)"
    out = {}
    for name, reducer in reducers.items():
        kind = kinds.get(type(reducer))
        if isinstance(reducer, ThresholdReducer):
            kind = kinds.get(AvgNonZeroReducer) if avg_non_zero(reducer) else None
        if kind is None or getattr(reducer, "collect_stats", False):
            what = "collecting statistics" if kind is not None else "for its sub-loss " + repr(name)
            return (f"{type(reducer).__name__} {what} with {loss_name} (fused: "
                    f"{', '.join(sorted(k.__name__ for k in kinds))})")
        out[name] = (kind, reducer)
    return out


def _already_reduced(value, embeddings):
    """A sub-loss entry holding its reduced value (the reducer returns it as it is)."""
    return {"losses": value.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced"}
