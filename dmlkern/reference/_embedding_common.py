"""Helpers shared by the reference embedding losses (``pair_losses``, ``tuple_losses``,
``softmax_losses``): PML's loss-dict entries, the GenericPairLoss front half, the
distance-type check and the one body of every public ``<name>_loss`` function."""

import torch

from .._validation import InvalidInputError, prepare_inputs
from ..reducers import resolve_reducer
from .indices import convert_to_pairs


def _zero_entry():
    """PML's ``zero_loss()``: reduces to ``torch.sum(embeddings * 0)``."""
    return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}


def _zeros(names=("loss",)):
    return {k: _zero_entry() for k in names}


def _entry(losses, indices, reduction_type, **extra):
    d = {"losses": losses, "indices": indices, "reduction_type": reduction_type}
    d.update(extra)
    return d


def _rows(x):
    return torch.arange(x.shape[0], device=x.device)


def _reduce(loss_dict, reducer, default_factory, sub_loss_names, embeddings, labels):
    red = resolve_reducer(reducer, sub_loss_names, default_factory)
    return red(loss_dict, embeddings, labels)


def _run_loss(
    dict_fn, inputs, *, labels_required, distance, reducer, default_reducer, sub_loss_names=None, **params
):
    """The body of a public ``<name>_loss``: prepare ``inputs`` (embeddings, labels,
    indices_tuple, ref_emb, ref_labels), compute ``dict_fn``'s loss dict with ``distance`` and
    ``params``, and reduce it with ``reducer`` (or ``default_reducer``)."""
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(*inputs, labels_required=labels_required)
    d = dict_fn(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance=distance, **params)
    names = ["loss"] if sub_loss_names is None else sub_loss_names
    return _reduce(d, reducer, default_reducer, names, embeddings, labels)


def _class_names(obj):
    return {c.__name__ for c in type(obj).__mro__}


def require_distance(loss_name, distance, class_name, **attrs):
    """Raise unless ``distance`` is a ``class_name`` (ours or PML's) with the given attributes."""
    ok = class_name in _class_names(distance) and all(getattr(distance, k, None) == v for k, v in attrs.items())
    if not ok:
        want = class_name + ("(" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + ")" if attrs else "")
        raise InvalidInputError(f"{loss_name} requires the distance metric to be {want}, got {distance!r}")


def pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance):
    """PML's GenericPairLoss front half: pairs from the tuple (or all pairs from labels).

    Returns None when every index tensor has at most one entry (PML's ``len <= 1``
    short-circuit: the loss is then zero, even for one valid positive and one valid negative
    pair); otherwise ``(mat, (a1, p, a2, n))``.
    """
    pairs = convert_to_pairs(indices_tuple, labels, ref_labels)
    if all(len(x) <= 1 for x in pairs):
        return None
    return distance(embeddings, ref_emb), pairs


def pair_masks(mat, pairs):
    """0/1 masks (dtype of ``mat``) of the positive and negative pairs; duplicates collapse."""
    a1, p, a2, n = pairs
    pos_mask = torch.zeros_like(mat)
    neg_mask = torch.zeros_like(mat)
    pos_mask[a1, p] = 1
    neg_mask[a2, n] = 1
    if torch.any((pos_mask != 0) & (neg_mask != 0)):
        raise InvalidInputError("indices_tuple: each pair should be either positive or negative, not both")
    return pos_mask, neg_mask


def pair_setup_both(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance):
    """``pair_setup``, also None unless there is at least one positive and one negative pair."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return None
    _, (a1, _, a2, _) = setup
    if len(a1) == 0 or len(a2) == 0:
        return None
    return setup


def pair_setup_masks(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance):
    """``pair_setup`` then ``pair_masks``: None, or ``(mat, pos_mask, neg_mask)``."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return None
    mat, pairs = setup
    return (mat, *pair_masks(mat, pairs))


def as_similarity(mat, distance):
    """``mat`` for a similarity, ``-mat`` for a distance."""
    return mat if distance.is_inverted else -mat
