"""PML's statistics on the fused paths, from what the fused path has: O(N) label counts and
O(N D) row norms, never an N x M matrix. Nothing is recorded while torch.compile traces (the
statistics are Python numbers: recording them would break the graph)."""

import torch

from ._common import decline


def _tracing():
    return torch.compiler.is_compiling()


def _more_than_one_pair(labels, ref_labels):
    """PML's GenericPairLoss calls its distance unless both the positive and the negative pair
    lists have at most one entry; the counts from the label counts, in O(N + M)."""
    classes, inverse = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
    counts = torch.zeros(2, len(classes), dtype=torch.float64, device=labels.device)
    counts[0].index_add_(0, inverse[: len(labels)], torch.ones(len(labels), dtype=torch.float64, device=labels.device))
    counts[1].index_add_(0, inverse[len(labels):], torch.ones(len(ref_labels), dtype=torch.float64, device=labels.device))
    same = float((counts[0] * counts[1]).sum())
    num_pos = same - (len(labels) if ref_labels is labels else 0)
    num_neg = len(labels) * len(ref_labels) - same
    return num_pos > 1 or num_neg > 1


def pair_loss(fused_fn, module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Runs a GenericPairLoss's fused epilogue and records its distance's statistics where PML's
    loss would have called the distance. With mined pairs (a lazy indices_tuple) and a distance
    collecting statistics, returns None: the reference runs (the pair counts need the pairs)."""
    recording = module.distance.collect_stats and not _tracing()
    if recording and indices_tuple is not None:
        return decline(module, "a distance with collect_stats and a miner's pairs (the statistics need the pairs)")
    out = fused_fn(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    if recording and out is not None and labels is not None and _more_than_one_pair(labels, ref_labels):
        module.distance.record_stats(embeddings, ref_emb)
    return out


def record_distance(distance, query, ref):
    """The distance's statistics for a call ``distance(query, ref)`` (O((B + R) D))."""
    if distance.collect_stats and not _tracing():
        distance.record_stats(query, ref)


def n_pairs(module, embeddings, anchors=None, positives=None, order=None, valid=None):
    """NPairsLoss: ``num_pairs`` (PML records it on every call: the number of anchors) and the
    distance's statistics over the anchors and positives. Static-shape form: the stable label
    order and the mask of valid sorted positions (the anchors there, their positives next)."""
    if _tracing():
        return
    if anchors is None:  # static shapes: the count as a tensor (no host read, traceable)
        module.num_pairs = valid.sum()
        if not module.distance.collect_stats:
            return
        idx = torch.nonzero(valid).squeeze(1)
        anchors, positives = order[idx], order[idx + 1]
    module.num_pairs = len(anchors)
    if len(anchors) > 0:
        record_distance(module.distance, embeddings[anchors], embeddings[positives])


def already_reduced_size(reducer, count):
    """``{"losses_size": count}`` (a tensor) for an already-reduced fused value standing for ``count``
    entries (the reducer records it as PML's reducer would on the list), when the reducer
    collects statistics; else nothing."""
    if getattr(reducer, "collect_stats", False) and not _tracing():
        return {"losses_size": count.clamp(min=1)}  # none: PML reduces the zero loss, size 1
    return {}
