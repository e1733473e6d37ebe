"""TripletMarginLoss and MarginLoss on listed triplets (an explicit indices_tuple: a miner's
(a, p, n), or PML's pairs (a1, p, a2, n) turned into triplets as PML's convert_to_triplets does)
without the N x M distance matrix the reference builds to read 2T entries of it.

Per triplet the reference's maths: d_ap, d_an (and d_pn with `swap`, p read as a query row as PML
does) from the dots of gathered rows (`_common.engine_rows`: unit, raw or augmented), <x_a, y_p> in
chunks (`pair_lists.pair_dots`, O(T) memory besides the rows), d = sqrt(max(2 - 2s, 0)) for the
Euclidean distances (no gradient at d = 0, as the blocked path), 2 - 2s squared, or s itself for
the similarities (`listed_pairs.distance_values`); then the loss's own terms. The result is
the reference's per-triplet loss dict, so every reducer works. Work and memory O(T · D); values
and gradients don't depend on the CPU thread count (index_select gathers, whose backward
index_add is serial on the CPU).

With `triplets_per_anchor=k` and no indices_tuple, PML draws k random triplets per anchor;
`random_triplets` draws the very same ones (the same torch.randint calls in the same order) in
O(N k) memory, and `on_random_triplets` runs the listed path on them."""

import torch

from .._tracing import static_shapes
from ..reference.tuple_losses import margin_anchor_beta, margin_triplets_dict
from ._common import decline, engine_distance, engine_rows_reason, reference_backend_reason, small_problem
from ._epilogue import ZERO_LOSS
from .listed_pairs import DENSE, DENSE_FRACTION, distance_values, is_dense, listed_rows, materialized
from .pair_lists import positive_pairs
from .triplet import _term

BACKEND = "listed"  # what `last_backend` says: the listed triplets, gathered rows, no N x M matrix
DENSE_RANDOM = ("triplets_per_anchor=k drawing over 1/16 of all pairs (the reference's matrix is cheaper than "
                "listing them)")


def pairs_to_triplets(a1, p, a2, n):
    """PML's convert_to_triplets for pairs: every (a1[i], p[i], n[j]) with a1[i] == a2[j],
    ordered by (i, j), in O(pairs + triplets) instead of PML's len(a1) x len(a2) match matrix."""
    i, j = positive_pairs(a1, a2, exclude_diag=False)
    return a1.index_select(0, i), p.index_select(0, i), n.index_select(0, j)


def _listed_reason(module, embeddings, ref_emb):
    """Why the listed path can't take this call whatever its triplets (a str), or None."""
    distance = module.distance
    if reason := reference_backend_reason(module.backend, embeddings.device):  # torch ops only: any dtype, device
        return reason
    if engine_distance(distance) is None:
        return (f"distance {type(distance).__name__} with listed triplets (the listed path: "
                "LpDistance(p=2, power 1 or 2), CosineSimilarity, DotProductSimilarity)")
    if static_shapes():
        return "torch.compile (the listed triplet path has data-dependent shapes)"
    return small_problem(embeddings, ref_emb) or engine_rows_reason(distance, embeddings, ref_emb)


def listed_triplets(module, embeddings, indices_tuple, ref_emb):
    """The triplets (a, p, n) of a listed-triplet call, with the checks both losses share;
    ZERO_LOSS for no triplet, or None after `decline` (the reference runs)."""
    reason = _listed_reason(module, embeddings, ref_emb)
    if reason is not None:
        return decline(module, reason)
    indices_tuple = materialized(indices_tuple, embeddings.device)
    if len(indices_tuple) == 4:
        indices_tuple = pairs_to_triplets(*(t.long() for t in indices_tuple))
    a, p, n = (t.long() for t in indices_tuple)
    if len(a) == 0:
        return ZERO_LOSS  # the reference's zeros, before it computes any distance
    if is_dense(2 * len(a), embeddings, ref_emb):  # two gathered dot products per triplet
        return decline(module, DENSE)
    return a, p, n


def on_random_triplets(module, embeddings, labels, ref_emb, ref_labels, listed):
    """triplets_per_anchor=k without an indices_tuple: `listed(triplets)` on PML's random triplets
    (`random_triplets`), or None after `decline`, before any draw (the reference then draws them
    itself, consuming the RNG as PML does); should the listed path decline these triplets, the
    reference's loss dict on them (backend "reference")."""
    reason = _listed_reason(module, embeddings, ref_emb)
    if reason is not None:
        return decline(module, reason)
    max_triplets = int(DENSE_FRACTION * embeddings.shape[0] * ref_emb.shape[0]) // 2
    triplets = random_triplets(labels, ref_labels, module.triplets_per_anchor, max_triplets)
    if triplets is None:
        return decline(module, DENSE_RANDOM)
    out = listed(triplets)
    if out is None:  # (swap with ref_emb's indices past the rows) the reference, on the triplets drawn
        return module.compute_loss(embeddings, labels, triplets, ref_emb, ref_labels), "reference"
    return out


def listed_triplet_margin(module, embeddings, indices_tuple, ref_emb):
    """(loss_dict, "listed"), ZERO_LOSS for no triplet, or None (the reference) after `decline`."""
    triplets = listed_triplets(module, embeddings, indices_tuple, ref_emb)
    if triplets is None or triplets is ZERO_LOSS:
        return triplets
    a, p, n = triplets
    if module.swap and int(p.max()) >= embeddings.shape[0]:
        return decline(module, "swap=True with a positive index past the embeddings' rows (the reference raises)")
    distance = module.distance
    distance.record_stats(embeddings, ref_emb)  # where the reference calls the distance (no-op without stats)
    # (under torch.autocast: the rows in the autocast dtype, their products in fp32, as the blocked path)
    x, y = listed_rows(embeddings, ref_emb, distance)
    d_ap, d_an = distance_values(x, y, a, p, distance), distance_values(x, y, a, n, distance)
    if module.swap:
        # PML: mat[p, n], p as a query row (its rows of x: the augmented rows differ by side)
        d_an = distance.smallest_dist(d_an, distance_values(x, y, p, n, distance))
    violation = distance.margin(d_ap, d_an) + module.margin
    losses = _term(violation, bool(module.smooth_loss))  # softplus from exp / log1p: thread-count independent
    losses = losses.to(embeddings.dtype)  # fp16 / bf16: computed in fp32 from the widened rows
    return {"loss": {"losses": losses, "indices": (a, p, n), "reduction_type": "triplet"}}, BACKEND


def listed_margin(module, embeddings, labels, indices_tuple, ref_emb):
    """MarginLoss on listed triplets (duplicates kept, as PML): the reference's per-triplet dict
    (divisor, beta_reg_loss) from the listed distances, for any reducer; beta's gradient too."""
    triplets = listed_triplets(module, embeddings, indices_tuple, ref_emb)
    if triplets is None or triplets is ZERO_LOSS:
        return triplets
    a, p, n = triplets
    b = margin_anchor_beta(module.beta, labels, a, embeddings)
    x, y = listed_rows(embeddings, ref_emb, module.distance)
    d_ap = distance_values(x, y, a, p, module.distance).to(embeddings.dtype)
    d_an = distance_values(x, y, a, n, module.distance).to(embeddings.dtype)
    return margin_triplets_dict(d_ap, d_an, b, (a, p, n), margin=module.margin, nu=module.nu, beta=module.beta,
                                learn_beta=module.learn_beta, distance=module.distance), BACKEND


def random_triplets(labels, ref_labels, t_per_anchor, max_triplets=None):
    """PML's get_random_triplet_indices(labels, ref_labels, t_per_anchor) without its per-class
    scans of the batch and its n_a x n_p positive candidates: the same triplets for the same torch
    seed. Per class (torch.unique order) PML draws k positive columns among the class's other
    members, then one negative column per triplet among the other classes' members; only these two
    torch.randint calls stay in the loop, the columns become row indices after it: the positive
    column c of anchor number r skips r itself (c + (c >= r)), the negative column j is the j-th
    index outside the class (j plus the class members q_i = p_i - i <= j, p its ascending
    indices). O(T + M log M) for T triplets. None, before any draw, when there would be more than
    max_triplets."""
    device = labels.device
    same_object = ref_labels is labels
    sorted_ref, ref_order = torch.sort(ref_labels, stable=True)
    classes = torch.unique(labels)
    ref_lo = torch.searchsorted(sorted_ref, classes)
    n_pos = torch.searchsorted(sorted_ref, classes, right=True) - ref_lo
    if same_object:
        anchor_order, anchor_lo, n_anchors = ref_order, ref_lo, n_pos
    else:
        sorted_labels, anchor_order = torch.sort(labels, stable=True)
        anchor_lo = torch.searchsorted(sorted_labels, classes)
        n_anchors = torch.searchsorted(sorted_labels, classes, right=True) - anchor_lo
    m = len(ref_labels)
    per_class = n_pos if t_per_anchor is None else torch.full_like(n_pos, t_per_anchor)  # triplets per anchor
    drawn = (n_pos >= (2 if same_object else 1)) & (m - n_pos >= 1)
    if max_triplets is not None and int((n_anchors * per_class * drawn).sum()) > max_triplets:
        return None
    taken = torch.nonzero(drawn).flatten()
    if len(taken) == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty.clone(), empty.clone()
    pos_cols, neg_cols = [], []
    for n_a, n_p, k in zip(*(t[taken].tolist() for t in (n_anchors, n_pos, per_class))):
        pos_cols.append(torch.randint(0, n_p - 1 if same_object else n_p, (n_a * k,)))
        neg_cols.append(torch.randint(0, m - n_p, (n_a * k,)))
    per_anchor = per_class[taken]
    counts = n_anchors[taken] * per_anchor
    cls = torch.repeat_interleave(torch.arange(len(taken), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    anchor_no = (torch.arange(len(cls), device=device) - first[cls]) // per_anchor[cls]
    pos_col = torch.cat(pos_cols).to(device)
    if same_object:
        pos_col += pos_col >= anchor_no
    class_ref_lo = ref_lo[taken][cls]  # each triplet's class's first position among the sorted reference labels
    a = anchor_order[anchor_lo[taken][cls] + anchor_no]
    p = ref_order[class_ref_lo + pos_col]
    # the negatives: each class's q = p_i - i is non-decreasing in [0, m); keyed by the class's
    # rank among the sorted reference labels, one searchsorted serves every class
    new_class = torch.cat([torch.ones_like(sorted_ref[:1], dtype=torch.bool), sorted_ref[1:] != sorted_ref[:-1]])
    ref_rank = torch.cumsum(new_class.long(), 0)
    positions = torch.arange(m, device=device)
    class_start = torch.cummax(torch.where(new_class, positions, 0), 0).values
    key = ref_rank * (m + 1) + ref_order - (positions - class_start)
    neg_col = torch.cat(neg_cols).to(device)
    query = ref_rank[class_ref_lo] * (m + 1) + neg_col
    n = neg_col + torch.searchsorted(key, query, right=True) - class_ref_lo
    return a, p, n
