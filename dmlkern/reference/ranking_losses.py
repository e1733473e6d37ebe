"""Reference ranking and histogram losses with PML 2.9.0 semantics: FastAP, SmoothAP, PNP,
Histogram, RankedList. Inputs are prepared as in ``embedding_losses`` (``ref_emb`` is the batch
itself when absent); each ``<name>_loss_dict`` returns PML's loss dict.

Memory: PML builds (N, N, N) tensors for SmoothAP and PNP and an (edges, N, N) one for FastAP;
these compute the same sums on smaller tensors (SmoothAP (N, n_classes, N), PNP (positive pairs,
N), FastAP (N, N) per edge).
"""

import torch
import torch.nn.functional as F

from ._embedding_common import _entry, _zeros
from .indices import convert_to_triplets, convert_to_weights, get_all_pairs_indices

__all__ = [
    "fast_ap_loss_dict",
    "smooth_ap_loss_dict",
    "pnp_loss_dict",
    "pnp_sigmoid",
    "histogram_loss_dict",
    "ranked_list_loss_dict",
]


def _label_masks(labels, dtype, with_self=False):
    """PML's dense (N, N) 0/1 masks of all positive and negative pairs (``with_self``: also (i, i)
    for each i that has a positive), the positives per row, and which rows have one."""
    n, device = labels.size(0), labels.device
    a1, p, a2, neg = get_all_pairs_indices(labels)
    pos_mask = torch.zeros(n, n, dtype=dtype, device=device)
    neg_mask = torch.zeros(n, n, dtype=dtype, device=device)
    pos_mask[a1, p] = 1
    if with_self:
        pos_mask[a1, a1] = 1
    neg_mask[a2, neg] = 1
    n_pos = torch.sum(pos_mask, dim=1)
    return pos_mask, neg_mask, n_pos, n_pos > 0


# =============================================================================== FastAP
def fast_ap_loss_dict(embeddings, labels, indices_tuple, *, num_bins, distance):
    """Per query with a positive: 1 - FastAP from soft (triangular) histograms of its distances
    to its positives and negatives over ``num_bins + 1`` edges in [0, 2**power], times the
    miner weight (``convert_to_weights``)."""
    dtype, device = embeddings.dtype, embeddings.device
    miner_weights = convert_to_weights(indices_tuple, labels, dtype=dtype)
    pos_mask, neg_mask, n_pos, has_pos = _label_masks(labels, dtype)
    if torch.sum(has_pos) == 0:
        return _zeros()
    dist = distance(embeddings)
    hist_max = 2**distance.power
    delta = hist_max / num_bins
    edges = torch.linspace(0.0, hist_max, steps=num_bins + 1, device=device, dtype=dtype)
    pos_hist, neg_hist = [], []
    for edge in edges:  # one (N, N) pulse at a time
        pulse = F.relu(1 - torch.abs(dist - edge) / delta)
        pos_hist.append(torch.sum(pulse * pos_mask, dim=1))
        neg_hist.append(torch.sum(pulse * neg_mask, dim=1))
    pos_hist, neg_hist = torch.stack(pos_hist, dim=1), torch.stack(neg_hist, dim=1)
    total_pos = torch.cumsum(pos_hist, dim=1)
    total = torch.cumsum(pos_hist + neg_hist, dim=1)
    h_pos = pos_hist * total_pos
    valid = (h_pos > 0) & (total > 0)
    if torch.sum(valid) == 0:
        return _zeros()
    fast_ap = torch.where(valid, h_pos / torch.where(valid, total, torch.ones_like(total)), 0).sum(dim=1)
    losses = (1 - fast_ap[has_pos] / n_pos[has_pos]) * miner_weights[has_pos]
    return {"loss": _entry(losses, torch.where(has_pos)[0], "element")}


# =============================================================================== SmoothAP
def smooth_ap_loss_dict(embeddings, labels, indices_tuple, *, temperature, distance):
    """1 - SmoothAP per query, times the miner weight.

    As in PML, the classes must be equally frequent (else ValueError), and the positives of
    query q are not found from the labels: the batch is cut into consecutive blocks of
    ``n_classes`` rows (PML's reshape), and q's "positives" are the rows of its block. With
    the batch sorted by class and as many classes as rows per class these are its class. Its
    rank among all rows counts itself (sigmoid((s_qk - s_qj) / T) over every k != j). The losses
    are float32 whatever the input dtype, as PML's.
    """
    counts = torch.bincount(labels)
    counts = counts[torch.nonzero(counts, as_tuple=True)[0]]
    if counts.unique().size(0) != 1:
        raise ValueError(
            "All classes must have the same number of elements in the labels; the given labels have "
            f"{counts.cpu().tolist()} (samplers.MPerClassSampler with batch_size and m gives such batches)"
        )
    n = embeddings.size(0)
    n_blocks = n // torch.unique(labels).size(0)
    g = n // n_blocks  # rows per block
    sims = distance(embeddings)
    rows = torch.arange(n, device=sims.device)
    block_cols = (rows // g * g).unsqueeze(1) + torch.arange(g, device=sims.device)  # (N, g)
    s_block = sims.gather(1, block_cols)  # s_qj for j in q's block
    # rank of j among all rows for query q: 1 + sum_{k != j} sigmoid((s_qk - s_qj) / T)
    sig = torch.sigmoid((sims.unsqueeze(1) - s_block.unsqueeze(2)) / temperature)  # (N, g, N)
    sig = sig.masked_fill(block_cols.unsqueeze(2) == rows.view(1, 1, -1), 0)
    all_rank = torch.sum(sig, dim=-1) + 1
    # rank among the block: the same within each block's own similarities
    xs = distance.maybe_normalize(embeddings.view(n_blocks, g, embeddings.size(-1)), dim=-1)
    s_pos = distance.compute_mat(xs, xs).reshape(n, g)  # row q: s_qj over q's block
    sig_pos = torch.sigmoid((s_pos.unsqueeze(1) - s_pos.unsqueeze(2)) / temperature)  # (N, g, g)
    sig_pos = sig_pos * (1.0 - torch.eye(g, device=sims.device, dtype=sig_pos.dtype))
    pos_rank = torch.sum(sig_pos, dim=-1) + 1
    ap = (torch.sum(pos_rank / all_rank, dim=1) / g).to(torch.float32)
    miner_weights = convert_to_weights(indices_tuple, labels, dtype=ap.dtype)
    losses = (1 - ap) * miner_weights
    return {"ap_loss": _entry(losses, torch.arange(n, device=losses.device), "element")}


# =============================================================================== PNP
def pnp_sigmoid(x, temp=1.0):
    """PML's sigmoid(x / temp) with the exponent clamped to [-50, 50] (so its gradient is 0 there)."""
    return 1.0 / (1.0 + torch.exp(torch.clamp(-x / temp, min=-50, max=50)))


def pnp_loss_dict(embeddings, labels, *, b, alpha, anneal, variant, distance):
    """Per query q with a positive: the mean over its positives j (and q itself) of f(rank), with
    rank = sum over q's negatives k of sigmoid((s_qk - s_qj) / anneal) and f the variant's
    (O: rank, Ds: log(1 + rank), Dq: (1 + rank)^-alpha, Iu: (1 + rank) log(1 + rank),
    Ib: (b rank - log(1 + b rank)) / b^2); the loss is the mean over those queries (1 - it for
    Dq), already reduced."""
    pos_mask, neg_mask, n_pos, has_pos = _label_masks(labels, embeddings.dtype, with_self=True)
    if torch.sum(has_pos) == 0:
        return _zeros()
    sims = distance(embeddings)
    q, j = torch.where(pos_mask != 0)
    rank = torch.sum(pnp_sigmoid(sims[q] - sims[q, j].unsqueeze(1), temp=anneal) * neg_mask[q], dim=-1)
    if variant == "Ds":
        rank = torch.log(1 + rank)
    elif variant == "Dq":
        rank = 1 / (1 + rank) ** alpha
    elif variant == "Iu":
        rank = (1 + rank) * torch.log(1 + rank)
    elif variant == "Ib":
        rank = 1 / b**2 * (b * rank - torch.log(1 + b * rank))
    elif variant != "O":
        raise ValueError(f"variant <{variant}> not available!")
    per_query = torch.zeros(len(labels), dtype=rank.dtype, device=rank.device).index_add(0, q, rank)
    loss = torch.sum(per_query[has_pos] / n_pos[has_pos]) / torch.sum(has_pos)
    if variant == "Dq":
        loss = 1 - loss
    return {"loss": _entry(loss, torch.where(has_pos)[0], "already_reduced")}


# =============================================================================== Histogram
def _unique_pairs(rows, cols):
    """The distinct unordered pairs, as (smaller, larger) index tensors in lexicographic order."""
    pairs = torch.unique(torch.sort(torch.stack([rows, cols]), dim=0)[0], dim=1)
    return pairs[0], pairs[1]


def _histogram_density(values, delta):
    """Soft histogram of ``values`` in [-1, 1] over nodes -1, -1 + delta, ..., 1 (linear
    interpolation between the two nearest nodes), divided by the number of values."""
    r = torch.floor((values.float() + 1) / delta).to(device=values.device, dtype=torch.long)
    to_upper = (values + 1 - r * delta) / delta
    to_lower = ((r + 1) * delta - 1 - values) / delta
    density = torch.zeros(round(1 + 2 / delta), device=values.device, dtype=values.dtype)
    density = density.scatter_add(0, r + 1, to_upper.to(values.dtype))
    density = density.scatter_add(0, r, to_lower.to(values.dtype))
    return density / values.size(0)


def histogram_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, delta, distance):
    """sum_r p_neg(r) * Phi_pos(r): the probability that a negative pair's similarity exceeds a
    positive pair's, from the soft histograms of the distinct unordered positive and negative
    pairs of every triplet (``convert_to_triplets(..., "all")``); already reduced."""
    a, p, neg = convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor="all")
    if len(a) == 0:
        return _zeros()
    mat = distance(embeddings, ref_emb)
    pos_vals = mat[_unique_pairs(a, p)]
    neg_vals = mat[_unique_pairs(a, neg)]
    phi = torch.cumsum(_histogram_density(pos_vals, delta), dim=0)
    loss = torch.sum(_histogram_density(neg_vals, delta) * phi)
    return {"loss": _entry(loss, None, "already_reduced")}


# =============================================================================== RankedList
def ranked_list_weights(pos_star, neg_star, pos_limit, alpha, Tp, Tn):
    """PML's w_p = exp(Tp (d - (alpha - margin))) and w_n = exp(Tn (alpha - d)) on the entries > 0
    of pos_star / neg_star, 0 elsewhere. The exp of the selected entries only, as PML's masked
    assignment: an unselected entry's exp could overflow (e.g. a large negative dot product), and
    a select's zero gradient times inf is NaN."""
    w_p = torch.where(pos_star > 0, torch.exp(Tp * (torch.where(pos_star > 0, pos_star, pos_limit) - pos_limit)), 0)
    w_n = torch.where(neg_star > 0, torch.exp(Tn * (alpha - torch.where(neg_star > 0, neg_star, alpha))), 0)
    return w_p, w_n


def ranked_list_loss_dict(embeddings, labels, *, margin, imbalance, alpha, Tp, Tn, distance):
    """Per query: (1 - imbalance) * L_P + imbalance * L_N, with L_P the exp(Tp * excess)-weighted
    mean of d - (alpha - margin) over positives farther than alpha - margin and L_N the
    exp(Tn * (alpha - d))-weighted mean of alpha - d over negatives closer than alpha (each
    weight sum plus 1e-5 per column)."""
    mat = distance(embeddings, embeddings)
    mat = mat - mat * torch.eye(len(mat), device=embeddings.device)
    mat = mat.to(device=embeddings.device, dtype=embeddings.dtype)
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    pos_limit = alpha - margin
    neg_star = torch.where(~same & (mat < alpha), mat, 0)
    same.fill_diagonal_(False)
    pos_star = torch.where(same & (mat > pos_limit), mat, 0)
    w_p, w_n = ranked_list_weights(pos_star, neg_star, pos_limit, alpha, Tp, Tn)
    loss_p = torch.sum(w_p * (pos_star - pos_limit), dim=1) / torch.sum(w_p + 1e-5, dim=1)
    loss_n = torch.sum(w_n * (alpha - neg_star), dim=1) / torch.sum(w_n + 1e-5, dim=1)
    losses = (1 - imbalance) * loss_p + imbalance * loss_n
    return {"loss": _entry(losses, torch.arange(len(losses), device=losses.device), "element")}
