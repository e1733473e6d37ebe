"""Index utilities with the names, argument lists and return formats of PML 2.9.0's
``pytorch_metric_learning.utils.loss_and_miner_utils`` (written from its definitions).

Tuple formats (all 1-D LongTensors indexing query rows / reference rows):

* pairs    ``(a1, p, a2, n)``: ``(a1[k], p[k])`` positive pairs, ``(a2[k], n[k])`` negative pairs;
* triplets ``(a, p, n)``.

PML quirks kept on purpose:

* the diagonal (i, i) is removed from the positives **only when ``ref_labels is labels``**
  (object identity, or ``ref_labels=None``); an equal-valued copy keeps the diagonal;
* ``convert_to_pairs`` turns a triplet tuple into ``(a, p, a, n)`` without removing
  duplicates (one positive pair per triplet);
* ``logsumexp(..., add_one=True)`` appends a zero logit, i.e. computes ``log(1 + sum exp)``,
  and rows whose ``keep_mask`` is all False give exactly 0.
"""

import math

import torch

from ..utils.common_functions import neg_inf, pos_inf, small_val  # noqa: F401 (PML's names here too)

__all__ = [
    "neg_inf",
    "pos_inf",
    "small_val",
    "logsumexp",
    "meshgrid_from_sizes",
    "get_matches_and_diffs",
    "get_all_pairs_indices",
    "convert_to_pairs",
    "convert_to_pos_pairs_with_unique_labels",
    "pos_pairs_from_tuple",
    "neg_pairs_from_tuple",
    "get_all_triplets_indices",
    "get_random_triplet_indices",
    "repeat_to_match_size",
    "matched_size_indices",
    "convert_to_triplets",
    "convert_to_weights",
    "remove_self_comparisons",
    "not_self_comparisons",
    "get_anchors",
]


def _empty_long(device):
    return torch.empty(0, dtype=torch.long, device=device)


def positive_slots(pos):
    """(cols, valid), each (B, P): the column of each row's j-th positive (ascending), P the most
    positives of any row of the block (valid marks the real ones)."""
    rows, cols = pos.nonzero(as_tuple=True)
    counts = pos.sum(dim=1)
    num_slots = int(counts.max()) if rows.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=pos.device) - starts[rows]
    slot_cols = torch.zeros(pos.shape[0], num_slots, dtype=torch.long, device=pos.device)
    valid = torch.zeros(pos.shape[0], num_slots, dtype=torch.bool, device=pos.device)
    slot_cols[rows, slot] = cols
    valid[rows, slot] = True
    return slot_cols, valid


class IndexColumns:
    """Index tuples gathered block by block into one buffer grown by half as it fills, instead of
    a list of each block's tensors joined at the end. Under glibc's default allocator, results
    kept between blocks pin the blocks' freed temporaries in the heap (after the first free of a
    large block, the mmap threshold rises to that size, so the next blocks' temporaries come from
    the heap, above the kept results), and the process grows by a block's temporaries for every
    block. One block's columns are kept as they are (no copy); during a growth it holds 2.5x what
    it has gathered (a list and its join: 2x)."""

    def __init__(self, width, device):
        self.width, self.device, self.first, self.buf, self.used = width, device, None, None, 0

    def add(self, *columns):
        k = columns[0].numel()
        if k == 0:
            return
        if self.first is None and self.buf is None:
            self.first, self.used = columns, k
            return
        if self.buf is None or self.used + k > self.buf.shape[1]:
            grown = torch.empty(self.width, 2 * self.used + k, dtype=torch.long, device=self.device)
            for row, old in zip(grown, self.first if self.buf is None else self.buf[:, :self.used]):
                row[:self.used] = old
            self.first, self.buf = None, grown
        for row, col in zip(self.buf, columns):
            row[self.used:self.used + k] = col
        self.used += k

    def result(self):
        """The columns: 1-D int64 tensors (views of the buffer, or the one block's own columns)."""
        if self.first is not None:
            return tuple(self.first)
        if self.buf is None:
            return tuple(_empty_long(self.device) for _ in range(self.width))
        return tuple(self.buf[:, :self.used].unbind(0))


# ----------------------------------------------------------------------------- logsumexp
def logsumexp(x, keep_mask=None, add_one=True, dim=1):
    """``log(sum_j exp(x_j))`` along ``dim`` (keepdim) over the entries where ``keep_mask``.

    ``add_one`` adds a zero logit (``log(1 + sum exp)``). Rows with an all-False mask give 0.
    ``x`` must be 2-D.
    """
    if keep_mask is not None:
        x = x.masked_fill(~keep_mask, neg_inf(x.dtype))
    if add_one:
        # x.size(dim - 1) is the other axis of a 2-D tensor (for dim=0 it wraps to -1)
        zero_col = torch.zeros(x.size(dim - 1), dtype=x.dtype, device=x.device).unsqueeze(dim)
        x = torch.cat([x, zero_col], dim=dim)
    out = torch.logsumexp(x, dim=dim, keepdim=True)
    if keep_mask is not None:
        out = out.masked_fill(~torch.any(keep_mask, dim=dim, keepdim=True), 0)
    return out


def meshgrid_from_sizes(x, y, dim=0):
    """Row/column index grids of shape (x.size(dim), y.size(dim))."""
    rows = torch.arange(x.size(dim), device=x.device)
    cols = torch.arange(y.size(dim), device=y.device)
    return torch.meshgrid(rows, cols, indexing="ij")


# ----------------------------------------------------------------------------- pairs
def get_matches_and_diffs(labels, ref_labels=None):
    """uint8 (B, R) masks: ``matches[i, j] = labels[i] == ref_labels[j]``, ``diffs = 1 - matches``.

    The diagonal of ``matches`` is zeroed only when ``ref_labels`` is None or *is* ``labels``.
    """
    same_object = ref_labels is None or ref_labels is labels
    if ref_labels is None:
        ref_labels = labels
    matches = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)).byte()
    diffs = matches ^ 1
    if same_object:
        matches.fill_diagonal_(0)
    return matches, diffs


def get_all_pairs_indices(labels, ref_labels=None):
    """All positive pairs and all negative pairs, each in row-major order."""
    matches, diffs = get_matches_and_diffs(labels, ref_labels)
    a1, p = torch.where(matches)
    a2, n = torch.where(diffs)
    return a1, p, a2, n


def convert_to_pairs(indices_tuple, labels, ref_labels=None):
    """None -> all pairs; 4-tuple -> unchanged; triplets (a, p, n) -> (a, p, a, n) (duplicates kept)."""
    if indices_tuple is None:
        return get_all_pairs_indices(labels, ref_labels)
    if len(indices_tuple) == 4:
        return indices_tuple
    a, p, n = indices_tuple
    return a, p, a, n


def convert_to_pos_pairs_with_unique_labels(indices_tuple, labels):
    """For each anchor label, the first positive pair (in tuple order) whose anchor has it."""
    a, p, _, _ = convert_to_pairs(indices_tuple, labels)
    if a.numel() == 0:
        return a, p
    # np.unique(labels[a], return_index=True)'s order (by label), in torch ops: they also run on
    # torch.func's wrapped tensors (torch.func.jvp), which have no storage for numpy to read.
    _, group = torch.unique(labels[a], return_inverse=True)
    first = torch.full((int(group.max()) + 1,), a.numel(), dtype=torch.long, device=a.device)
    first.scatter_reduce_(0, group, torch.arange(a.numel(), device=a.device), "amin")
    return a[first], p[first]


def pos_pairs_from_tuple(indices_tuple):
    return indices_tuple[:2]


def neg_pairs_from_tuple(indices_tuple):
    return indices_tuple[2:]


def get_anchors(indices_tuple):
    if len(indices_tuple) == 3:
        return indices_tuple[0]
    if len(indices_tuple) == 4:
        return torch.cat([indices_tuple[0], indices_tuple[2]], dim=0)
    raise ValueError("indices_tuple must have 3 or 4 elements")


# ----------------------------------------------------------------------------- triplets
def _triplets_from_masks(pos_mask, neg_mask):
    """All (a, p, n) with pos_mask[a, p] and neg_mask[a, n], sorted by (a, p, n).

    Same order as ``torch.where(pos_mask[:, :, None] & neg_mask[:, None, :])`` but it never
    materialises the (B, R, R) tensor: memory is O(B*R + #triplets).
    """
    device = pos_mask.device
    a_pos, p = torch.where(pos_mask)  # row-major: sorted by anchor, then positive
    a_neg, n = torch.where(neg_mask)
    negs_per_anchor = neg_mask.sum(dim=1, dtype=torch.long)
    if a_pos.numel() == 0 or n.numel() == 0:
        e = _empty_long(device)
        return e, e.clone(), e.clone()
    neg_start = torch.cumsum(negs_per_anchor, 0) - negs_per_anchor  # offset of each anchor's negatives
    reps = negs_per_anchor[a_pos]  # one block of triplets per positive pair
    total = int(reps.sum().item())
    if total == 0:
        e = _empty_long(device)
        return e, e.clone(), e.clone()
    a = a_pos.repeat_interleave(reps)
    pp = p.repeat_interleave(reps)
    block_start = torch.cumsum(reps, 0) - reps
    within = torch.arange(total, device=device) - block_start.repeat_interleave(reps)
    nn_ = n[neg_start[a] + within]
    return a, pp, nn_


def get_all_triplets_indices(labels, ref_labels=None):
    """Every (anchor, positive, negative) triplet, ordered by (a, p, n) like PML."""
    matches, diffs = get_matches_and_diffs(labels, ref_labels)
    return _triplets_from_masks(matches.bool(), diffs.bool())


def random_positives(pos_ref, n_a, k, same_object):
    """PML's draw of k positives per anchor of one class (its torch.randint call): (row, pos),
    row = each triplet's anchor number (0..n_a-1, k each), pos = a uniform pick among the class's
    reference items pos_ref (the anchor itself excluded when same_object)."""
    n_p = len(pos_ref)
    cand = pos_ref.expand(n_a, n_p)
    if same_object:
        cand = cand[~torch.eye(n_a, dtype=torch.bool, device=cand.device)].view(n_a, n_a - 1)
    col = torch.randint(0, cand.shape[1], (n_a * k,))
    row = torch.arange(n_a).repeat_interleave(k)
    return row, cand[row.to(cand.device), col.to(cand.device)]


def get_random_triplet_indices(labels, ref_labels=None, t_per_anchor=None, weights=None):
    """Random triplets, drawn class by class (classes in ``torch.unique(labels)`` order).

    For each class c: anchors are the queries of class c; each anchor gets ``k`` positives drawn
    uniformly with replacement among the reference items of class c (itself excluded when
    ``ref_labels is labels``), where ``k = t_per_anchor`` or the class size; each triplet gets one
    negative, uniform among the other-class reference items, or drawn by
    ``torch.multinomial(weights[a, negatives])`` when ``weights`` (B, R) is given (anchors whose
    weights are all zero are dropped). The global RNG is consumed in the same order as PML, so a
    fixed seed yields PML's triplets.
    """
    device = labels.device
    same_object = ref_labels is None or ref_labels is labels
    if ref_labels is None:
        ref_labels = labels
    A, P, N = [], [], []
    for c in torch.unique(labels):
        pos_ref = torch.where(ref_labels == c)[0]
        anchors = pos_ref if same_object else torch.where(labels == c)[0]
        neg_ref = torch.where(ref_labels != c)[0]
        n_a, n_p = len(anchors), len(pos_ref)
        if n_p < (2 if same_object else 1) or len(neg_ref) < 1:
            continue
        k = n_p if t_per_anchor is None else t_per_anchor
        count = n_a * k
        row, pos = random_positives(pos_ref, n_a, k, same_object)
        anc = anchors[row.to(anchors.device)]
        if weights is not None:
            w = weights[:, neg_ref][anc]
            keep = torch.where(w.sum(dim=1) > 0)[0]
            if len(keep) == 0:
                continue
            w, anc, pos = w[keep], anc[keep], pos[keep]
            if w.dtype == torch.float16:
                w = w.float()
            neg_col = torch.multinomial(w, 1, replacement=True).flatten()
        else:
            neg_col = torch.randint(0, len(neg_ref), (count,))
        A.append(anc)
        P.append(pos)
        N.append(neg_ref[neg_col.to(neg_ref.device)])
    if len(A) == 0:
        e = _empty_long(device)
        return e, e.clone(), e.clone()
    return (
        torch.cat(A).to(device=device, dtype=torch.long),
        torch.cat(P).to(device=device, dtype=torch.long),
        torch.cat(N).to(device=device, dtype=torch.long),
    )


def repeat_to_match_size(smaller_set, larger_size, smaller_size):
    reps = math.ceil(float(larger_size) / float(smaller_size))
    return smaller_set.repeat(reps)[:larger_size]


def matched_size_indices(curr_p_idx, curr_n_idx):
    """Tile the shorter of the two index tensors so both have the larger length."""
    n_pos, n_neg = len(curr_p_idx), len(curr_n_idx)
    if n_pos > n_neg:
        return curr_p_idx, repeat_to_match_size(curr_n_idx, n_pos, n_neg)
    return repeat_to_match_size(curr_p_idx, n_neg, n_pos), curr_n_idx


def convert_to_triplets(indices_tuple, labels, ref_labels=None, t_per_anchor=100):
    """None -> all ("all") or random triplets; 3-tuple -> unchanged;
    pairs -> every (a1[i], p[i], n[j]) with a1[i] == a2[j], ordered by (i, j)."""
    if indices_tuple is None:
        if t_per_anchor == "all":
            return get_all_triplets_indices(labels, ref_labels)
        return get_random_triplet_indices(labels, ref_labels, t_per_anchor=t_per_anchor)
    if len(indices_tuple) == 3:
        return indices_tuple
    a1, p, a2, n = indices_tuple
    pi, ni = torch.where(a1.unsqueeze(1) == a2)
    return a1[pi], p[pi], n[ni]


def convert_to_weights(indices_tuple, labels, dtype, using_ref=False):
    """Per-query weight = (number of occurrences in the tuple) / (max occurrences).

    No tuple, or an all-empty tuple, gives all ones. ``using_ref``: only anchors are counted.
    """
    weights = torch.zeros(labels.shape[0], device=labels.device)
    if not torch.is_autocast_enabled():
        weights = weights.to(dtype)
    if indices_tuple is None or all(len(x) == 0 for x in indices_tuple):
        return weights + 1
    idx = get_anchors(indices_tuple) if using_ref else torch.cat(list(indices_tuple), dim=0)
    uniq, counts = torch.unique(idx, return_counts=True)
    c = counts if torch.is_autocast_enabled() else counts.to(dtype)
    weights[uniq] = c / torch.max(counts)
    return weights


# ----------------------------------------------------------------------------- cross-batch memory
def not_self_comparisons(a, p, s, e, curr_batch_idx, ref_size, ref_is_subset=False):
    """Mask of pairs (a, p) that are not an item compared with its own copy in a memory queue.

    ``curr_batch_idx`` are the queue slots of the current batch (which may wrap around),
    ``s``/``e`` its first/last slot, ``ref_size`` the queue length.
    """
    if ref_is_subset:
        a, p = p, a
    in_batch = torch.any(p.unsqueeze(1) == curr_batch_idx, dim=1)
    a_c = a[in_batch]
    p_c = p[in_batch] - s  # slot -> position in the current batch
    if e <= s:  # the batch wrapped around the end of the queue
        p_c[p_c <= e - s] += ref_size
    keep = in_batch.clone()
    keep[torch.where(in_batch)[0][a_c == p_c]] = False
    return keep | ~in_batch


def remove_self_comparisons(indices_tuple, curr_batch_idx, ref_size, ref_is_subset=False):
    """Drop positive pairs / triplets whose anchor is compared with its own queue slot."""
    if len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must have 3 or 4 elements")
    s, e = curr_batch_idx[0], curr_batch_idx[-1]
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        keep = not_self_comparisons(a, p, s, e, curr_batch_idx, ref_size, ref_is_subset)
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    keep = not_self_comparisons(a1, p, s, e, curr_batch_idx, ref_size, ref_is_subset)
    return a1[keep], p[keep], a2, n
