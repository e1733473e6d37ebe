"""Reference pair losses (PML GenericPairLoss family): Contrastive, MultiSimilarity,
LiftedStructure, GeneralizedLiftedStructure, Circle. Conventions: see ``embedding_losses``."""

import torch
import torch.nn.functional as F

from ..distances import CosineSimilarity, LpDistance
from ..reducers import AvgNonZeroReducer, MeanReducer
from ._embedding_common import (
    _entry,
    _rows,
    _run_loss,
    _zeros,
    pair_setup,
    pair_setup_both,
    pair_setup_masks,
    require_distance,
)
from .indices import logsumexp

__all__ = [
    "contrastive_loss",
    "multi_similarity_loss",
    "lifted_structure_loss",
    "generalized_lifted_structure_loss",
    "circle_loss",
    "contrastive_loss_dict",
    "multi_similarity_loss_dict",
    "lifted_structure_loss_dict",
    "generalized_lifted_structure_loss_dict",
    "circle_loss_dict",
]

CONTRASTIVE_SUB_LOSSES = ["pos_loss", "neg_loss"]


# =============================================================================== Contrastive
def contrastive_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, pos_margin, neg_margin, distance):
    """pos: relu(margin(d_ap, pos_margin)); neg: relu(margin(neg_margin, d_an)); per pair."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros(CONTRASTIVE_SUB_LOSSES)
    mat, (a1, p, a2, n) = setup
    pos_loss = F.relu(distance.margin(mat[a1, p], pos_margin)) if len(a1) > 0 else 0
    neg_loss = F.relu(distance.margin(neg_margin, mat[a2, n])) if len(a2) > 0 else 0
    return {
        "pos_loss": _entry(pos_loss, (a1, p), "pos_pair"),
        "neg_loss": _entry(neg_loss, (a2, n), "neg_pair"),
    }


def contrastive_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    pos_margin=0, neg_margin=1, distance=None, reducer=None,
):
    return _run_loss(
        contrastive_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=LpDistance(p=2) if distance is None else distance, reducer=reducer,
        default_reducer=AvgNonZeroReducer, sub_loss_names=CONTRASTIVE_SUB_LOSSES,
        pos_margin=pos_margin, neg_margin=neg_margin,
    )


# =============================================================================== MultiSimilarity
def multi_similarity_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, alpha, beta, base, distance):
    """Per row i: (1/alpha) log(1 + sum_p exp(alpha*margin(s_ip, base)))
    + (1/beta) log(1 + sum_n exp(beta*margin(base, s_in))); rows without pairs give 0."""
    setup = pair_setup_masks(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, pos_mask, neg_mask = setup
    pos_term = (1.0 / alpha) * logsumexp(alpha * distance.margin(mat, base), keep_mask=pos_mask.bool(), add_one=True)
    neg_term = (1.0 / beta) * logsumexp(beta * distance.margin(base, mat), keep_mask=neg_mask.bool(), add_one=True)
    return {"loss": _entry(pos_term + neg_term, _rows(mat), "element")}


def multi_similarity_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    alpha=2, beta=50, base=0.5, distance=None, reducer=None,
):
    return _run_loss(
        multi_similarity_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=CosineSimilarity() if distance is None else distance, reducer=reducer, default_reducer=MeanReducer,
        alpha=alpha, beta=beta, base=base,
    )


# =============================================================================== LiftedStructure
def lifted_structure_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, neg_margin, pos_margin, distance):
    """Per positive pair (i, j): relu(logsumexp_{neg pairs anchored at i or j} margin(neg_margin,
    d_n) + margin(d_ij, pos_margin))^2 / 2. Negative pairs are matched by their anchor index
    equalling i or j (index values, as PML does, also when ref_emb is given)."""
    setup = pair_setup_both(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, (a1, p, a2, n) = setup
    pos_vals = mat[a1, p].unsqueeze(1)  # (P, 1)
    neg_vals = mat[a2, n]  # (N,)
    takes_neg = (a2.unsqueeze(0) == a1.unsqueeze(1)) | (a2.unsqueeze(0) == p.unsqueeze(1))  # (P, N)
    neg_vals = neg_vals * takes_neg.to(neg_vals.dtype)
    neg_part = logsumexp(distance.margin(neg_margin, neg_vals), keep_mask=takes_neg, add_one=False, dim=1)
    per_pair = torch.relu(neg_part + distance.margin(pos_vals, pos_margin)) ** 2 / 2
    return {"loss": _entry(per_pair, (a1, p), "pos_pair")}


def lifted_structure_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    neg_margin=1, pos_margin=0, distance=None, reducer=None,
):
    return _run_loss(
        lifted_structure_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=LpDistance(p=2) if distance is None else distance, reducer=reducer, default_reducer=MeanReducer,
        neg_margin=neg_margin, pos_margin=pos_margin,
    )


# =============================================================================== GeneralizedLifted
def generalized_lifted_structure_loss_dict(
    embeddings, labels, indices_tuple, ref_emb, ref_labels, *, neg_margin, pos_margin, distance
):
    """Per row: relu(log sum_p exp(margin(d_ip, pos_margin)) + log sum_n exp(margin(neg_margin,
    d_in))); a side without pairs contributes 0."""
    setup = pair_setup_masks(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, pos_mask, neg_mask = setup
    pos_part = logsumexp(distance.margin(mat, pos_margin), keep_mask=pos_mask.bool(), add_one=False)
    neg_part = logsumexp(distance.margin(neg_margin, mat), keep_mask=neg_mask.bool(), add_one=False)
    return {"loss": _entry(torch.relu(pos_part + neg_part), _rows(mat), "element")}


def generalized_lifted_structure_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    neg_margin=1, pos_margin=0, distance=None, reducer=None,
):
    return _run_loss(
        generalized_lifted_structure_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels),
        labels_required=False, distance=LpDistance(p=2) if distance is None else distance, reducer=reducer,
        default_reducer=MeanReducer, neg_margin=neg_margin, pos_margin=pos_margin,
    )


# =============================================================================== Circle
def circle_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, m, gamma, distance, op=None, on=None,
                     delta_p=None, delta_n=None):
    """Per row: softplus(logsumexp_p(-gamma relu(op-s_p) (s_p-delta_p)) + logsumexp_n(gamma
    relu(s_n-on) (s_n-delta_n))), the relu weights detached; rows lacking a positive or a negative
    give 0. op, on, delta_p, delta_n default to 1+m, -m, 1-m, m (PML's module sets them so)."""
    setup = pair_setup_masks(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, pos_mask, neg_mask = setup
    pos_b, neg_b = pos_mask.bool(), neg_mask.bool()
    op, on = 1 + m if op is None else op, -m if on is None else on
    delta_p, delta_n = 1 - m if delta_p is None else delta_p, m if delta_n is None else delta_n
    s_p, s_n = mat[pos_b], mat[neg_b]
    logits = torch.zeros_like(mat)
    logits[pos_b] = -gamma * torch.relu(op - s_p.detach()) * (s_p - delta_p)
    logits[neg_b] = gamma * torch.relu(s_n.detach() - on) * (s_n - delta_n)
    lse_pos = logsumexp(logits, keep_mask=pos_b, add_one=False, dim=1)
    lse_neg = logsumexp(logits, keep_mask=neg_b, add_one=False, dim=1)
    losses = F.softplus(lse_pos + lse_neg)
    complete = (pos_mask.sum(dim=1) != 0) & (neg_mask.sum(dim=1) != 0)  # (B,)
    losses = losses * complete.to(losses.dtype).unsqueeze(1)
    return {"loss": _entry(losses, _rows(mat), "element")}


def circle_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    m=0.4, gamma=80, distance=None, reducer=None,
):
    distance = CosineSimilarity() if distance is None else distance
    require_distance("CircleLoss", distance, "CosineSimilarity")
    return _run_loss(
        circle_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=distance, reducer=reducer, default_reducer=AvgNonZeroReducer, m=m, gamma=gamma,
    )
