"""BatchEasyHardMiner (BatchHardMiner) and PairMarginMiner on row blocks of the distance matrix:
the same maths and output as `reference/miners.py` (which stays the readable ground truth), with
peak memory O(B · M + output) instead of several N x M tensors (the matrix, candidate masks, filled
copies, PML's list of every pair).

Each block is the miner's distance on a block of query rows: the distance's own normalisation
(once for all rows), `compute_mat` and `power`, i.e. the rows of `distance(embeddings, ref_emb)`.
Blocks have equal sizes (within one row) of at least `_MIN_BLOCK_ROWS` rows: a BLAS product of
so many rows gives each row the bits of the whole matrix's product (a product of a few rows may
take another kernel, e.g. gemv, and round otherwise), so the picks tie-break as on the full matrix
(torch.min / max per row) and the indices are PML's. Row-major order within and across blocks."""
import math

import torch

from ..reference import miners as ref

_BLOCK_VALUES = 1 << 21  # distance values per row block (8 MiB in fp32); a few such buffers live at once
_MIN_BLOCK_ROWS = 64


def _row_blocks(n, m):
    """(r0, r1) blocks of near-equal size covering range(n): ~_BLOCK_VALUES values each, never
    fewer than _MIN_BLOCK_ROWS rows (unless n is)."""
    step = max(_MIN_BLOCK_ROWS, _BLOCK_VALUES // max(1, m))
    count = max(1, math.ceil(n / step))
    base, extra = divmod(n, count)
    r0 = 0
    for i in range(count):
        r1 = r0 + base + (i < extra)
        yield r0, r1
        r0 = r1


def distance_blocks(distance, embeddings, ref_emb):
    """(r0, r1, distance(embeddings, ref_emb)[r0:r1]) block by block. Records the distance's
    statistics as one call would (a no-op unless it collects them)."""
    distance.record_stats(embeddings, ref_emb)
    query = distance.maybe_normalize(embeddings)
    refs = query if ref_emb is embeddings else distance.maybe_normalize(ref_emb)
    for r0, r1 in _row_blocks(embeddings.shape[0], refs.shape[0]):
        mat = distance.compute_mat(query[r0:r1], refs)
        yield r0, r1, mat if distance.power == 1 else mat**distance.power


def _candidates(labels, ref_labels, r0, r1):
    """The block's (positive, negative) candidate masks: PML's get_matches_and_diffs rows,
    the pair (i, i) no positive when ref_labels is labels."""
    pos = labels[r0:r1, None] == ref_labels[None, :]
    neg = ~pos
    if ref_labels is labels:
        rows = torch.arange(r0, min(r1, len(ref_labels)), device=pos.device)
        pos[rows - r0, rows] = False
    return pos, neg


def _pick_per_row(mat, candidates, take_min, thresholds=None, val_range=None):
    """`reference.miners._pick_per_row` (the same masks and torch.min / max) without its copies
    of the mask and the fill: ((values, column indices), row_has_candidate)."""
    valid = candidates
    if thresholds is not None:
        valid = valid & ((mat > thresholds[:, None]) if take_min else (mat < thresholds[:, None]))
    if val_range is not None:
        valid = valid & (mat >= val_range[0]) & (mat <= val_range[1])
    fill = torch.finfo(mat.dtype).max if take_min else torch.finfo(mat.dtype).min
    filled = torch.where(valid, mat, fill)
    best = torch.min(filled, dim=1) if take_min else torch.max(filled, dim=1)
    return best, valid.any(dim=1)


def _where_offset(mask, r0):
    rows, cols = torch.where(mask)
    return rows + r0, cols


def _cat_pairs(parts, device):
    if not parts:
        e = torch.empty(0, dtype=torch.long, device=device)
        return e, e.clone()
    rows, cols = zip(*parts)
    return torch.cat(rows), torch.cat(cols)


def batch_easy_hard_miner(distance, embeddings, labels, ref_emb, ref_labels, pos_strategy, neg_strategy,
                          allowed_pos_range=None, allowed_neg_range=None):
    """`reference.miners.batch_easy_hard_miner(distance(embeddings, ref_emb), ...)` block by block:
    (a1, p, a2, n). A side's per-row pick (and the semihard threshold from the other side's) is
    row-local; a side set to "all" lists its pairs block by block."""
    n, device = embeddings.shape[0], embeddings.device
    if n == 0 or ref_emb.shape[0] == 0:
        return ref._empty(device, 4)
    ref_labels = labels if ref_labels is None else ref_labels  # (None: labels, the diagonal excluded)
    closest_is_min = not distance.is_inverted  # "closest": the min of a distance, the max of a similarity
    pos_take_min = closest_is_min if pos_strategy == ref.EASY else not closest_is_min
    neg_take_min = closest_is_min if neg_strategy in (ref.HARD, ref.SEMIHARD) else not closest_is_min
    pick_pos, pick_neg = pos_strategy != ref.ALL, neg_strategy != ref.ALL
    pos_idx = torch.zeros(n, dtype=torch.long, device=device)
    neg_idx = torch.zeros(n, dtype=torch.long, device=device)
    pos_ok = torch.zeros(n, dtype=torch.bool, device=device)
    neg_ok = torch.zeros(n, dtype=torch.bool, device=device)
    all_pos, all_neg = [], []
    for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb):
        pos_cand, neg_cand = _candidates(labels, ref_labels, r0, r1)

        def positives(thr=None):
            return _pick_per_row(mat, pos_cand, pos_take_min, thr, allowed_pos_range)

        def negatives(thr=None):
            return _pick_per_row(mat, neg_cand, neg_take_min, thr, allowed_neg_range)

        pos = neg = None
        if pos_strategy == ref.SEMIHARD and pick_neg:
            neg = negatives()
            pos = positives(neg[0].values)
        elif neg_strategy == ref.SEMIHARD and pick_pos:
            pos = positives()
            neg = negatives(pos[0].values)
        else:
            pos = positives() if pick_pos else None
            neg = negatives() if pick_neg else None
        if pos is not None:
            pos_idx[r0:r1], pos_ok[r0:r1] = pos[0].indices, pos[1]
        else:
            all_pos.append(_where_offset(pos_cand, r0))
        if neg is not None:
            neg_idx[r0:r1], neg_ok[r0:r1] = neg[0].indices, neg[1]
        else:
            all_neg.append(_where_offset(neg_cand, r0))
    rows = torch.arange(n, device=device)
    if pick_pos and pick_neg:
        keep = pos_ok & neg_ok
        a = rows[keep]
        return a, pos_idx[keep], a, neg_idx[keep]
    a1, p = _cat_pairs(all_pos, device) if not pick_pos else (rows[pos_ok], pos_idx[pos_ok])
    a2, ng = _cat_pairs(all_neg, device) if not pick_neg else (rows[neg_ok], neg_idx[neg_ok])
    return a1, p, a2, ng


def pair_margin_miner(distance, embeddings, labels, ref_emb, ref_labels, pos_margin, neg_margin):
    """`reference.miners.pair_margin_miner(distance(embeddings, ref_emb), ...)` block by block."""
    if embeddings.shape[0] == 0 or ref_emb.shape[0] == 0:
        return ref._empty(embeddings.device, 4)
    ref_labels = labels if ref_labels is None else ref_labels
    pos_parts, neg_parts = [], []
    for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb):
        pos_cand, neg_cand = _candidates(labels, ref_labels, r0, r1)
        if distance.is_inverted:
            pos_cand &= mat < pos_margin
            neg_cand &= mat > neg_margin
        else:
            pos_cand &= mat > pos_margin
            neg_cand &= mat < neg_margin
        pos_parts.append(_where_offset(pos_cand, r0))
        neg_parts.append(_where_offset(neg_cand, r0))
    device = embeddings.device
    return (*_cat_pairs(pos_parts, device), *_cat_pairs(neg_parts, device))
