"""Margin loss on the engine. PML sums over ALL triplets (a, p, n) relu(d_ap - beta + margin) +
relu(beta - d_an + margin); anchor a's triplets pair each of its n_pos(a) positives with each of
its n_neg(a) negatives, so their total is n_neg(a) * (a's sum over positives) + n_pos(a) * (a's
sum over negatives), and the divisor (the number of terms > 0) follows from the counts alike: one
hinge pass with L_a = -beta (beta of a's class) gives it all, with beta's gradient from the
pass's counts. No triplet is listed (an indices_tuple: pairs from the pairs alone, `_on_pairs`;
triplets, or a reducer needing each triplet's loss, the listed triplets, `listed_triplets.py`)."""
import torch

from .._determinism import fixed_order_sum
from .._tracing import static_shapes
from ..engine_spec import PASS_HINGE, stats_dtype
from ..ops import pair_engine as pe
from ..reducers import DivisorReducer, MeanReducer, SumReducer
from ._common import Degenerate, LabelStats, decline, engine_rows, value_or_zero, value_params
from ._epilogue import ZERO_LOSS, _already_reduced
from .contrastive import NAN_PAIRS, hinge_plan, nan_in
from .listed_pairs import distance_values
from .listed_triplets import listed_margin, on_random_triplets

SUB_LOSSES = ("margin_loss", "beta_reg_loss")
_KINDS = {DivisorReducer: "divisor", MeanReducer: "mean", SumReducer: "sum"}


def _beta_rows(module, labels, embeddings, anchors):
    """Each row's beta in the embeddings' dtype, as the reference takes it: the one value, or
    beta[label] (num_classes). A row without triplets may have any label (PML never indexes it);
    an anchor's label outside [0, num_classes) raises as the reference does (eager only: under
    torch.compile the index is clamped)."""
    beta = module.beta.to(device=embeddings.device, dtype=embeddings.dtype)
    if len(beta) == 1:
        return beta.expand(len(labels))
    if not static_shapes():
        outside = (labels < 0) | (labels >= len(beta))
        if bool((outside & anchors).any()):
            raise ValueError(f"labels must be in [0, num_classes={len(beta)}) for a per-class beta")
    return beta.index_select(0, labels.clamp(0, len(beta) - 1))  # index_add backward: deterministic


def _reduced(kind, total, divisor, count, reducer, embeddings):
    """A sub-loss's reduced value from its total over the triplets, the divisor and the number of
    triplets (DivisorReducer: the reducer's zero for a zero divisor)."""
    if kind == "sum":
        return total
    if kind == "mean":
        return total / count.clamp(min=1).to(total.dtype)
    if not torch.compiler.is_compiling():
        reducer.divisor = divisor  # DivisorReducer records it on every call (PML)
    return value_or_zero(divisor != 0, total / divisor.clamp(min=1).to(total.dtype), reducer, embeddings)


def margin(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    if indices_tuple is not None:  # pairs: from the pairs alone (O(pairs)); else the listed triplets (O(T))
        out = _on_pairs(module, embeddings, labels, indices_tuple, ref_emb)
        return listed_margin(module, embeddings, labels, indices_tuple, ref_emb) if out is NOT_PAIRS else out
    if module.triplets_per_anchor != "all" and labels is not None:  # PML's random triplets, listed
        return on_random_triplets(module, embeddings, labels, ref_emb, ref_labels,
                                  lambda triplets: listed_margin(module, embeddings, labels, triplets, ref_emb))
    plan = hinge_plan(module, embeddings, labels, indices_tuple, ref_emb, SUB_LOSSES, _KINDS)
    if plan is None:
        return None
    backend, kinds = plan
    stats = LabelStats(labels, ref_labels)
    n_pos, n_neg = stats.pos, stats.m - stats.same  # per anchor
    triplets = n_pos * n_neg
    degenerate = Degenerate(labels, lambda: triplets.sum() == 0)  # PML: no triplet, zero losses
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    beta = _beta_rows(module, labels, embeddings, triplets > 0)
    m = float(module.margin)
    x, y, transform = engine_rows(module.distance, embeddings, ref_emb)
    stats_dt = stats_dtype(embeddings.dtype)
    sign = 1.0 if module.distance.is_inverted else -1.0
    # a distance: relu(d_ap - beta + m), relu(beta - d_an + m), L = -beta; a similarity:
    # relu(beta - s_ap + m), relu(s_an - beta + m), L = beta
    params = value_params(module.distance, sc_pos=-sign, off_pos=m, sc_neg=sign, off_neg=m)
    big_l = sign * beta.to(stats_dt)
    zero = torch.zeros_like(big_l)
    row_in = torch.stack([zero, zero, big_l], dim=1)
    out = pe.engine_forward(x, y, labels, ref_labels, row_in, pass_kind=PASS_HINGE, transform=transform,
                            params=params, exclude_diag=ref_labels is labels, backend=backend)
    w_pos, w_neg = n_neg.to(out.dtype), n_pos.to(out.dtype)  # each positive's sum meets n_neg negatives
    total = fixed_order_sum(w_pos * out[:, 0] + w_neg * out[:, 2])
    if nan_in(total):
        return decline(module, NAN_PAIRS)
    counts = out[:, 1::2].detach().to(torch.int64)  # exact integers
    divisor = (n_neg * counts[:, 0] + n_pos * counts[:, 1]).sum()
    num_triplets = triplets.sum()
    kind, reducer = kinds["margin_loss"]
    margin_loss = _reduced(kind, total, divisor, num_triplets, reducer, embeddings)
    loss_dict = {"margin_loss": _already_reduced(degenerate.zero_where(margin_loss), embeddings)}
    loss_dict["beta_reg_loss"] = _beta_reg_entry(module, kinds, lambda: (triplets, beta), stats_dt, divisor,
                                                 num_triplets, embeddings, degenerate.zero_where)
    return loss_dict, backend


def _beta_reg_entry(module, kinds, class_betas, sum_dtype, divisor, num_triplets, embeddings, zero_where):
    """beta_reg_loss's entry: PML's zero without learn_beta; beta * nu, already reduced, for one
    beta; else beta * nu per triplet by its anchor's class, reduced as margin_loss over the
    triplets. class_betas(): (each anchor row's number of triplets, its beta), summed in sum_dtype."""
    if not module.learn_beta:
        return module.zero_loss()
    if len(module.beta) == 1:
        beta = module.beta.to(device=embeddings.device, dtype=embeddings.dtype)
        return _already_reduced(zero_where(beta[:1] * module.nu), embeddings)
    counts, beta = class_betas()
    kind, reducer = kinds["beta_reg_loss"]
    reg_total = fixed_order_sum(counts.to(sum_dtype) * beta.to(sum_dtype)) * module.nu
    return _already_reduced(zero_where(_reduced(kind, reg_total, divisor, num_triplets, reducer, embeddings)),
                            embeddings)


NOT_PAIRS = object()  # `_on_pairs`: not a call it runs (nothing recorded)


def _on_pairs(module, embeddings, labels, indices_tuple, ref_emb):
    """MarginLoss on pairs (a1, p, a2, n) without their triplets. PML's convert_to_triplets pairs
    each positive pair of an anchor with each of its negative pairs (duplicates repeated), so with
    n_pos(a) / n_neg(a) the anchor's listed pairs on each side, a positive pair's term meets
    n_neg(a) triplets and a negative pair's n_pos(a): the total, the divisor (terms > 0) and the
    per-class beta's regularizer follow from O(pairs) gathered distances, where PML lists
    sum_a n_pos(a) n_neg(a) triplets (~N^3 for a MultiSimilarityMiner's pairs) through a
    pairs x pairs match matrix. For the reducers whose value follows from those totals (Divisor,
    Mean, Sum); NOT_PAIRS for any other call (the listed triplets then run it)."""
    from .listed_pairs import listed_rows, materialized
    from .listed_triplets import _listed_reason
    from ..reference.tuple_losses import margin_anchor_beta
    from ._epilogue import reduced_kinds_or_reason

    pairs = materialized(indices_tuple, embeddings.device)
    kinds = reduced_kinds_or_reason(module, SUB_LOSSES, _KINDS)
    if len(pairs) != 4 or isinstance(kinds, str):
        return NOT_PAIRS
    reason = _listed_reason(module, embeddings, ref_emb)
    if reason is not None:
        return decline(module, reason)
    a1, p, a2, n = (t.long() for t in pairs)
    rows = embeddings.shape[0]
    n_pos, n_neg = torch.bincount(a1, minlength=rows), torch.bincount(a2, minlength=rows)
    triplets = n_pos * n_neg
    num_triplets = triplets.sum()
    if int(num_triplets) == 0:
        return ZERO_LOSS  # PML's zero_losses, before any distance
    # only the pairs whose anchor has triplets (PML never reads the others, nor their labels)
    has_neg, has_pos = n_neg[a1] > 0, n_pos[a2] > 0
    a1, p, a2, n = a1[has_neg], p[has_neg], a2[has_pos], n[has_pos]
    distance, m = module.distance, float(module.margin)
    distance.record_stats(embeddings, ref_emb)  # where the reference calls the distance (no-op without stats)
    x, y = listed_rows(embeddings, ref_emb, distance)
    # (fp16 / bf16 embeddings: the distances and terms in fp32 from the widened rows, the loss back
    # in the embeddings' dtype, as the blocked paths)
    d_ap, d_an = distance_values(x, y, a1, p, distance), distance_values(x, y, a2, n, distance)
    b_pos = margin_anchor_beta(module.beta, labels, a1, embeddings).to(d_ap.dtype)
    b_neg = margin_anchor_beta(module.beta, labels, a2, embeddings).to(d_an.dtype)
    pos_loss = torch.relu(distance.margin(d_ap, b_pos) + m)
    neg_loss = torch.relu(distance.margin(b_neg, d_an) + m)
    w_pos, w_neg = n_neg.index_select(0, a1), n_pos.index_select(0, a2)  # the triplets each term meets
    total = fixed_order_sum(torch.cat([w_pos.to(pos_loss.dtype) * pos_loss, w_neg.to(neg_loss.dtype) * neg_loss]))
    if nan_in(total):
        return decline(module, NAN_PAIRS)
    divisor = (w_pos * (pos_loss > 0)).sum() + (w_neg * (neg_loss > 0)).sum()
    kind, reducer = kinds["margin_loss"]
    loss_dict = {"margin_loss": _already_reduced(_reduced(kind, total, divisor, num_triplets, reducer, embeddings),
                                                 embeddings)}

    def class_betas():  # (only the anchors with triplets: PML reads no other row's label)
        anchors = torch.nonzero(triplets).flatten()
        return triplets.index_select(0, anchors), margin_anchor_beta(module.beta, labels, anchors, embeddings)

    loss_dict["beta_reg_loss"] = _beta_reg_entry(module, kinds, class_betas, embeddings.dtype, divisor, num_triplets,
                                                 embeddings, lambda v: v)
    return loss_dict, "listed"
