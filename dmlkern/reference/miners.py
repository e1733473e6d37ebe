"""Readable reference implementations of the miners (PML 2.9.0 semantics).

Every function works on plain tensors and returns index tuples in PML's format:
triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)`` (1-D int64 tensors; ``a``/``a1``/``a2`` index
the query batch, ``p``/``n`` the reference batch). ``mat`` is the (B, R) output of a distance
module and ``is_inverted`` says whether it is a similarity (larger = closer).

``labels``/``ref_labels`` keep PML's identity rule: the trivial pair (i, i) is excluded from the
positives only when ``ref_labels is labels`` (or ``ref_labels is None``).

Compared with PML, the all-triplet miners (TripletMarginMiner, AngularMiner) never build the
(B, R, R) triplet tensor: they work on blocks of anchors (TripletMarginMiner: each anchor's
positives against every reference row, (B, P, R) values, P the most positives of any anchor), so
the extra memory is bounded by ``_TRIPLET_BLOCK`` elements (and by a sixteenth of B R R, where
PML's one byte per triplet is small) plus the returned indices. The returned triplets and their
order are the same as PML's (sorted by anchor, then positive, then negative).
"""

import math

import torch

from .indices import (
    IndexColumns,
    _triplets_from_masks,
    get_all_pairs_indices,
    get_matches_and_diffs,
    get_random_triplet_indices,
    neg_inf,
    pos_inf,
    positive_slots,
)

__all__ = [
    "triplet_margin_miner",
    "angular_miner",
    "batch_easy_hard_miner",
    "batch_hard_miner",
    "distance_weighted_miner",
    "hdc_miner",
    "multi_similarity_miner",
    "pair_margin_miner",
    "maximum_loss_miner",
]

# Upper bound on (anchors in a block) * R * R, the size of one block's triplet tensor.
_TRIPLET_BLOCK = 1 << 22


def _empty(device, n):
    e = torch.empty(0, dtype=torch.long, device=device)
    return tuple(e.clone() for _ in range(n))


def _anchor_blocks(num_anchors, num_ref, share=16, width=None):
    """Blocks of anchors of at most _TRIPLET_BLOCK triplet values (an anchor's: width x R, width
    R by default), and at most a `share`-th of the B R R bytes of PML's triplet mask: a block's
    ~10 bytes per value (its t, masks) then stay within what PML holds, at any size."""
    per_anchor = max(1, (num_ref if width is None else width) * num_ref)
    step = max(1, min(_TRIPLET_BLOCK, num_anchors * num_ref * num_ref // share) // per_anchor)
    for start in range(0, num_anchors, step):
        yield start, min(num_anchors, start + step)


# ----------------------------------------------------------------------------- TripletMarginMiner
def triplet_margin_miner(mat, labels, ref_labels, margin=0.2, type_of_triplets="all", is_inverted=False):
    """Triplets selected by ``t = d_an - d_ap`` (similarities: ``t = s_ap - s_an``).

    * ``"all"``: ``t <= margin`` (every triplet violating the margin);
    * ``"hard"``: ``t <= margin`` and ``t <= 0``;
    * ``"semihard"``: ``0 < t <= margin``;
    * ``"easy"``: ``t > margin``.

    Any other ``type_of_triplets`` string behaves like ``"all"`` (as in PML).
    """
    matches, diffs = get_matches_and_diffs(labels, ref_labels)
    pos, neg = matches.bool(), diffs.bool()
    # Each anchor's positives only, as PML's per-anchor loop does past 2^31 triplet values: a row
    # of slots holding its positive columns in ascending order (then padding), so t is
    # (anchors, slots, R) rather than (anchors, R, R) and the triplets come out in PML's order.
    order, valid = positive_slots(pos)
    slots = order.shape[1]
    if slots == 0 or mat.shape[1] == 0:
        return _empty(mat.device, 3)
    A, P, N = [], [], []
    buffers = None
    for s, e in _anchor_blocks(mat.shape[0], mat.shape[1], share=32, width=slots):
        cols, ok = order[s:e], valid[s:e]
        d_ap = mat[s:e].gather(1, cols).unsqueeze(2)  # [a, slot, 1]
        d_an = mat[s:e].unsqueeze(1)  # [a, 1, n]
        if buffers is None:
            # One set of block buffers for every block: a block's temporaries allocated and freed
            # anew each time would, under glibc's default allocator, stay pinned in the heap by
            # the triplets kept between blocks (3.6 GiB at N=1024 for 89 MiB of triplets).
            t_all = mat.new_empty(e - s, slots, mat.shape[1])
            buffers = t_all, torch.empty(t_all.shape, dtype=torch.bool, device=mat.device), torch.empty_like(
                t_all, dtype=torch.bool)
        t, keep, also = (b[: e - s] for b in buffers)
        torch.sub(d_ap, d_an, out=t) if is_inverted else torch.sub(d_an, d_ap, out=t)
        if type_of_triplets == "easy":
            torch.gt(t, margin, out=keep)
        else:
            torch.le(t, margin, out=keep)
            if type_of_triplets == "hard":
                keep &= torch.le(t, 0, out=also)
            elif type_of_triplets == "semihard":
                keep &= torch.gt(t, 0, out=also)
        keep &= ok.unsqueeze(2)
        keep &= neg[s:e].unsqueeze(1)
        a, slot, n = torch.where(keep)
        A.append(a + s)
        P.append(cols[a, slot])
        N.append(n)
    return torch.cat(A), torch.cat(P), torch.cat(N)


# ----------------------------------------------------------------------------- AngularMiner
def angular_miner(embeddings, labels, ref_emb, ref_labels, angle, pairwise_distance):
    """Triplets whose angle at the negative exceeds ``angle`` (radians):

        atan( ||x_a - x_p|| / (2 * ||x_n - (x_a + x_p) / 2||) ) > angle

    on the **raw** embeddings (``pairwise_distance`` is the distance's row-wise function, which
    does not normalise; PML behaves the same).
    """
    matches, diffs = get_matches_and_diffs(labels, ref_labels)
    pos, neg = matches.bool(), diffs.bool()
    out = IndexColumns(3, embeddings.device)
    for s, e in _anchor_blocks(pos.shape[0], pos.shape[1]):
        a, p, n = _triplets_from_masks(pos[s:e], neg[s:e])
        if a.numel() == 0:
            continue
        a = a + s
        xa, xp, xn = embeddings[a], ref_emb[p], ref_emb[n]
        centers = (xa + xp) / 2
        ap = pairwise_distance(xa, xp)
        nc = pairwise_distance(xn, centers)
        keep = torch.atan(ap / (2 * nc)) > angle
        out.add(a[keep], p[keep], n[keep])
    return out.result()


# ----------------------------------------------------------------------------- BatchEasyHardMiner
HARD, SEMIHARD, EASY, ALL = "hard", "semihard", "easy", "all"


def _pick_per_row(mat, candidates, take_min, thresholds=None, val_range=None):
    """Per row, the min (``take_min``) or max of ``mat`` over ``candidates``.

    ``thresholds`` (B,): semihard constraint; a candidate must be strictly beyond the row's
    threshold (``> thr`` when taking the min, ``< thr`` when taking the max).
    ``val_range`` (lo, hi): candidates must satisfy ``lo <= mat <= hi``.
    As PML, a candidate is dropped where the opposite comparison holds, so a NaN value (or a NaN
    threshold) drops nothing, and the min / max then gives the NaN.
    Returns ((values, column indices), row_has_candidate).
    """
    valid = candidates.clone()
    if thresholds is not None:
        thr = thresholds.unsqueeze(1)
        valid &= ~((mat <= thr) if take_min else (mat >= thr))
    if val_range is not None:
        valid &= ~((mat > val_range[1]) | (mat < val_range[0]))
    fill = pos_inf(mat.dtype) if take_min else neg_inf(mat.dtype)
    filled = torch.where(valid, mat, torch.full_like(mat, fill))
    best = torch.min(filled, dim=1) if take_min else torch.max(filled, dim=1)
    return best, valid.any(dim=1)


def batch_easy_hard_miner(
    mat,
    labels,
    ref_labels,
    pos_strategy=EASY,
    neg_strategy=SEMIHARD,
    allowed_pos_range=None,
    allowed_neg_range=None,
    is_inverted=False,
):
    """At most one positive and one negative per anchor (PML's BatchEasyHardMiner).

    * positive: ``hard`` = farthest, ``easy`` = closest, ``semihard`` = farthest one that is
      closer than the chosen negative;
    * negative: ``hard`` = closest, ``easy`` = farthest, ``semihard`` = closest one that is
      farther than the chosen positive;
    * ``all``: every pair on that side.

    Returns pairs ``(a, p, a, n)`` keeping only anchors with both sides (when neither side is
    ``all``); a side set to ``all`` returns all its pairs and the other side's per-anchor picks.
    Optional ``allowed_*_range=(lo, hi)`` restricts the candidate values (inclusive).
    """
    if mat.numel() == 0:  # an empty batch or reference set: no pair (PML fails in max/min here)
        return _empty(mat.device, 4)
    a1, p, a2, n = get_all_pairs_indices(labels, ref_labels)
    pos_cand = torch.zeros_like(mat, dtype=torch.bool)
    pos_cand[a1, p] = True
    neg_cand = torch.zeros_like(mat, dtype=torch.bool)
    neg_cand[a2, n] = True

    # "closest" is the min of a distance and the max of a similarity.
    def closest_is_min():
        return not is_inverted

    pos_take_min = closest_is_min() if pos_strategy == EASY else not closest_is_min()
    neg_take_min = closest_is_min() if neg_strategy in (HARD, SEMIHARD) else not closest_is_min()

    def positives(thr=None):
        return _pick_per_row(mat, pos_cand, pos_take_min, thr, allowed_pos_range)

    def negatives(thr=None):
        return _pick_per_row(mat, neg_cand, neg_take_min, thr, allowed_neg_range)

    if pos_strategy == SEMIHARD and neg_strategy != ALL:
        (neg_val, neg_idx), neg_ok = negatives()
        (pos_val, pos_idx), pos_ok = positives(neg_val)
    elif neg_strategy == SEMIHARD and pos_strategy != ALL:
        (pos_val, pos_idx), pos_ok = positives()
        (neg_val, neg_idx), neg_ok = negatives(pos_val)
    else:
        if pos_strategy != ALL:
            (pos_val, pos_idx), pos_ok = positives()
        if neg_strategy != ALL:
            (neg_val, neg_idx), neg_ok = negatives()

    rows = torch.arange(mat.shape[0], device=mat.device)
    if pos_strategy != ALL and neg_strategy != ALL:
        keep = pos_ok & neg_ok
        a = rows[keep]
        return a, pos_idx[keep], a, neg_idx[keep]
    if pos_strategy == ALL and neg_strategy != ALL:
        return a1, p, rows[neg_ok], neg_idx[neg_ok]
    if pos_strategy != ALL and neg_strategy == ALL:
        return rows[pos_ok], pos_idx[pos_ok], a2, n
    return a1, p, a2, n


def batch_hard_miner(mat, labels, ref_labels, is_inverted=False):
    """Per anchor: farthest positive and closest negative, as triplets ``(a, p, n)``."""
    a, p, _, n = batch_easy_hard_miner(mat, labels, ref_labels, HARD, HARD, is_inverted=is_inverted)
    return a, p, n


# ----------------------------------------------------------------------------- DistanceWeightedMiner
def distance_weighted_miner(mat, labels, ref_labels, embedding_dim, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """Random triplets whose negatives are drawn with probability proportional to
    ``1 / q(d)``, the inverse density of distances between points on the unit sphere in
    ``embedding_dim`` dimensions (Wu et al. 2017):

        log w = (2 - D) log d - ((D - 3) / 2) log(1 - d^2 / 4),   d = max(dist, cutoff)

    Same-class entries and ``dist >= nonzero_loss_cutoff`` get weight 0 (as do inf/nan weights);
    each row is normalised. Positives: per anchor, as many draws (with replacement) as the class
    size; see ``get_random_triplet_indices``. ``mat`` is the normalised Euclidean distance.
    """
    D = float(embedding_dim)
    ref_for_mask = labels if ref_labels is None else ref_labels
    d = torch.clamp(mat, min=cutoff)
    log_w = (2.0 - D) * torch.log(d) - ((D - 3) / 2) * torch.log(1.0 - 0.25 * (d**2.0))
    bad = torch.isinf(log_w) | torch.isnan(log_w)
    not_same = torch.ones_like(log_w)
    not_same[labels.unsqueeze(1) == ref_for_mask.unsqueeze(0)] = 0
    log_w = log_w * not_same
    finite = log_w[~bad]
    if finite.numel() == 0:
        return _empty(mat.device, 3)
    w = torch.exp(log_w - torch.max(finite))  # subtract the max for stability
    w = w * not_same * (d < nonzero_loss_cutoff).to(w.dtype)
    w[bad] = 0
    w = w / torch.sum(w, dim=1, keepdim=True)
    return get_random_triplet_indices(labels, ref_labels=ref_labels, weights=w)


# ----------------------------------------------------------------------------- HDCMiner
def hdc_miner(mat, a1, p, a2, n, filter_percentage=0.5, is_inverted=False):
    """Keep the ``ceil(filter_percentage * #pairs)`` hardest positive pairs (largest distance)
    and negative pairs (smallest distance), chosen over the whole batch (not per anchor),
    ordered hardest first."""
    out = []
    for anchor, other, positive in ((a1, p, True), (a2, n, False)):
        if len(anchor) > 0:
            vals = mat[anchor, other]
            k = int(math.ceil(filter_percentage * len(vals)))
            largest = positive != is_inverted  # far positives / close negatives
            _, idx = torch.topk(vals, k=k, largest=largest)
            anchor, other = anchor[idx], other[idx]
        out += [anchor, other]
    return tuple(out)


# ----------------------------------------------------------------------------- MultiSimilarityMiner
def multi_similarity_miner(mat, labels, ref_labels, epsilon=0.1, is_inverted=True, same_embeddings=False):
    """Pair mining of Wang et al. 2019 (similarity form; distances mirrored):

    * keep positive (a, p) if ``s_ap - eps < max_n s_an`` (the hardest negative of a);
    * keep negative (a, n) if ``s_an + eps > min_p s_ap`` (the hardest positive of a).

    Returns nothing when the batch has no positive or no negative pair. Within a row, pairs come
    in ascending order of ``mat`` (as PML's sort-based code returns them).
    ``same_embeddings``: query and reference are the same tensor; the diagonal is then ignored.
    ``mat`` is overwritten (the negatives' sorting copy), as PML overwrites its distance matrix:
    one copy of it, PML's peak memory; pass a fresh matrix.
    """
    a1, p, a2, n = get_all_pairs_indices(labels, ref_labels)
    if len(a1) == 0 or len(a2) == 0:
        return _empty(labels.device, 4)
    # PML masks out the *other* side's pairs; whatever is left (e.g. the diagonal when ref_emb
    # is a different tensor but ref_labels is labels) stays a candidate, as in PML.
    pos_ignore = pos_inf(mat.dtype) if is_inverted else neg_inf(mat.dtype)
    neg_ignore = neg_inf(mat.dtype) if is_inverted else pos_inf(mat.dtype)
    for_pos = mat.clone()
    for_pos[a2, n] = pos_ignore
    for_neg = mat
    for_neg[a1, p] = neg_ignore
    del a1, p, a2, n
    if same_embeddings:
        for_pos.fill_diagonal_(pos_ignore)
        for_neg.fill_diagonal_(neg_ignore)
    pos_vals, pos_order = torch.sort(for_pos, dim=1)
    neg_vals, neg_order = torch.sort(for_neg, dim=1)
    # (each mask freed once its pairs are listed, as in PML)
    if is_inverted:
        hardest_neg = neg_vals[:, -1:]  # largest negative similarity
        hardest_pos = pos_vals[:, :1]  # smallest positive similarity
        pr, pc = torch.where(pos_vals - epsilon < hardest_neg)
        nr, nc = torch.where(neg_vals + epsilon > hardest_pos)
    else:
        hardest_neg = neg_vals[:, :1]  # smallest negative distance
        hardest_pos = pos_vals[:, -1:]  # largest positive distance
        pr, pc = torch.where(pos_vals + epsilon > hardest_neg)
        nr, nc = torch.where(neg_vals - epsilon < hardest_pos)
    return pr, pos_order[pr, pc], nr, neg_order[nr, nc]


# ----------------------------------------------------------------------------- PairMarginMiner
def pair_margin_miner(mat, labels, ref_labels, pos_margin=0.2, neg_margin=0.8, is_inverted=False):
    """Positive pairs with ``d > pos_margin`` and negative pairs with ``d < neg_margin``
    (similarities: ``s < pos_margin`` and ``s > neg_margin``)."""
    a1, p, a2, n = get_all_pairs_indices(labels, ref_labels)
    pv, nv = mat[a1, p], mat[a2, n]
    if is_inverted:
        pk, nk = pv < pos_margin, nv > neg_margin
    else:
        pk, nk = pv > pos_margin, nv < neg_margin
    return a1[pk], p[pk], a2[nk], n[nk]


# ----------------------------------------------------------------------------- MaximumLossMiner
def _subset(n, size, device, generator=None):
    """``size`` distinct positions out of ``n``, uniformly at random, in increasing order."""
    perm = torch.randperm(n, generator=generator)[:size]
    return torch.sort(perm).values.to(device)


def subset_size(n, subset_fraction):
    """Number of tuples kept in a trial: ``ceil(subset_fraction * n)``, at least 1 (0 if n == 0)."""
    if n == 0:
        return 0
    return min(n, max(1, int(math.ceil(subset_fraction * n))))


def maximum_loss_miner(loss_fn, candidates, num_trials=5, subset_fraction=0.5, generator=None):
    """Return the random subset of ``candidates`` on which ``loss_fn`` is largest.

    ``candidates`` is a triplet tuple ``(a, p, n)`` or a pair tuple ``(a1, p, a2, n)``.
    Each of the ``num_trials`` trials draws, uniformly without replacement,

    * triplets: ``ceil(subset_fraction * #triplets)`` triplets;
    * pairs: ``ceil(subset_fraction * #pos pairs)`` positive pairs and, independently,
      ``ceil(subset_fraction * #neg pairs)`` negative pairs

    (at least one of each kind that exists), keeping the candidates' order, and evaluates
    ``loss_fn(subset)`` (a float or 0-dim tensor). The subset with the largest loss wins; ties go
    to the earliest trial; NaN losses never win (if every trial is NaN, trial 0 is returned).
    Randomness comes from ``generator`` or the global torch RNG (CPU).
    """
    if len(candidates) not in (3, 4):
        raise ValueError("candidates must be a triplet or pair tuple")
    if num_trials < 1:
        raise ValueError("num_trials must be >= 1")
    device = candidates[0].device
    groups = [(0, 1, 2)] if len(candidates) == 3 else [(0, 1), (2, 3)]
    best, best_loss = None, None
    for _ in range(num_trials):
        subset = [None] * len(candidates)
        for g in groups:
            total = len(candidates[g[0]])
            pick = _subset(total, subset_size(total, subset_fraction), device, generator)
            for i in g:
                subset[i] = candidates[i][pick]
        subset = tuple(subset)
        value = loss_fn(subset)
        value = float(value.detach()) if torch.is_tensor(value) else float(value)
        if best is None or (not math.isnan(value) and (math.isnan(best_loss) or value > best_loss)):
            best, best_loss = subset, value
    return best

