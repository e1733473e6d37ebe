"""Lifted Structure loss on the engine: L_i from lse2, then the lifted_pairs pass over the positive
pairs with one merged backward (_LiftedPairs) for MeanReducer / AvgNonZeroReducer; a list of the
positive pairs (O(pairs)) for other reducers."""
import torch

from .._autograd import applier
from .._determinism import fixed_order_sum, logaddexp
from ..engine_spec import MINING_NONE, PASS_LIFTED_PAIRS, TRANSFORM_UNIT_DISTANCE
from ..ops import pair_engine as pe
from .listed_pairs import listed_lifted
from .pair_lists import pair_dots, positive_pairs, unit_distance
from ._common import decline, engine_rows, reduced_sub_loss, static_shapes, value_params
from ._epilogue import (ZERO_LOSS, avg_non_zero, sub_loss_reducer, _empty_as_zero, _lse2, _lse_neg_then, _rows_backend,
                        _stats_with_pair_rule)


MAX_POS_PAIRS_PER_ROW = 64  # above this many positive pairs per row, the reference runs
# The lifted_pairs pass reads row_in of the columns: the rows must be the columns (the symmetric
# case), so no augmented rows (the raw Euclidean distances).
LIFTED_KINDS = ("unit_euclidean", "unit_squared_euclidean", "unit_cosine", "raw_dot")


class _LiftedPairs(torch.autograd.Function):
    """T = sum over ordered positive pairs (i, j), i != j, of f_ij = relu(z_ij)^2 / 2 with
    z_ij = logaddexp(L_i, L_j) + d_ij - pos_margin and L_i = log sum_{n in N(i)} e^{neg_margin - d_in};
    returns (T, the number of pairs with f > 0). No pair list: two forward passes (lse2 for L,
    then lifted_pairs), ONE backward pass (docs/ENGINE.md). By the symmetry of z, dT/dL_k is
    2 * out[k, 1], which enters the backward as the lse2 coefficient A_neg of row k; the pairs'
    own term is C_lift = the upstream gradient. The engine sees the rows sorted by label (T does
    not depend on their order): the CPU lifted_pairs pass then computes only the tiles that
    hold positive pairs, near the diagonal."""

    # The split form (torch.func needs it): forward also returns the sorted labels, row_in, out and
    # the order (non-differentiable) so that setup_context can save them; callers take [:2].

    @staticmethod
    def forward(x, labels, params, backend, transform=TRANSFORM_UNIT_DISTANCE):
        labels, order = torch.sort(labels, stable=True)
        sorted_x = x[order]
        row_in, out = _lse_neg_then(PASS_LIFTED_PAIRS, sorted_x, sorted_x, labels, labels, params, True,
                                    transform, backend)
        return fixed_order_sum(out[:, 0]), fixed_order_sum(out[:, 2]), labels, row_in, out, order

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, params, backend, *transform = inputs
        _, count, labels, row_in, out, order = output
        ctx.mark_non_differentiable(count, labels, row_in, out, order)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, labels, row_in, out, order)
        ctx.config = (params, backend, transform[0] if transform else TRANSFORM_UNIT_DISTANCE)

    @staticmethod
    def backward(ctx, grad_total, *_grad_statistics):
        x, labels, row_in, out, order = ctx.saved_tensors
        params, backend, transform = ctx.config
        nones = (None,) * (len(ctx.needs_input_grad) - 1)
        if grad_total is None:
            return None, *nones
        if pe.backward_needs_graph(x):  # create_graph=True: a differentiable gradient
            def total(x):  # the reference's lifted_pairs pass is differentiable
                sorted_x = x[order]
                return _lse_neg_then(PASS_LIFTED_PAIRS, sorted_x, sorted_x, labels, labels, params, True,
                                     transform, "reference")[1][:, 0].sum()
            return (*pe.reference_gradient(total, (x,), ctx.needs_input_grad[:1], grad_total), *nones)
        with torch.no_grad():  # under torch.func.grad grad mode is on
            grad = _LiftedPairs._fused_backward(grad_total, x, labels, row_in, out, order, params, backend, transform)
            return grad, *nones

    @staticmethod
    def _fused_backward(grad_total, x, labels, row_in, out, order, params, backend, transform):
        x = x[order]
        g = grad_total.to(out.dtype).expand(out.shape[0])
        zero = torch.zeros_like(g)
        coef = torch.stack([zero, zero, 2 * g * out[:, 1], row_in[:, 2], zero, g], dim=1)
        grad_x, grad_y = pe.engine_backward_raw(x, x, labels, labels, row_in, coef.contiguous(),
                                                transform=transform, mining=MINING_NONE,
                                                params=params, exclude_diag=True, backend=backend,
                                                symmetric=True, coef_terms=2)  # C_lift
        return torch.zeros_like(grad_x).index_copy(0, order, grad_x)  # back to the caller's order


_apply_lifted_pairs = applier(_LiftedPairs)


def _lifted_reduction(reducer):
    """"mean" / "nonzero" when the reducer is exactly PML's default MeanReducer or an
    AvgNonZeroReducer (or ThresholdReducer(low=0): `avg_non_zero`) without stats collection: the
    loss is then a ratio of two totals of the lifted_pairs pass. None for every other reducer (it
    needs the per-pair losses)."""
    from ..reducers import MeanReducer

    if getattr(reducer, "collect_stats", True):
        return None
    if type(reducer) is MeanReducer:
        return "mean"
    if avg_non_zero(reducer):
        return "nonzero"
    return None


def lifted_structure(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Per positive pair (i, j): relu(log(sum_{n in N(i)} e^{m_n - d_in} + sum_{n in N(j)} e^{m_n - d_jn})
    + d_ij - m_p)^2 / 2. The per-row negative sums are engine statistics (L_i). With MeanReducer
    or AvgNonZeroReducer the loss is (sum of the pair losses) / (number of positive pairs, or of
    non-zero pair losses), both from the engine's lifted_pairs pass: no pair list, static shapes
    (torch.compile fullgraph). Other reducers get the per-pair losses from a list of the positive
    pairs (O(pairs)), fused only while pairs are few per row. With an indices_tuple: only its
    pairs (`listed_pairs.listed_lifted`)."""
    if indices_tuple is not None:
        return listed_lifted(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    backend = _rows_backend(module, embeddings, labels, indices_tuple, ref_emb, LIFTED_KINDS)
    # With ref_emb (even the embeddings themselves, given with other ref_labels) PML matches
    # negatives by index value and keeps self-pairs: the reference does that.
    if backend is None:
        return None
    if ref_emb is not embeddings or ref_labels is not labels:
        return decline(module, "ref_emb or ref_labels with LiftedStructureLoss")
    stats, degenerate = _stats_with_pair_rule(labels, labels)
    pm, nm = float(module.pos_margin), float(module.neg_margin)
    reducer = sub_loss_reducer(module)  # (an embedding regularizer: a MultipleReducers, the loss's own)
    reduction = _lifted_reduction(reducer)
    if reduction is None:
        return _lifted_structure_pair_list(module, embeddings, labels, stats, degenerate, pm, nm, backend)
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    x, _, transform = engine_rows(module.distance, embeddings, embeddings)
    total, nonzero = _apply_lifted_pairs(x, labels, lifted_params(module.distance, pm, nm), backend, transform)[:2]
    if reduction == "nonzero" and not static_shapes() and bool(torch.isnan(total)):
        # AvgNonZero drops NaN pair losses (NaN > 0 is false) and averages the rest: that needs
        # the per-pair losses. (Under torch.compile the NaN propagates: a documented deviation.)
        return _lifted_structure_pair_list(module, embeddings, labels, stats, degenerate, pm, nm, backend)
    # "mean": PML's mean over all positive pairs, sum_c n_c (n_c - 1) of them
    loss = degenerate.zero_where(reduced_sub_loss(reduction, total, nonzero, stats.pos_total, reducer,
                                                  embeddings))
    return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced"}}, backend


def lifted_params(distance, pm, nm, with_pos=True):
    """The passes' terms: PML's distance.margin(mat, pm) over the positive pairs (d - pm, or pm - s
    for a similarity) and distance.margin(nm, mat) over the negatives (nm - d, or s - nm)."""
    sign = -1.0 if distance.is_inverted else 1.0
    sc_pos = sign if with_pos else 0.0
    return value_params(distance, sc_pos=sc_pos, off_pos=-sc_pos * pm, sc_neg=-sign, off_neg=sign * nm)


def _lifted_structure_pair_list(module, embeddings, labels, stats, degenerate, pm, nm, backend):
    """Lifted Structure for reducers that need the per-pair losses: L_i from the engine, the
    positive pairs listed (data-dependent sizes: no fullgraph compile)."""
    if degenerate.now():
        return ZERO_LOSS
    if int(stats.pos_total) > MAX_POS_PAIRS_PER_ROW * len(labels):
        return decline(module, f"{type(module.reducer).__name__} with LiftedStructureLoss and more than "
                               f"{MAX_POS_PAIRS_PER_ROW} positive pairs per row")
    distance = module.distance
    x, _, transform = engine_rows(distance, embeddings, embeddings)
    lse = _lse2(x, x, labels, labels, lifted_params(distance, 0.0, nm, with_pos=False), True, backend,
                transform=transform)
    neg_lse = lse[:, 1]
    a, p = positive_pairs(labels, labels, exclude_diag=True)
    # index_select: indexing's backward (index_put_ accumulate) sums a row's pairs by parallel
    # atomic adds on a CPU (fp32; not reproducible); index_select's (index_add) is serial there.
    neg_part = _empty_as_zero(logaddexp(neg_lse.index_select(0, a), neg_lse.index_select(0, p)))
    dots = pair_dots(x.to(neg_lse.dtype), None, a, p)
    # PML's distance.margin(mat, pos_margin): d - pm for a distance, pm - s for a similarity
    value = value_params(distance, sc_pos=1.0)  # (sc, off) of the distance's value on v
    v_ap = unit_distance(dots) if transform == TRANSFORM_UNIT_DISTANCE else dots
    pos_part = value.sc_pos * v_ap + value.off_pos - pm
    losses = torch.relu(neg_part + (-pos_part if distance.is_inverted else pos_part)) ** 2 / 2
    return {"loss": {"losses": losses.to(embeddings.dtype).unsqueeze(1), "indices": (a, p),
                     "reduction_type": "pos_pair"}}, backend
