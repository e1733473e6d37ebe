"""NT-Xent on the engine: lse2 for each row's negatives, then pos_softplus over the positives, with
one merged backward (_NTXentRows); the value comes already reduced (MeanReducer)."""
import math

import torch

from .._autograd import applier
from .._determinism import fixed_order_sum
from ..engine_spec import MINING_NONE, PASS_EXTREMA, PASS_POS_SOFTPLUS, TRANSFORM_DOT
from ..ops import pair_engine as pe
from . import _stats
from ._common import all_pairs_plan, branch_free, decline, engine_rows, is_plain_mean, value_params
from .listed_pairs import listed_ntxent
from ._epilogue import ZERO_LOSS, _lse_neg_then, _rows_backend, _stats_with_pair_rule_of


class _NTXentRows(torch.autograd.Function):
    """Per anchor a: sum over its positives p of softplus(lse_neg(a) - s_ap/t), which is
    -log(e^u / (e^u + sum_n e^{s_an/t})) with u = s_ap/t.

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


def ntxent_params(module):
    """The lse2 pass's logits, PML's s / t (or -d / t for a distance), through `value_params`."""
    inv_t = (1.0 if module.distance.is_inverted else -1.0) / float(module.temperature)
    return value_params(module.distance, sc_pos=inv_t, sc_neg=inv_t)


PML_CAP = ("a pair whose -log p may reach PML's cap (its -log(p + tiny) is at most -log tiny: 87 in fp32; "
           "the all-pairs kernels sum -log p)")


def may_reach_pmls_cap(per_row, lse_neg, x, y, labels, ref_labels, params, transform, backend):
    """Whether some pair's term -log p_ap = softplus(lse_neg(a) - z_ap) reaches where PML's
    -log(p + tiny) departs from it by more than rounding (-log p > -log tiny + log eps, less 1 for
    the kernels' rounding). A term is at most its row's sum (per_row) and at most
    softplus(lse_neg(a) + B_a), B_a >= |z| (|x_a| max |y| bounds the dot product s, sqrt(2 + 2 that)
    the distance sqrt(2 - 2s)): with the cosine at usual temperatures no row comes near (t = 0.07:
    |z| <= 14.3).
    Rows left by both bounds (e.g. unnormalised distances) get their worst positive exactly: an
    extrema pass over them gives min_p s_ap, where z (increasing in s) is least."""
    info = torch.finfo(per_row.dtype)
    limit = -math.log(info.tiny) + math.log(info.eps) - 1.0
    near = per_row >= limit
    if not bool(near.any()):
        return False
    y = x if y is None else y
    scale = max(abs(params.sc_pos), abs(params.sc_neg))
    offset = max(abs(params.off_pos), abs(params.off_neg))
    dot = x.norm(dim=1).to(per_row.dtype) * y.norm(dim=1).amax().to(per_row.dtype)  # >= |s|
    # TRANSFORM_UNIT_DISTANCE: v = sqrt(2 - 2s) (2 at most on unit rows; unbounded on the augmented
    # rows of the unnormalised LpDistance, where s = 1 - d^2 / 2)
    bound = dot if transform == TRANSFORM_DOT else torch.sqrt(2 + 2 * dot)
    near &= torch.nn.functional.softplus(lse_neg + scale * bound + offset) >= limit
    if not bool(near.any()):
        return False
    increasing = params.sc_pos > 0 if transform == TRANSFORM_DOT else params.sc_pos < 0
    if not increasing:
        return True
    # Without the self pairs' exclusion (rows taken apart from their index): a self pair can
    # only lower min_p s_ap, i.e. only make the check more careful.
    min_s = pe.engine_forward(x[near], y, labels[near], ref_labels, pass_kind=PASS_EXTREMA, params=params,
                              backend=backend)[:, 1]
    v = min_s if transform == TRANSFORM_DOT else torch.sqrt(torch.clamp(2 - 2 * min_s, min=0))
    worst = torch.nn.functional.softplus(lse_neg[near] - (params.sc_pos * v + params.off_pos))
    return bool((worst >= limit).any())


def ntxent(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    plan = all_pairs_plan(indices_tuple, embeddings, ref_emb)
    if plan is not None and is_plain_mean(module.reducer):  # CrossBatchMemory's pairs: the rolled queue
        labels, ref_labels, ref_emb, indices_tuple = plan.labels, plan.ref_labels, plan.ref_emb, None
    elif indices_tuple is not None:  # only the listed pairs (O(pairs)), any reducer
        return listed_ntxent(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    backend = _rows_backend(module, embeddings, labels, indices_tuple, ref_emb)
    if backend is None:
        return None
    if not is_plain_mean(module.reducer):  # per-pair losses would need the O(pairs) list
        return decline(module, f"{type(module.reducer).__name__} with NTXentLoss (fused with MeanReducer)")
    exclude_diag, stats, degenerate = _stats_with_pair_rule_of(plan, labels, ref_labels)
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    params = ntxent_params(module)
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
    per_row, row_in, _ = _apply_ntxent_rows(x, None if y is x else y, labels,
                                            None if ref_labels is labels else ref_labels, params, exclude_diag,
                                            backend, transform)
    if not branch_free(per_row):
        with torch.no_grad():
            capped = may_reach_pmls_cap(per_row, row_in[:, 2], x, None if y is x else y, labels, ref_labels,
                                        params, transform, backend)
        if capped:
            return decline(module, PML_CAP)
    loss = degenerate.zero_where(fixed_order_sum(per_row) / stats.pos_total.clamp(min=1))
    return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced",
                     **_stats.already_reduced_size(module.reducer, stats.pos_total)}}, backend
