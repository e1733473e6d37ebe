"""Supervised Contrastive loss on the engine: one lse2 pass for the row log-sum-exps, the
positives' mean similarity from per-class row sums (O(N D))."""
import torch

from .._autograd import applier
from ..engine_spec import EngineParams
from ._common import DOT_KINDS, all_pairs_plan, class_sums_for_rows, engine_rows
from ._epilogue import (ZERO_LOSS, _element, _log1p_exp, _lse2, _one_plus_exp_is_one, _rows_backend,
                        _stats_with_pair_rule_of)
from ..ops import pair_engine as pe
from .listed_pairs import listed_supcon


def supcon(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    plan = all_pairs_plan(indices_tuple, embeddings, ref_emb)
    if plan is not None:  # CrossBatchMemory's pairs: the engine on the rolled queue
        labels, ref_labels, ref_emb, indices_tuple = plan.labels, plan.ref_labels, plan.ref_emb, None
    elif indices_tuple is not None:  # only the listed pairs (O(pairs))
        return listed_supcon(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    backend = _rows_backend(module, embeddings, labels, indices_tuple, ref_emb, DOT_KINDS)
    if backend is None:
        return None
    exclude_diag, stats, degenerate = _stats_with_pair_rule_of(plan, labels, ref_labels)
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    x, y, _ = engine_rows(module.distance, embeddings, ref_emb)
    losses = degenerate.zero_where(supcon_rows(module, x, y, labels, ref_labels, stats, exclude_diag, backend,
                                               embeddings.dtype))
    return {"loss": _element(losses.to(embeddings.dtype), len(losses))}, backend  # (N,), as PML's SupCon


def supcon_rows(module, x, y, labels, ref_labels, stats, exclude_diag, backend, emb_dtype):
    """Each row's loss (x, y: unit rows; stats: their LabelStats, self pairs excluded alike;
    emb_dtype: the embeddings' dtype, whose tiny PML adds to |P(i)|)."""
    inv_t = 1.0 / float(module.temperature)
    lse = _lse2(x, y, labels, ref_labels, EngineParams(sc_pos=inv_t, sc_neg=inv_t), exclude_diag, backend)
    # sum_{p in P(i)} s_ip = <x_i, sum of the reference rows with label y_i> - the self pair: O(N D).
    pos_sim_sum = (x * class_sums_for_rows(stats, y)).sum(dim=1)
    if exclude_diag:  # row i's self pair (x_i, y_i) is in the class sum
        pos_sim_sum = pos_sim_sum - (x * y[:len(x)]).sum(dim=1)
    count = stats.pos.to(lse.dtype)
    tiny = torch.finfo(emb_dtype).tiny  # PML divides by |P(i)| + tiny
    pos_sim_mean = pos_sim_sum.to(lse.dtype) / (count + tiny)
    return _apply_row_losses(lse, pos_sim_mean, count, inv_t, emb_dtype)[0]


def row_losses(lse, pos_sim_mean, count, inv_t, emb_dtype):
    """Each row's loss from its engine statistics (lse: (N, 2) log-sum-exps of s/t over the
    positives and the negatives; pos_sim_mean: the mean positive similarity; count: |P(i)|),
    differentiable in lse and pos_sim_mean. Also returns the masks `_RowLosses.backward` reads:
    (losses, gap, spread, neg_w, nan_no_pos)."""
    has_pos, spread = count > 0, count > 1
    lse_pos = torch.where(has_pos, lse[:, 0], 0.0)  # -inf without positives: no inf - inf below
    # -mean_p log_prob = LSE - mean_p s_ip/t, with LSE = lse_pos + softplus(lse_neg - lse_pos):
    # (lse_pos - mean_p s_ip/t) + softplus(lse_neg - lse_pos). Near convergence the loss is small
    # next to s/t ~ 1/t; the first term is 0 for one positive (the LSE of one value is that value)
    # and O(log |P|) otherwise, so nothing of size 1/t cancels (PML shifts by the row maximum).
    pos_spread = torch.where(spread, lse_pos - pos_sim_mean * inv_t, 0.0)
    gap = lse[:, 1] - lse_pos
    neg_term = _log1p_exp(gap)
    # One positive that dominates its row: PML's loss is log(sum_k e^{z_k - z_max}) = log(1 + delta),
    # exactly 0 where 1 + delta rounds to 1 in the embeddings' dtype, and AvgNonZeroReducer (the
    # default) leaves those rows out of its mean. delta = e^{gap} < eps / 2 (gap < ~-17 in fp32): with
    # the cosine only at small temperatures; common with the raw dot product's larger values.
    neg_w = torch.where(count == 1, ~_one_plus_exp_is_one(neg_term, emb_dtype), has_pos)
    # Without positives PML's loss is -sum_p 0 * log_prob: 0, or NaN where the row's log_prob is (a
    # NaN similarity anywhere in the row: the row maximum PML subtracts is NaN), i.e. where lse is.
    nan_no_pos = torch.where(has_pos, False, torch.isnan(lse[:, 1]))
    losses = torch.where(neg_w, pos_spread + neg_term, pos_spread)
    return torch.where(nan_no_pos, lse[:, 1], losses), gap, spread, neg_w, nan_no_pos


class _RowLosses(torch.autograd.Function):
    """`row_losses` with a closed-form backward: 10 ops, where autograd's graph of the formula
    runs ~35 (each a kernel launch on a GPU, host time on any device). With t = inv_t,
    s = sigmoid(gap) = d softplus(gap) / d gap and g the losses' gradient:
    d lse_pos = g [spread] - g s [neg_w], d lse_neg = g s [neg_w] (NaN where a row without
    positives is NaN, as autograd's), d pos_sim_mean = -t g [spread] ([m]: where mask m holds,
    else 0; spread: more than one positive). Under create_graph, autograd's gradient."""

    @staticmethod
    def forward(lse, pos_sim_mean, count, inv_t, emb_dtype):
        return row_losses(lse, pos_sim_mean, count, inv_t, emb_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        lse, pos_sim_mean, count, inv_t, emb_dtype = inputs
        _, gap, spread, neg_w, nan_no_pos = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.inv_t, ctx.emb_dtype = inv_t, emb_dtype
        ctx.save_for_backward(lse, pos_sim_mean, count, gap, spread, neg_w, nan_no_pos)

    @staticmethod
    def backward(ctx, grad, *_):
        lse, pos_sim_mean, count, gap, spread, neg_w, nan_no_pos = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        if pe.backward_needs_graph(lse):
            grads = pe.reference_gradient(
                lambda a, b: row_losses(a, b, count, ctx.inv_t, ctx.emb_dtype)[0], (lse, pos_sim_mean),
                ctx.needs_input_grad[:2], grad)
            return (*grads, None, None, None)
        with torch.no_grad():  # under torch.func.grad grad mode is on
            # sigmoid from exp, + and /: bits independent of the CPU thread count (_determinism.py)
            neg_share = torch.where(neg_w, grad / (1 + torch.exp(-gap)), 0.0)
            spread_grad = torch.where(spread, grad, 0.0)
            d_neg = torch.where(nan_no_pos, gap, neg_share)  # NaN: autograd's 0 * NaN through softplus
            return torch.stack([spread_grad - neg_share, d_neg], dim=1), spread_grad * -ctx.inv_t, None, None, None


_apply_row_losses = applier(_RowLosses)
