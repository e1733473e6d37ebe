"""Reference triplet/tuple losses: TripletMargin, Margin, TupletMargin, Angular (an anchor
and a positive weighed against negatives). Conventions: see ``embedding_losses``."""

import math

import torch
import torch.nn.functional as F

from ..distances import CosineSimilarity, LpDistance
from ..reducers import AvgNonZeroReducer, DivisorReducer, MeanReducer
from ._embedding_common import _entry, _run_loss, _zero_entry, _zeros, pair_setup_both, require_distance
from .indices import convert_to_pairs, convert_to_triplets, logsumexp

__all__ = [
    "triplet_margin_loss",
    "margin_loss",
    "tuplet_margin_loss",
    "angular_loss",
    "triplet_margin_loss_dict",
    "margin_loss_dict",
    "tuplet_margin_loss_dict",
    "angular_loss_dict",
]

MARGIN_SUB_LOSSES = ["margin_loss", "beta_reg_loss"]


# =============================================================================== TripletMargin
def triplet_margin_loss_dict(
    embeddings, labels, indices_tuple, ref_emb, ref_labels, *,
    margin, swap, smooth_loss, triplets_per_anchor, distance,
):
    """relu (or softplus) of margin(d_ap, d_an) + margin, per triplet."""
    a, p, n = convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor=triplets_per_anchor)
    if len(a) == 0:
        return _zeros()
    mat = distance(embeddings, ref_emb)
    d_ap = mat[a, p]
    d_an = mat[a, n]
    if swap:
        # PML reads the positive-negative distance from the query x ref matrix, with the
        # positive's ref index used as a query row.
        if int(p.max()) >= mat.shape[0]:
            raise ValueError("TripletMarginLoss(swap=True): a positive index is not a valid embeddings row")
        d_an = distance.smallest_dist(d_an, mat[p, n])
    violation = distance.margin(d_ap, d_an) + margin
    losses = F.softplus(violation) if smooth_loss else F.relu(violation)
    return {"loss": _entry(losses, (a, p, n), "triplet")}


def triplet_margin_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", distance=None, reducer=None,
):
    return _run_loss(
        triplet_margin_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=LpDistance(p=2) if distance is None else distance, reducer=reducer,
        default_reducer=AvgNonZeroReducer, margin=margin, swap=swap, smooth_loss=smooth_loss,
        triplets_per_anchor=triplets_per_anchor,
    )


# =============================================================================== Margin
def make_margin_beta(beta, num_classes=None):
    """PML's beta: a float32 tensor of shape (1,), or (num_classes,) when num_classes is set."""
    b = torch.tensor([float(beta)])
    if num_classes:
        b = torch.ones(num_classes) * b
    return b


def margin_loss_dict(
    embeddings, labels, indices_tuple, ref_emb, ref_labels, *,
    margin, nu, beta, learn_beta, triplets_per_anchor, distance,
):
    """Per triplet: relu(margin(d_ap, b) + margin) + relu(margin(b, d_an) + margin), divided by
    the number of non-zero terms; ``b = beta`` (one value) or ``beta[labels[anchor]]``.

    ``beta_reg_loss`` (only when ``learn_beta``): ``b * nu``, already reduced for one beta,
    otherwise per anchor over the same divisor.
    """
    a, p, n = convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor=triplets_per_anchor)
    if len(a) == 0:
        return _zeros(MARGIN_SUB_LOSSES)
    b = margin_anchor_beta(beta, labels, a, embeddings)
    mat = distance(embeddings, ref_emb)
    return margin_triplets_dict(mat[a, p], mat[a, n], b, (a, p, n), margin=margin, nu=nu, beta=beta,
                                learn_beta=learn_beta, distance=distance)


def margin_anchor_beta(beta, labels, a, embeddings):
    """Each triplet's beta in the embeddings' dtype: ``beta`` (one value) or beta[labels[a]]."""
    if len(beta) == 1:
        b = beta
    else:
        if labels is None:
            raise ValueError("MarginLoss with num_classes needs labels (beta is per class)")
        la = labels.index_select(0, a)
        if int(la.min()) < 0 or int(la.max()) >= len(beta):
            raise ValueError(f"labels must be in [0, num_classes={len(beta)}) for a per-class beta")
        b = beta.index_select(0, la.to(beta.device))  # (backward: index_add, serial on a CPU)
    return b.to(device=embeddings.device, dtype=embeddings.dtype)


def margin_triplets_dict(d_ap, d_an, b, triplets, *, margin, nu, beta, learn_beta, distance):
    """MarginLoss's loss dict from the triplets' distances d_ap, d_an and their beta b."""
    pos_loss = F.relu(distance.margin(d_ap, b) + margin)
    neg_loss = F.relu(distance.margin(b, d_an) + margin)
    divisor = torch.sum(pos_loss > 0.0) + torch.sum(neg_loss > 0.0)
    out = {"margin_loss": _entry(pos_loss + neg_loss, triplets, "triplet", divisor=divisor)}
    if learn_beta:
        reg = b * nu
        if len(beta) == 1:
            out["beta_reg_loss"] = _entry(reg, None, "already_reduced")
        else:
            out["beta_reg_loss"] = _entry(reg, triplets[0], "element", divisor=divisor)
    else:
        out["beta_reg_loss"] = _zero_entry()
    return out


def margin_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all", learn_beta=False, num_classes=None,
    distance=None, reducer=None,
):
    """``beta`` may be a number (made into PML's tensor) or a tensor of shape (1,)/(C,)."""
    if not torch.is_tensor(beta):
        beta = make_margin_beta(beta, num_classes)
    return _run_loss(
        margin_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=LpDistance(p=2) if distance is None else distance, reducer=reducer,
        default_reducer=DivisorReducer, sub_loss_names=MARGIN_SUB_LOSSES, margin=margin, nu=nu, beta=beta,
        learn_beta=learn_beta, triplets_per_anchor=triplets_per_anchor,
    )


# =============================================================================== TupletMargin
def tuplet_margin_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, margin, scale, distance):
    """Per positive pair (a, p): log(1 + sum_{neg pairs of a} exp(scale*(s_an - cos(acos(s_ap) -
    margin)))); ``margin`` in radians."""
    setup = pair_setup_both(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, (a1, p, a2, n) = setup
    pos_cos, neg_cos = mat[a1, p], mat[a2, n]
    pos_angle = torch.acos(pos_cos.clamp(-1, 1))
    shifted_pos = torch.cos(pos_angle - margin).unsqueeze(1)  # (P, 1)
    inside = scale * (neg_cos.unsqueeze(0) - shifted_pos)  # (P, N)
    same_anchor = a2.unsqueeze(0) == a1.unsqueeze(1)
    losses = logsumexp(inside, keep_mask=same_anchor, add_one=True, dim=1)
    return {"loss": _entry(losses, (a1, p), "pos_pair")}


def tuplet_margin_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    margin=5.73, scale=64, distance=None, reducer=None,
):
    """``margin`` in degrees, as in the class constructor."""
    distance = CosineSimilarity() if distance is None else distance
    require_distance("TupletMarginLoss", distance, "CosineSimilarity")
    return _run_loss(
        tuplet_margin_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=distance, reducer=reducer, default_reducer=MeanReducer, margin=math.radians(margin), scale=scale,
    )


# =============================================================================== Angular
def angular_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, alpha, distance):
    """Per positive pair (a, p), over every ref item n with a label different from a's:
    log(1 + sum_n exp(4 tan^2(alpha) (x_a + x_p).x_n - 2 (1 + tan^2(alpha)) x_a.x_p)),
    x_a, x_p normalised, x_n the raw ref embedding (PML quirk). ``alpha`` in radians.
    Negatives come from labels even when indices_tuple is given."""
    if labels is None:
        raise ValueError("labels are required for this loss function")
    a1, p, a2, n = convert_to_pairs(indices_tuple, labels, ref_labels)
    if len(a1) == 0 or len(a2) == 0:
        return _zeros()
    del a2, n  # (only their existence counts: freed here, as PML frees them, for PML's peak memory)
    if ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError("ref_labels is required when ref_emb and embeddings differ in size")
    x_a = distance.normalize(embeddings[a1])
    x_p = distance.normalize(ref_emb[p])
    is_neg = labels[a1].unsqueeze(1) != ref_labels.unsqueeze(0)  # (P, M)
    sq_tan = math.tan(float(alpha)) ** 2
    ap_dot = torch.sum(x_a * x_p, dim=1, keepdim=True)  # (P, 1)
    center_dot_n = (x_a + x_p) @ ref_emb.t()  # (P, M)
    logits = 4 * sq_tan * center_dot_n - 2 * (1 + sq_tan) * ap_dot
    losses = logsumexp(logits, keep_mask=is_neg, add_one=True)
    return {"loss": _entry(losses, (a1, p), "pos_pair")}


def angular_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    alpha=40, distance=None, reducer=None,
):
    """``alpha`` in degrees, as in the class constructor."""
    distance = LpDistance(p=2) if distance is None else distance
    require_distance("AngularLoss", distance, "LpDistance", p=2, power=1, normalize_embeddings=True)
    return _run_loss(
        angular_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=True,
        distance=distance, reducer=reducer, default_reducer=MeanReducer, alpha=math.radians(alpha),
    )
