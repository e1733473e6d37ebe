"""NT-Xent on the engine: lse2 for each row's negatives, then pos_softplus over the positives, with
one merged backward (_NTXentRows); the value comes already reduced (MeanReducer). Another reducer
reads PML's per-positive-pair losses: the lse2 pass, then the listed positive pairs' own logits
(`_per_pair_losses`, O(N + pairs) memory where PML builds positive pairs x negative pairs)."""
import math

import torch

from .._autograd import applier
from .._determinism import fixed_order_sum
from ..engine_spec import MINING_NONE, PASS_POS_SOFTPLUS, TRANSFORM_DOT, TRANSFORM_UNIT_DISTANCE
from ..ops import pair_engine as pe
from . import _stats
from ._common import all_pairs_plan, decline, engine_rows, is_plain_mean, matrix_dtype, static_shapes, value_params
from .listed_pairs import listed_ntxent
from ._epilogue import (ZERO_LOSS, _log1p_exp, _lse_neg_then, _positive_pairs_and_neg_lse, _rows_backend,
                        _stats_with_pair_rule_of)
from .pair_lists import unit_distance


class _NTXentRows(torch.autograd.Function):
    """Per anchor a: sum over its positives p of softplus(lse_neg(a) - s_ap/t), which is
    -log(e^u / (e^u + sum_n e^{s_an/t})) with u = s_ap/t, floored as PML's -log(p + tiny)
    (params.log_floor).

    Two forward passes (lse2 for lse_neg, then pos_softplus), but ONE backward pass: the
    engine's backward takes the negatives' softmax term (through lse_neg) and the positives'
    sigmoid term in the same row_coef, so the tiles are recomputed once, not twice.
    """

    # The split form (torch.func needs it): forward returns (per-row losses, row_in, out), the
    # last two non-differentiable, so that setup_context can save them; callers take [0].

    @staticmethod
    def forward(x, y, labels, ref_labels, params, exclude_diag, backend, transform=TRANSFORM_DOT):
        # y / ref_labels are None when they are x / labels: torch.compile can't trace an
        # autograd.Function given one tensor twice.
        y = x if y is None else y
        ref_labels = labels if ref_labels is None else ref_labels
        row_in, out = _lse_neg_then(PASS_POS_SOFTPLUS, x, y, labels, ref_labels, params, exclude_diag,
                                    transform, backend)
        return out[:, 0], row_in, out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, labels, ref_labels, params, exclude_diag, backend, *transform = inputs
        _, row_in, out = output
        ctx.self_pairs = y is None
        ctx.symmetric = y is None and ref_labels is None  # the pair masks are symmetric too
        ctx.mark_non_differentiable(row_in, out)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, x if y is None else y, labels, labels if ref_labels is None else ref_labels,
                              row_in, out)
        ctx.config = (params, exclude_diag, backend, transform[0] if transform else TRANSFORM_DOT)

    @staticmethod
    def backward(ctx, grad, _grad_row_in, _grad_out):
        x, y, labels, ref_labels, row_in, out = ctx.saved_tensors
        params, exclude_diag, backend, transform = ctx.config
        nones = (None,) * (len(ctx.needs_input_grad) - 2)  # labels, ref_labels and the settings
        if grad is None:
            return None, None, *nones
        if pe.backward_needs_graph(x):  # create_graph=True: a differentiable gradient
            def per_row(x, y):
                return _lse_neg_then(PASS_POS_SOFTPLUS, x, y, labels, ref_labels, params, exclude_diag,
                                     transform, "reference")[1][:, 0]
            grads = pe.reference_gradient(per_row, (x, y), ctx.needs_input_grad[:2], grad)
            return (*grads, *nones)
        with torch.no_grad():  # under torch.func.grad grad mode is on
            return (*_NTXentRows._fused_backward(ctx, grad, x, y, labels, ref_labels, row_in, out, params,
                                                 exclude_diag, backend, transform), *nones)

    @staticmethod
    def _fused_backward(ctx, grad, x, y, labels, ref_labels, row_in, out, params, exclude_diag, backend,
                        transform):
        """(grad_x, grad_y)."""
        grad = grad.to(out.dtype)
        zero = torch.zeros_like(grad)
        # d/d lse_neg(a) = grad_a * sum_p sigmoid(...) = grad_a * out[:, 1] (pos_softplus's rule).
        coef = torch.stack([zero, zero, grad * out[:, 1], row_in[:, 2], grad], dim=1)
        grad_x, grad_y = pe.engine_backward_raw(x, y, labels, ref_labels, row_in, coef.contiguous(),
                                                transform=transform, mining=MINING_NONE,
                                                params=params, exclude_diag=exclude_diag, backend=backend,
                                                symmetric=ctx.symmetric, coef_terms=1)  # B_pos
        if ctx.symmetric:  # grad_x is the sum already (grad_y zero)
            return grad_x, None
        if ctx.self_pairs:  # y is x: the sum
            return grad_x + grad_y, None
        return grad_x, grad_y


_apply_ntxent_rows = applier(_NTXentRows)


def ntxent_params(module, rows):
    """The lse2 pass's logits, PML's s / t (or -d / t for a distance), through `value_params`, and
    the pos_softplus pass's floor: PML's term is -log(p + tiny), tiny of its matrix's dtype (at
    most -log tiny: 87 in fp32 and bf16, 9.7 in fp16, also under fp16 autocast), so the kernels
    floor p at that tiny too. rows: the embeddings or their engine rows (`matrix_dtype`)."""
    inv_t = (1.0 if module.distance.is_inverted else -1.0) / float(module.temperature)
    params = value_params(module.distance, sc_pos=inv_t, sc_neg=inv_t)
    return params._replace(log_floor=math.log(torch.finfo(matrix_dtype(module.distance, rows)).tiny))


def ntxent(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    plan = all_pairs_plan(indices_tuple, embeddings, ref_emb)
    if plan is not None and is_plain_mean(module.reducer):  # CrossBatchMemory's pairs: the rolled queue
        labels, ref_labels, ref_emb, indices_tuple = plan.labels, plan.ref_labels, plan.ref_emb, None
    elif indices_tuple is not None:  # only the listed pairs (O(pairs)), any reducer
        return listed_ntxent(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    backend = _rows_backend(module, embeddings, labels, indices_tuple, ref_emb)
    if backend is None:
        return None
    if not is_plain_mean(module.reducer):
        if static_shapes():  # the pair list's length depends on the labels
            return decline(module, f"{type(module.reducer).__name__} with NTXentLoss under torch.compile "
                                   "(fused with MeanReducer)")
        return _per_pair_losses(module, embeddings, labels, ref_emb, ref_labels, backend)
    exclude_diag, stats, degenerate = _stats_with_pair_rule_of(plan, labels, ref_labels)
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    params = ntxent_params(module, embeddings)
    x, y, transform = engine_rows(module.distance, embeddings, ref_emb)
    # The loss is a sum over pairs: with the rows (and the reference rows) sorted by label, the
    # positives sit in a few tiles near the diagonal, and the pos_softplus pass computes only
    # those. One permutation for both sides when the labels are one tensor (the self-pairs
    # excluded then are pairs of equal index).
    sorted_labels, order = torch.sort(labels, stable=True)
    if ref_labels is labels:
        ref_labels, ref_order = sorted_labels, order
    elif exclude_diag:  # two tensors whose pairs (i, i) are excluded: the first N reference rows
        # follow the rows' order, so those pairs stay the diagonal; the others sort by label
        n = len(labels)
        rest_labels, rest_order = torch.sort(ref_labels[n:], stable=True)
        ref_labels, ref_order = torch.cat([sorted_labels, rest_labels]), torch.cat([order, rest_order + n])
    else:
        ref_labels, ref_order = torch.sort(ref_labels, stable=True)
    sorted_x = x[order]
    y = sorted_x if y is x and ref_order is order else y[ref_order]
    x, labels = sorted_x, sorted_labels
    per_row = _apply_ntxent_rows(x, None if y is x else y, labels, None if ref_labels is labels else ref_labels,
                                 params, exclude_diag, backend, transform)[0]
    loss = degenerate.zero_where(fixed_order_sum(per_row) / stats.pos_total.clamp(min=1))
    return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced",
                     **_stats.already_reduced_size(module.reducer, stats.pos_total)}}, backend


def _per_pair_losses(module, embeddings, labels, ref_emb, ref_labels, backend):
    """PML's loss per positive pair (a, p), -log(e^z_ap / (e^z_ap + sum_n e^z_an) + tiny), as
    -log(e^-softplus(lse_neg(a) - z_ap) + tiny): lse_neg from one lse2 pass (differentiable), z_ap
    from the pair's own dot product of the engine's rows (O(pairs D), chunked). An anchor without
    negatives gets softplus(-inf) = 0, and a NaN logit NaN, as PML's max-shifted form."""
    exclude_diag, _, degenerate = _stats_with_pair_rule_of(None, labels, ref_labels)
    if degenerate.now():  # no positive or no negative pair: PML's zero loss
        return ZERO_LOSS
    params = ntxent_params(module, embeddings)
    x, y, transform = engine_rows(module.distance, embeddings, ref_emb)
    a, p, s, neg_lse = _positive_pairs_and_neg_lse(x, y, labels, ref_labels, params, exclude_diag, backend, transform)
    v = unit_distance(s) if transform == TRANSFORM_UNIT_DISTANCE else s
    softplus = _log1p_exp(neg_lse - (params.sc_pos * v + params.off_pos))
    losses = -torch.log(torch.exp(-softplus) + torch.finfo(matrix_dtype(module.distance, embeddings)).tiny)  # PML's
    return {"loss": {"losses": losses.to(embeddings.dtype), "indices": (a, p), "reduction_type": "pos_pair"}}, backend
