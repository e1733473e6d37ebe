"""Functional embedding losses: one function per loss, keyword hyperparameters, PML semantics.

Each returns what the matching ``dmlkern.losses`` module returns (a 0-dim tensor, or the loss dict
with ``reducer=DoNothingReducer()``). ``distance`` and ``reducer`` default to the loss's own
defaults. Example::

    loss = multi_similarity_loss(embeddings, labels, alpha=2, beta=50, base=0.5)
"""

from ..reference import embedding_losses as _R

__all__ = [
    "contrastive_loss",
    "triplet_margin_loss",
    "margin_loss",
    "multi_similarity_loss",
    "lifted_structure_loss",
    "generalized_lifted_structure_loss",
    "n_pairs_loss",
    "ntxent_loss",
    "supcon_loss",
    "tuplet_margin_loss",
    "angular_loss",
    "nca_loss",
    "circle_loss",
]


def _common(ref_emb, ref_labels, indices_tuple, distance, reducer):
    return dict(ref_emb=ref_emb, ref_labels=ref_labels, indices_tuple=indices_tuple, distance=distance, reducer=reducer)


def contrastive_loss(
    embeddings, labels=None, *, pos_margin=0, neg_margin=1,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Pair loss: ``relu(d_ap - pos_margin)`` and ``relu(neg_margin - d_an)``, AvgNonZero each, summed."""
    return _R.contrastive_loss(
        embeddings, labels, pos_margin=pos_margin, neg_margin=neg_margin,
        **_common(ref_emb, ref_labels, indices_tuple, distance, reducer),
    )


def triplet_margin_loss(
    embeddings, labels=None, *, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all",
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """``relu(d_ap - d_an + margin)`` per triplet, AvgNonZero."""
    return _R.triplet_margin_loss(
        embeddings, labels, margin=margin, swap=swap, smooth_loss=smooth_loss,
        triplets_per_anchor=triplets_per_anchor, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer),
    )


def margin_loss(
    embeddings, labels=None, *, margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all", learn_beta=False,
    num_classes=None, ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Margin loss; ``beta`` a number or a tensor of shape (1,) or (num_classes,) (may require grad)."""
    return _R.margin_loss(
        embeddings, labels, margin=margin, nu=nu, beta=beta, triplets_per_anchor=triplets_per_anchor,
        learn_beta=learn_beta, num_classes=num_classes, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer),
    )


def multi_similarity_loss(
    embeddings, labels=None, *, alpha=2, beta=50, base=0.5,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Multi-similarity loss (cosine similarity, mean over rows)."""
    return _R.multi_similarity_loss(
        embeddings, labels, alpha=alpha, beta=beta, base=base,
        **_common(ref_emb, ref_labels, indices_tuple, distance, reducer),
    )


def lifted_structure_loss(
    embeddings, labels=None, *, neg_margin=1, pos_margin=0,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Lifted structure loss, averaged over positive pairs."""
    return _R.lifted_structure_loss(
        embeddings, labels, neg_margin=neg_margin, pos_margin=pos_margin,
        **_common(ref_emb, ref_labels, indices_tuple, distance, reducer),
    )


def generalized_lifted_structure_loss(
    embeddings, labels=None, *, neg_margin=1, pos_margin=0,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Generalized lifted structure loss, averaged over rows."""
    return _R.generalized_lifted_structure_loss(
        embeddings, labels, neg_margin=neg_margin, pos_margin=pos_margin,
        **_common(ref_emb, ref_labels, indices_tuple, distance, reducer),
    )


def n_pairs_loss(
    embeddings, labels=None, *, ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """N-pairs loss (labels required; ref_emb is not supported and raises ValueError, as in PML)."""
    return _R.n_pairs_loss(embeddings, labels, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer))


def ntxent_loss(
    embeddings, labels=None, *, temperature=0.07,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """NT-Xent, averaged over positive pairs."""
    return _R.ntxent_loss(
        embeddings, labels, temperature=temperature, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer)
    )


def supcon_loss(
    embeddings, labels=None, *, temperature=0.1,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Supervised contrastive loss, AvgNonZero over anchors."""
    return _R.supcon_loss(
        embeddings, labels, temperature=temperature, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer)
    )


def tuplet_margin_loss(
    embeddings, labels=None, *, margin=5.73, scale=64,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Tuplet margin loss; ``margin`` in degrees."""
    return _R.tuplet_margin_loss(
        embeddings, labels, margin=margin, scale=scale, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer)
    )


def angular_loss(
    embeddings, labels=None, *, alpha=40,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Angular loss; ``alpha`` in degrees; labels required."""
    return _R.angular_loss(
        embeddings, labels, alpha=alpha, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer)
    )


def nca_loss(
    embeddings, labels=None, *, softmax_scale=1,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """NCA loss (squared normalised Euclidean by default); labels required."""
    return _R.nca_loss(
        embeddings, labels, softmax_scale=softmax_scale, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer)
    )


def circle_loss(
    embeddings, labels=None, *, m=0.4, gamma=80,
    ref_emb=None, ref_labels=None, indices_tuple=None, distance=None, reducer=None,
):
    """Circle loss (cosine similarity), AvgNonZero over rows."""
    return _R.circle_loss(
        embeddings, labels, m=m, gamma=gamma, **_common(ref_emb, ref_labels, indices_tuple, distance, reducer)
    )
