"""Fused loss epilogues on the pair engine (docs/ENGINE.md, "Losses on the engine").

Each function takes a loss module and its prepared inputs and returns the loss dict the
reference would return (so reducers and regularisers work unchanged), or None when the
configuration is not covered by the kernels — the caller then runs the reference.
Statistics are O(N + M); nothing N x M is built.
"""
import torch

from .._determinism import fixed_order_sum, logaddexp
from .._autograd import applier
from ..ops import pair_engine as pe
from ._common import (Degenerate, LabelStats, class_sums_for_rows, decline, engine_backend, no_engine_reason, has_short_rows, is_plain_mean,
                      is_unit_cosine, is_unit_euclidean, no_pos_or_neg, short_circuit, static_shapes, unit_rows)
from . import _stats
from .lazy_pairs import LazyMinedPairs


SHORT_ROWS = "an embedding row shorter than 1e-12 (e.g. all zeros) with a Euclidean fused loss"


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


def _plain_backend(module, embeddings, labels, indices_tuple, distance_ok):
    """The engine backend when the call is the plain configuration every fused loss covers
    (labels given, no indices_tuple, the default distance), else None (the reference runs)."""
    backend = engine_backend(embeddings, module.backend)
    if backend is None:
        return decline(module, no_engine_reason(embeddings, module.backend))
    if labels is None:
        return decline(module, "no labels (pairs from indices_tuple only)")
    if indices_tuple is not None:
        return decline(module, "an indices_tuple (the fused kernels use all pairs)")
    if not distance_ok(module.distance):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    return backend


def _lse2(x, y, xl, yl, params, exclude_diag, backend, row_in=None, transform=0, mining=0):
    return pe.engine_forward(x, y, xl, yl, row_in, pass_kind=pe.PASS_LSE2, transform=transform,
                             mining=mining, params=params, exclude_diag=exclude_diag, backend=backend)


def _log1p_exp(x):
    """log(1 + e^x) without F.softplus's cut-off (it returns x above 20: a 2e-9 error in fp64);
    0 with gradient 0 for x = -inf (an empty set). Bits independent of the CPU thread count."""
    return logaddexp(x, torch.zeros_like(x))


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


# ------------------------------------------------------------------------- Multi-Similarity
_ROW_CHUNK = 4096


def _row_dots(v, y):
    """y @ v as per-row products and sums, in chunks of rows (O(chunk D) memory). Not a BLAS
    gemv: MKL's splits the products by the thread count on a CPU (bits differ between 1 and 2
    threads); a row's sum over D here is one thread's, in one order."""
    if y.device.type != "cpu":
        return y @ v
    return torch.cat([(y[c:c + _ROW_CHUNK] * v).sum(dim=1) for c in range(0, max(len(y), 1), _ROW_CHUNK)])


def _mined_count_in_one_row(x, y, labels, ref_labels, row, exclude_diag, keep):
    """How many pairs the miner kept in query row `row` (a 1-element index tensor): one row of
    similarities, O(M D). `keep(sim, same_label)` is the miner's rule for that row."""
    sim = _row_dots(x.index_select(0, row)[0], y)
    same = labels.index_select(0, row) == ref_labels
    kept = keep(sim, same)
    if exclude_diag:
        kept = kept & (torch.arange(len(ref_labels), device=ref_labels.device) != row)
    return kept.sum()


def _at_most_one_mined_pair_each(x, y, labels, ref_labels, row_in, lse, eps, exclude_diag):
    """PML's `len <= 1` rule on the miner's pairs: at most one positive and at most one negative
    pair in the whole batch (then the loss is zero). A row whose masked LSE is finite has at least
    one mined pair, so two such rows decide at once; with exactly one, count that row's pairs.
    Tensor valued: no host sync, traceable by torch.compile."""
    has_pos, has_neg = torch.isfinite(lse[:, 0]), torch.isfinite(lse[:, 1])
    # The first such row, as a 1-element index (tensor indexing, not .item(): no host sync).
    pos_row = torch.argmax(has_pos.to(torch.int8)).view(1)
    neg_row = torch.argmax(has_neg.to(torch.int8)).view(1)
    max_neg, min_pos = row_in[:, 0].index_select(0, pos_row), row_in[:, 1].index_select(0, neg_row)

    def pos_kept(sim, same):  # s_ap - eps < max over the row's negatives
        return same & (sim.to(max_neg.dtype) - eps < max_neg)

    def neg_kept(sim, same):  # s_an + eps > min over the row's positives
        return ~same & (sim.to(min_pos.dtype) + eps > min_pos)

    pos_count = _mined_count_in_one_row(x, y, labels, ref_labels, pos_row, exclude_diag, pos_kept)
    neg_count = _mined_count_in_one_row(x, y, labels, ref_labels, neg_row, exclude_diag, neg_kept)
    rows_pos, rows_neg = has_pos.sum(), has_neg.sum()
    pos_le1 = (rows_pos == 0) | ((rows_pos == 1) & (pos_count <= 1))
    neg_le1 = (rows_neg == 0) | ((rows_neg == 1) & (neg_count <= 1))
    return pos_le1 & neg_le1


def _mined_pairs_in_kernel(module, mined, embeddings, ref_emb):
    """Whether the kernel can mine the pairs of `mined` (the miner's lazy result) itself; else
    records why not. It can when the miner's distance is the unit cosine, its diagonal rule is
    the kernel's, and the embeddings still hold the values mined on."""
    if not is_unit_cosine(mined.distance):
        return decline(module, f"the miner's distance {type(mined.distance).__name__} is not the default")
    if not mined.kernel_can_mine:
        return decline(module, "the miner's ref_emb / ref_labels drop self-pairs unlike the kernel can")
    if not mined.shape_matches(embeddings, ref_emb) or not mined.holds_inputs(embeddings, ref_emb):
        return decline(module, "the miner's pairs come from other embeddings (or they changed since mining)")
    return True


def multi_similarity(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = engine_backend(embeddings, module.backend)
    if backend is None:
        return decline(module, no_engine_reason(embeddings, module.backend))
    if not is_unit_cosine(module.distance):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    mining_eps = None
    if indices_tuple is not None:
        if not isinstance(indices_tuple, LazyMinedPairs):
            return decline(module, "an indices_tuple other than MultiSimilarityMiner's result")
        if not _mined_pairs_in_kernel(module, indices_tuple, embeddings, ref_emb):
            return None
        # The pairs are the miner's: its labels and epsilon as they were at mining time.
        labels, ref_labels = indices_tuple.mining_labels()
        mining_eps = indices_tuple.epsilon
    elif labels is None:
        return decline(module, "no labels")
    exclude_diag = ref_labels is labels
    stats = LabelStats(labels, ref_labels)
    if mining_eps is None:  # PML's `len <= 1` rule
        degenerate = Degenerate(labels, _at_most_one_pair_each(stats))
    else:  # the miner returns no pairs at all. (Implied by the mined-pairs rule below, which the
        # branch-free path applies; eager on the CPU this returns before any kernel.)
        degenerate = Degenerate(labels, False)
        if not degenerate.branchless:
            degenerate.include(lambda: no_pos_or_neg(stats))
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    a, b, base = float(module.alpha), float(module.beta), float(module.base)
    params = [-a, a * base, b, -b * base, mining_eps or 0.0]
    x, y = _pair_inputs(embeddings, ref_emb)
    row_in, mining = None, pe.MINING_NONE
    if mining_eps is not None:
        with torch.no_grad():
            extrema = pe.engine_forward(x, y, labels, ref_labels, pass_kind=pe.PASS_EXTREMA, params=params,
                                        exclude_diag=exclude_diag, backend=backend)
        row_in = torch.cat([extrema, torch.zeros_like(extrema[:, :1])], dim=1)
        mining = pe.MINING_MULTI_SIMILARITY
    lse = _lse2(x, y, labels, ref_labels, params, exclude_diag, backend, row_in, mining=mining)
    if mining_eps is not None:
        degenerate.include(lambda: _at_most_one_mined_pair_each(x, y, labels, ref_labels, row_in, lse, mining_eps,
                                                                exclude_diag))
        if degenerate.returns_zero_now():
            return ZERO_LOSS
    softplus = _log1p_exp(lse)  # both columns in one op (each op is a kernel launch on a GPU)
    losses = degenerate.zero_where(softplus[:, 0] / a + softplus[:, 1] / b)
    module.last_backend = backend
    return {"loss": _per_row(losses, embeddings)}


# ------------------------------------------------------------------- Generalized Lifted
def generalized_lifted_structure(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_euclidean)
    if backend is None:
        return None
    if has_short_rows(embeddings, ref_emb):
        return decline(module, SHORT_ROWS)
    exclude_diag = ref_labels is labels
    degenerate = Degenerate(labels, _at_most_one_pair_each(LabelStats(labels, ref_labels)))
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    pm, nm = float(module.pos_margin), float(module.neg_margin)
    x, y = _pair_inputs(embeddings, ref_emb)
    lse = _lse2(x, y, labels, ref_labels, [1.0, -pm, -1.0, nm, 0.0], exclude_diag, backend,
                transform=pe.TRANSFORM_UNIT_DISTANCE)
    losses = degenerate.zero_where(torch.relu(_empty_as_zero(lse[:, 0]) + _empty_as_zero(lse[:, 1])))
    module.last_backend = backend
    return {"loss": _per_row(losses, embeddings)}


# ------------------------------------------------------------------------------- SupCon
def supcon(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_cosine)
    if backend is None:
        return None
    exclude_diag = ref_labels is labels
    stats = LabelStats(labels, ref_labels)
    degenerate = Degenerate(labels, _rule_or_no_pos_or_neg(stats))
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    inv_t = 1.0 / float(module.temperature)
    x, y = _pair_inputs(embeddings, ref_emb)
    lse = _lse2(x, y, labels, ref_labels, [inv_t, 0.0, inv_t, 0.0, 0.0], exclude_diag, backend)
    # sum_{p in P(i)} s_ip = <x_i, sum of the reference rows with label y_i> - the self pair: O(N D).
    pos_sim_sum = (x * class_sums_for_rows(stats, y)).sum(dim=1)
    if exclude_diag:  # one labels tensor: row i's self pair (x_i, y_i) is in the class sum
        pos_sim_sum = pos_sim_sum - (x * y).sum(dim=1)
    count = stats.pos.to(lse.dtype)
    tiny = torch.finfo(embeddings.dtype).tiny  # PML divides by |P(i)| + tiny
    pos_sim_mean = pos_sim_sum.to(lse.dtype) / (count + tiny)
    # -mean_p log_prob = LSE - mean_p s_ip/t, with LSE = lse_pos + softplus(lse_neg - lse_pos):
    # (lse_pos - mean_p s_ip/t) + softplus(lse_neg - lse_pos). Near convergence the loss is small
    # next to s/t ~ 1/t; the first term is 0 for one positive (the LSE of one value is that value)
    # and O(log |P|) otherwise, so nothing of size 1/t cancels (PML shifts by the row maximum).
    lse_pos = torch.where(count > 0, lse[:, 0], 0.0)  # -inf without positives: no inf - inf below
    pos_spread = torch.where(count == 1, 0.0, lse_pos - pos_sim_mean * inv_t)
    neg_term = _log1p_exp(lse[:, 1] - lse_pos)
    losses = degenerate.zero_where(torch.where(count > 0, pos_spread + neg_term, 0.0))
    module.last_backend = backend
    return {"loss": _element(losses.to(embeddings.dtype), len(losses))}  # (N,), as PML's SupCon


def _lse_neg_then(second_pass, x, y, labels, ref_labels, params, exclude_diag, transform, backend):
    """The chain NT-Xent and Lifted Structure share: the lse2 pass for each row's log-sum-exp over
    its negatives, then `second_pass` reading it as L (row_in column 2). Returns (row_in, the
    second pass's statistics)."""
    lse = pe.engine_forward(x, y, labels, ref_labels, pass_kind=pe.PASS_LSE2, transform=transform, params=params,
                            exclude_diag=exclude_diag, backend=backend)
    neg_lse = lse[:, 1]
    zero = torch.zeros_like(neg_lse)
    row_in = torch.stack([zero, zero, neg_lse], dim=1)
    out = pe.engine_forward(x, y, labels, ref_labels, row_in, pass_kind=second_pass, transform=transform,
                            params=params, exclude_diag=exclude_diag, backend=backend)
    return row_in, out


# ------------------------------------------------------------------------------- NT-Xent
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
    def forward(x, y, labels, ref_labels, params, exclude_diag, backend):
        # y / ref_labels are None when they are x / labels: torch.compile can't trace an
        # autograd.Function given one tensor twice.
        y = x if y is None else y
        ref_labels = labels if ref_labels is None else ref_labels
        row_in, out = _lse_neg_then(pe.PASS_POS_SOFTPLUS, x, y, labels, ref_labels, params, exclude_diag,
                                    pe.TRANSFORM_DOT, backend)
        return out[:, 0], row_in, out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, labels, ref_labels, params, exclude_diag, backend = inputs
        _, row_in, out = output
        ctx.self_pairs = y is None
        ctx.symmetric = y is None and ref_labels is None  # the pair masks are symmetric too
        ctx.mark_non_differentiable(row_in, out)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, x if y is None else y, labels, labels if ref_labels is None else ref_labels,
                              row_in, out)
        ctx.config = (params, exclude_diag, backend)

    @staticmethod
    def backward(ctx, grad, _grad_row_in, _grad_out):
        x, y, labels, ref_labels, row_in, out = ctx.saved_tensors
        params, exclude_diag, backend = ctx.config
        if grad is None:
            return None, None, None, None, None, None, None
        if pe.backward_needs_graph(x):  # create_graph=True: a differentiable gradient
            def per_row(x, y):
                return _lse_neg_then(pe.PASS_POS_SOFTPLUS, x, y, labels, ref_labels, params, exclude_diag,
                                     pe.TRANSFORM_DOT, "reference")[1][:, 0]
            grads = pe.reference_gradient(per_row, (x, y), ctx.needs_input_grad[:2], grad)
            return (*grads, None, None, None, None, None)
        with torch.no_grad():  # under torch.func.grad grad mode is on
            return _NTXentRows._fused_backward(ctx, grad, x, y, labels, ref_labels, row_in, out, params,
                                               exclude_diag, backend)

    @staticmethod
    def _fused_backward(ctx, grad, x, y, labels, ref_labels, row_in, out, params, exclude_diag, backend):
        grad = grad.to(out.dtype)
        zero = torch.zeros_like(grad)
        # d/d lse_neg(a) = grad_a * sum_p sigmoid(...) = grad_a * out[:, 1] (pos_softplus's rule).
        coef = torch.stack([zero, zero, grad * out[:, 1], row_in[:, 2], grad], dim=1)
        grad_x, grad_y = pe.engine_backward_raw(x, y, labels, ref_labels, row_in, coef.contiguous(),
                                                transform=pe.TRANSFORM_DOT, mining=pe.MINING_NONE,
                                                params=params, exclude_diag=exclude_diag, backend=backend,
                                                symmetric=ctx.symmetric, coef_terms=1)  # B_pos
        if ctx.symmetric:  # grad_x is the sum already (grad_y zero)
            return grad_x, None, None, None, None, None, None
        if ctx.self_pairs:  # y is x: the sum
            return grad_x + grad_y, None, None, None, None, None, None
        return grad_x, grad_y, None, None, None, None, None


_apply_ntxent_rows = applier(_NTXentRows)


def ntxent(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_cosine)
    if backend is None:
        return None
    if not is_plain_mean(module.reducer):  # per-pair losses would need the O(pairs) list
        return decline(module, f"{type(module.reducer).__name__} with NTXentLoss (fused with MeanReducer)")
    exclude_diag = ref_labels is labels
    stats = LabelStats(labels, ref_labels)
    degenerate = Degenerate(labels, _rule_or_no_pos_or_neg(stats))
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    inv_t = 1.0 / float(module.temperature)
    params = [inv_t, 0.0, inv_t, 0.0, 0.0]
    x, y = _pair_inputs(embeddings, ref_emb)
    # The loss is a sum over pairs: with the rows (and the reference rows) sorted by label, the
    # positives sit in a few tiles near the diagonal, and the pos_softplus pass computes only
    # those. One permutation for both sides when the labels are one tensor (the self-pairs
    # excluded then are pairs of equal index).
    sorted_labels, order = torch.sort(labels, stable=True)
    if ref_labels is labels:
        ref_labels, ref_order = sorted_labels, order
    else:
        ref_labels, ref_order = torch.sort(ref_labels, stable=True)
    sorted_x = x[order]
    y = sorted_x if y is x and ref_order is order else y[ref_order]
    x, labels = sorted_x, sorted_labels
    per_row = _apply_ntxent_rows(x, None if y is x else y, labels, None if ref_labels is labels else ref_labels,
                                params, exclude_diag, backend)[0]
    loss = degenerate.zero_where(fixed_order_sum(per_row) / stats.pos_total.clamp(min=1))
    module.last_backend = backend
    return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced",
                     **_stats.already_reduced_size(module.reducer, stats.pos_total)}}


# --------------------------------------------------------------------------- ProxyAnchor
def proxy_anchor(module, embeddings, labels, indices_tuple, proxies):
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_cosine)
    if backend is None:
        return None  # e.g. miner weights (indices_tuple): the reference
    a, m = float(module.alpha), float(module.margin)
    num_classes = proxies.shape[0]
    p = unit_rows(proxies)
    x = unit_rows(embeddings)
    proxy_labels = torch.arange(num_classes, device=labels.device)
    # Per proxy (a row of the engine): pos over its class's samples, neg over the others.
    lse = _lse2(p, x, proxy_labels, labels, [-a, a * m, a, a * m, 0.0], False, backend)
    if static_shapes():  # labels can't be read (check_class_inputs): outside [0, C) gives NaN
        lse = torch.where(((labels >= 0) & (labels < num_classes)).all(), lse, float("nan"))
    # The number of proxies with a positive: a tensor under torch.compile and on CUDA (no host
    # sync; DivisorReducer divides by it either way), a Python int on the CPU as PML's.
    # (scatter into C + 1 slots, labels >= C in the last: a static shape, unlike bincount)
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=labels.device)
    num_with_pos = present.scatter(0, labels.clamp(0, num_classes), True)[:num_classes].sum()
    if not (static_shapes() or num_with_pos.is_cuda):
        num_with_pos = int(num_with_pos)
    idx = torch.arange(num_classes, device=embeddings.device)
    module.last_backend = backend
    return {
        "pos_loss": {"losses": _log1p_exp(lse[:, 0]).to(embeddings.dtype), "indices": idx,
                     "reduction_type": "element", "divisor": num_with_pos},
        "neg_loss": {"losses": _log1p_exp(lse[:, 1]).to(embeddings.dtype), "indices": idx,
                     "reduction_type": "element", "divisor": num_classes},
    }


# ------------------------------------------------------------------------------- N-pairs
def _first_of_label_pairs(labels):
    """(order, starts_pair): the stable sort order of the labels, and for each sorted position
    whether it is the first sample of its label and a second one follows (static shapes)."""
    order = torch.sort(labels, stable=True).indices
    sorted_labels = labels[order]
    same_as_next = torch.zeros_like(sorted_labels, dtype=torch.bool)
    same_as_next[:-1] = sorted_labels[1:] == sorted_labels[:-1]
    starts_run = torch.ones_like(same_as_next)
    starts_run[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return order, starts_run & same_as_next


def first_pair_per_label(labels):
    """PML's convert_to_pos_pairs_with_unique_labels on all pairs, in O(N log N): for each label
    with at least two samples, the anchor is its first index and the positive its second."""
    order, starts_pair = _first_of_label_pairs(labels)
    first = torch.nonzero(starts_pair).squeeze(1)
    return order[first], order[first + 1]


def n_pairs(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_cosine)
    if backend is None:
        return None
    if static_shapes():
        return _n_pairs_static_shapes(module, embeddings, labels, backend)
    anchors, positives = first_pair_per_label(labels)
    _stats.n_pairs(module, embeddings, anchors, positives)
    if len(anchors) == 0:
        return ZERO_LOSS
    xa = unit_rows(embeddings[anchors])
    xp = unit_rows(embeddings[positives])
    k = torch.arange(len(anchors), device=labels.device)
    # Cross-entropy over S[anchors, positives] against arange: pos = the diagonal, neg = the rest.
    lse = _lse2(xa, xp, k, k, [1.0, 0.0, 1.0, 0.0, 0.0], False, backend)
    losses = torch.logsumexp(lse, dim=1) - (xa * xp).sum(dim=1)
    module.last_backend = backend
    return {"loss": {"losses": losses.to(embeddings.dtype), "indices": anchors, "reduction_type": "element"}}


_DROPPED_COLUMN = -1.0e4  # a similarity whose exp is exactly 0 next to any |s| <= 1, in every dtype


def _n_pairs_static_shapes(module, embeddings, labels, backend):
    """N-pairs without data-dependent shapes, for torch.compile(fullgraph=True): every sorted
    position k is a candidate anchor (its positive: position k + 1), valid when it starts a label
    run of length >= 2. Invalid columns get an extra coordinate of -1e4 against the anchors' 1, so
    their similarity drops out of every row's log-sum-exp exactly; invalid rows are masked. It
    costs N x N instead of k x k (k anchors): eager mode lists the anchors instead. The mean over
    the k anchors is MeanReducer's; other reducers need the anchor list (the reference)."""
    if not is_plain_mean(module.reducer):
        return decline(module, f"{type(module.reducer).__name__} with NPairsLoss under torch.compile")
    n = labels.shape[0]
    order, valid = _first_of_label_pairs(labels)
    positives = order[(torch.arange(n, device=labels.device) + 1).clamp(max=n - 1)]
    xa, xp = unit_rows(embeddings[order]), unit_rows(embeddings[positives])
    dropped = torch.where(valid, 0.0, _DROPPED_COLUMN).to(xp.dtype)[:, None]
    xa_ext = torch.cat([xa, torch.ones_like(dropped)], dim=1)
    xp_ext = torch.cat([xp, dropped], dim=1)
    k = torch.arange(n, device=labels.device)
    lse = _lse2(xa_ext, xp_ext, k, k, [1.0, 0.0, 1.0, 0.0, 0.0], False, backend)
    losses = torch.logsumexp(lse, dim=1) - (xa * xp).sum(dim=1).to(lse.dtype)
    num_anchors = valid.sum()
    loss = fixed_order_sum(torch.where(valid, losses, 0.0)) / num_anchors.clamp(min=1)  # 0 if none
    module.last_backend = backend
    _stats.n_pairs(module, embeddings, order=order, valid=valid)
    return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced",
                     **_stats.already_reduced_size(module.reducer, num_anchors)}}


# ----------------------------------------------------------------------- Lifted Structure
MAX_POS_PAIRS_PER_ROW = 64  # above this many positive pairs per row, the reference runs


def positive_pairs(labels):
    """All ordered same-label pairs (i, j), i != j, in row-major order like PML's
    get_all_pairs_indices, as two index tensors: O(pairs), no N x N mask."""
    order = torch.sort(labels, stable=True).indices
    counts = torch.unique_consecutive(labels[order], return_counts=True)[1]
    starts = torch.cumsum(counts, 0) - counts
    # Pair (u, v) of a group of size c, u != v: expand each row of the group over its group.
    row_group = torch.repeat_interleave(torch.arange(len(counts), device=labels.device), counts)
    row_pos = torch.arange(len(labels), device=labels.device) - starts[row_group]
    reps = counts[row_group]
    a_sorted = torch.repeat_interleave(torch.arange(len(labels), device=labels.device), reps)
    offset = torch.arange(int(reps.sum()), device=labels.device) - torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
    p_sorted = starts[row_group][a_sorted] + offset
    keep = offset != row_pos[a_sorted]
    a, p = order[a_sorted[keep]], order[p_sorted[keep]]
    row_major = torch.argsort(a * len(labels) + p)  # PML's order: by anchor, then positive
    return a[row_major], p[row_major]


class _PairDots(torch.autograd.Function):
    """<x_a, x_p> for a list of pairs, in chunks: O(pairs) memory instead of O(pairs x D)."""

    CHUNK = 1 << 16

    @staticmethod
    def forward(x, a, p):
        out = x.new_empty(len(a))
        for c in range(0, len(a), _PairDots.CHUNK):
            sl = slice(c, c + _PairDots.CHUNK)
            out[sl] = (x[a[sl]] * x[p[sl]]).sum(dim=1)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):  # differentiable ops (index_add_ is serial on the CPU: deterministic)
        x, a, p = ctx.saved_tensors
        gx = torch.zeros_like(x)
        for c in range(0, len(a), _PairDots.CHUNK):
            sl = slice(c, c + _PairDots.CHUNK)
            g = grad[sl, None].to(x.dtype)
            gx.index_add_(0, a[sl], g * x[p[sl]])
            gx.index_add_(0, p[sl], g * x[a[sl]])
        return gx, None, None


_apply_pair_dots = applier(_PairDots)


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
    def forward(x, labels, params, backend):
        labels, order = torch.sort(labels, stable=True)
        sorted_x = x[order]
        row_in, out = _lse_neg_then(pe.PASS_LIFTED_PAIRS, sorted_x, sorted_x, labels, labels, params, True,
                                    pe.TRANSFORM_UNIT_DISTANCE, backend)
        return fixed_order_sum(out[:, 0]), fixed_order_sum(out[:, 2]), labels, row_in, out, order

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, params, backend = inputs
        _, count, labels, row_in, out, order = output
        ctx.mark_non_differentiable(count, labels, row_in, out, order)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, labels, row_in, out, order)
        ctx.config = (params, backend)

    @staticmethod
    def backward(ctx, grad_total, *_grad_statistics):
        x, labels, row_in, out, order = ctx.saved_tensors
        params, backend = ctx.config
        if grad_total is None:
            return None, None, None, None
        if pe.backward_needs_graph(x):  # create_graph=True: a differentiable gradient
            def total(x):  # the reference's lifted_pairs pass is differentiable
                sorted_x = x[order]
                return _lse_neg_then(pe.PASS_LIFTED_PAIRS, sorted_x, sorted_x, labels, labels, params, True,
                                     pe.TRANSFORM_UNIT_DISTANCE, "reference")[1][:, 0].sum()
            return (*pe.reference_gradient(total, (x,), ctx.needs_input_grad[:1], grad_total), None, None, None)
        with torch.no_grad():  # under torch.func.grad grad mode is on
            return _LiftedPairs._fused_backward(grad_total, x, labels, row_in, out, order, params, backend)

    @staticmethod
    def _fused_backward(grad_total, x, labels, row_in, out, order, params, backend):
        x = x[order]
        g = grad_total.to(out.dtype).expand(out.shape[0])
        zero = torch.zeros_like(g)
        coef = torch.stack([zero, zero, 2 * g * out[:, 1], row_in[:, 2], zero, g], dim=1)
        grad_x, grad_y = pe.engine_backward_raw(x, x, labels, labels, row_in, coef.contiguous(),
                                                transform=pe.TRANSFORM_UNIT_DISTANCE, mining=pe.MINING_NONE,
                                                params=params, exclude_diag=True, backend=backend,
                                                symmetric=True, coef_terms=2)  # C_lift
        grad = torch.zeros_like(grad_x).index_copy(0, order, grad_x)  # back to the caller's order
        return grad, None, None, None


_apply_lifted_pairs = applier(_LiftedPairs)


def _lifted_reduction(reducer):
    """"mean" / "nonzero" when the reducer is exactly PML's default MeanReducer or an
    AvgNonZeroReducer (without stats collection): the loss is then a ratio of two totals of the
    lifted_pairs pass. None for every other reducer (it needs the per-pair losses)."""
    from ..reducers import AvgNonZeroReducer, MeanReducer

    if getattr(reducer, "collect_stats", True):
        return None
    if type(reducer) is MeanReducer:
        return "mean"
    if type(reducer) is AvgNonZeroReducer and reducer.low == 0 and reducer.high is None:
        return "nonzero"
    return None


def lifted_structure(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Per positive pair (i, j): relu(log(sum_{n in N(i)} e^{m_n - d_in} + sum_{n in N(j)} e^{m_n - d_jn})
    + d_ij - m_p)^2 / 2. The per-row negative sums are engine statistics (L_i). With MeanReducer
    or AvgNonZeroReducer the loss is (sum of the pair losses) / (number of positive pairs, or of
    non-zero pair losses), both from the engine's lifted_pairs pass: no pair list, static shapes
    (torch.compile fullgraph). Other reducers get the per-pair losses from a list of the positive
    pairs (O(pairs)), fused only while pairs are few per row."""
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_euclidean)
    # With ref_emb (even the embeddings themselves, given with other ref_labels) PML matches
    # negatives by index value and keeps self-pairs: the reference does that.
    if backend is None:
        return None
    if ref_emb is not embeddings or ref_labels is not labels:
        return decline(module, "ref_emb or ref_labels with LiftedStructureLoss")
    if has_short_rows(embeddings):
        return decline(module, SHORT_ROWS)
    stats = LabelStats(labels, labels)
    degenerate = Degenerate(labels, _rule_or_no_pos_or_neg(stats))
    pm, nm = float(module.pos_margin), float(module.neg_margin)
    reduction = _lifted_reduction(module.reducer)
    if reduction is None:
        return _lifted_structure_pair_list(module, embeddings, labels, stats, degenerate, pm, nm, backend)
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    x = unit_rows(embeddings)
    total, nonzero = _apply_lifted_pairs(x, labels, [1.0, -pm, -1.0, nm, 0.0], backend)[:2]
    if reduction == "nonzero" and not static_shapes() and bool(torch.isnan(total)):
        # AvgNonZero drops NaN pair losses (NaN > 0 is false) and averages the rest: that needs
        # the per-pair losses. (Under torch.compile the NaN propagates: a documented deviation.)
        return _lifted_structure_pair_list(module, embeddings, labels, stats, degenerate, pm, nm, backend)
    if reduction == "mean":  # PML's mean over all positive pairs: sum_c n_c (n_c - 1) of them
        loss = total / stats.pos_total.clamp(min=1).to(total.dtype)
    else:  # the mean of the f > 0; none: the reducer's grad-carrying zero
        loss = torch.where(nonzero > 0, total / nonzero.clamp(min=1),
                           module.reducer.zero_loss(embeddings).to(total.dtype))
    loss = degenerate.zero_where(loss)
    module.last_backend = backend
    return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced"}}


def _lifted_structure_pair_list(module, embeddings, labels, stats, degenerate, pm, nm, backend):
    """Lifted Structure for reducers that need the per-pair losses: L_i from the engine, the
    positive pairs listed (data-dependent sizes: no fullgraph compile)."""
    if degenerate.now():
        return ZERO_LOSS
    if int(stats.pos_total) > MAX_POS_PAIRS_PER_ROW * len(labels):
        return decline(module, f"{type(module.reducer).__name__} with LiftedStructureLoss and more than "
                               f"{MAX_POS_PAIRS_PER_ROW} positive pairs per row")
    x = unit_rows(embeddings)
    lse = _lse2(x, x, labels, labels, [0.0, 0.0, -1.0, nm, 0.0], True, backend,
                transform=pe.TRANSFORM_UNIT_DISTANCE)
    neg_lse = lse[:, 1]
    a, p = positive_pairs(labels)
    # index_select: indexing's backward (index_put_ accumulate) sums a row's pairs by parallel
    # atomic adds on a CPU (fp32; not reproducible); index_select's (index_add) is serial there.
    neg_part = _empty_as_zero(logaddexp(neg_lse.index_select(0, a), neg_lse.index_select(0, p)))
    dots = _apply_pair_dots(x.to(neg_lse.dtype), a, p)
    d_ap = torch.sqrt(torch.clamp(2 - 2 * dots, min=0))
    losses = torch.relu(neg_part + d_ap - pm) ** 2 / 2
    module.last_backend = backend
    return {"loss": {"losses": losses.to(embeddings.dtype).unsqueeze(1), "indices": (a, p),
                     "reduction_type": "pos_pair"}}
