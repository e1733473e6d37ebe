"""Margin loss on the engine. PML sums over ALL triplets (a, p, n) relu(d_ap - beta + margin) +
relu(beta - d_an + margin); anchor a's triplets pair each of its n_pos(a) positives with each of
its n_neg(a) negatives, so their total is n_neg(a) * (a's sum over positives) + n_pos(a) * (a's
sum over negatives), and the divisor (the number of terms > 0) follows from the counts alike: one
hinge pass with L_a = -beta (beta of a's class) gives it all, with beta's gradient from the
pass's counts. No triplet is listed (an indices_tuple: only its triplets, `listed_triplets.py`)."""
import torch

from .._determinism import fixed_order_sum
from .._tracing import static_shapes
from ..engine_spec import PASS_HINGE, stats_dtype
from ..ops import pair_engine as pe
from ..reducers import DivisorReducer, MeanReducer, SumReducer
from ._common import Degenerate, LabelStats, decline, engine_rows, value_or_zero, value_params
from ._epilogue import ZERO_LOSS, _already_reduced
from .contrastive import NAN_PAIRS, hinge_plan, nan_in
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
    if indices_tuple is not None:  # only the listed triplets (O(T))
        return listed_margin(module, embeddings, labels, indices_tuple, ref_emb)
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
    if not module.learn_beta:
        loss_dict["beta_reg_loss"] = module.zero_loss()
    elif len(module.beta) == 1:  # already reduced: beta * nu
        loss_dict["beta_reg_loss"] = _already_reduced(degenerate.zero_where(beta[:1] * module.nu), embeddings)
    else:  # beta * nu per triplet, by its anchor's class
        kind, reducer = kinds["beta_reg_loss"]
        reg_total = fixed_order_sum(triplets.to(stats_dt) * beta.to(stats_dt)) * module.nu
        reg = _reduced(kind, reg_total, divisor, num_triplets, reducer, embeddings)
        loss_dict["beta_reg_loss"] = _already_reduced(degenerate.zero_where(reg), embeddings)
    return loss_dict, backend
