"""Pair losses (MultiSimilarity, GeneralizedLiftedStructure, SupCon, Contrastive) on an explicit indices_tuple (pairs from any miner, or built by hand)
without the N x M matrix: only the listed pairs' similarities (gathered rows, `pair_lists.pair_dots`)
and per-row sums over them, O(pairs + N) memory.

PML builds 0/1 masks from the pairs (duplicates collapse) and takes masked row log-sum-exps of
the full matrix; here each row's log(1 + sum over its unique listed pairs of exp(z)) comes from
a per-row maximum (scatter_reduce amax, order-free) and a per-row sum (index_add: serial on a
CPU, so the bits don't depend on the thread count; its backward is a gather).
"""
import torch

from .._tracing import static_shapes
from .._validation import InvalidInputError
from ..engine_spec import stats_dtype
from ..reference.indices import convert_to_pairs
from ._common import decline, is_unit_cosine, is_unit_euclidean, unit_rows
from .pair_lists import pair_dots, unit_distance

BACKEND = "listed"  # what `last_backend` says


# Listing costs a gather of two rows per pair (~10x a matrix product's work per pair, and ~40 bytes
# per pair): past 1/16 of all pairs the reference's N x M matrix is cheaper, and its memory is
# PML's. (PML's MultiSimilarityMiner keeps ~all negatives of random embeddings.)
DENSE_FRACTION = 1 / 16
DENSE = "a dense indices_tuple (over 1/16 of all pairs: the reference's matrix is cheaper than listing them)"


def is_dense(num_pairs, embeddings, ref_emb):
    return num_pairs > DENSE_FRACTION * embeddings.shape[0] * ref_emb.shape[0]


def unique_pairs(a, b, num_cols):
    """The distinct pairs (a, b), sorted by a then b, and their keys a * num_cols + b."""
    keys = torch.unique(a * num_cols + b)
    return keys // num_cols, keys % num_cols, keys


def row_lse(z, rows, num_rows, add_one):
    """Per row r: log(sum over the pairs k of row r of exp(z_k)), plus a term exp(0) with
    add_one; 0 for a row without pairs (PML's masked logsumexp)."""
    init = 0.0 if add_one else float("-inf")
    with torch.no_grad():  # the shift: the row's largest term (or the added 0)
        shift = torch.full((num_rows,), init, dtype=z.dtype, device=z.device).scatter_reduce(
            0, rows, z.detach(), "amax", include_self=True)
        has_pairs = torch.zeros(num_rows, dtype=torch.bool, device=z.device).index_fill(0, rows, True)
        shift = torch.where(torch.isinf(shift) & (shift < 0), 0.0, shift)  # no pairs and no added one
    sums = torch.zeros(num_rows, dtype=z.dtype, device=z.device).index_add(0, rows, torch.exp(z - shift[rows]))
    if add_one:
        return shift + torch.log(torch.exp(-shift) + sums)
    return torch.where(has_pairs, shift + torch.log(torch.where(has_pairs, sums, 1.0)), 0.0)


def listed_pairs(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, distance_ok=is_unit_cosine):
    """(pos (a1, p), neg (a2, n)) unique and sorted, with PML's checks; "zero" for PML's `len <= 1`
    rule; or None after recording why this path can't take the call."""
    if static_shapes():
        return decline(module, "an indices_tuple under torch.compile (data-dependent pair counts)")
    if not distance_ok(module.distance):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    if embeddings.dtype not in (torch.float32, torch.float64) and embeddings.device.type == "cpu":
        return decline(module, f"{embeddings.dtype} on cpu with an indices_tuple (listed pairs run fp32 / fp64)")
    a1, p, a2, n = convert_to_pairs(indices_tuple, labels, ref_labels)
    if all(len(t) <= 1 for t in (a1, p, a2, n)):
        return "zero"
    if is_dense(len(a1) + len(a2), embeddings, ref_emb):
        return decline(module, DENSE)
    m = ref_emb.shape[0]
    a1, p, pos_keys = unique_pairs(a1, p, m)
    a2, n, neg_keys = unique_pairs(a2, n, m)
    if torch.isin(pos_keys, neg_keys).any():
        raise InvalidInputError("indices_tuple: each pair should be either positive or negative, not both")
    return (a1, p), (a2, n)


def _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, distance_ok, per_row_loss,
                 column=True):
    """The listed pairs and unit rows of a call, then per_row_loss(x, y, (a1, p), (a2, n)) -> (N,)
    as PML's per-row "element" losses, shaped (N, 1) (column) or (N,); ZERO_LOSS / None as
    `listed_pairs` decides (per_row_loss may return ZERO_LOSS too)."""
    from ._epilogue import ZERO_LOSS, _element, _per_row

    pairs = listed_pairs(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, distance_ok)
    if pairs is None or pairs == "zero":
        return None if pairs is None else ZERO_LOSS
    sd = stats_dtype(embeddings.dtype)
    x = unit_rows(embeddings).to(sd)
    y = None if ref_emb is embeddings else unit_rows(ref_emb).to(sd)
    losses = per_row_loss(x, y, *pairs)
    if losses is ZERO_LOSS:
        return ZERO_LOSS
    entry = _per_row(losses, embeddings) if column else _element(losses.to(embeddings.dtype), len(losses))
    return {"loss": entry}, BACKEND


def listed_multi_similarity(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """MultiSimilarityLoss on listed pairs: per row (1/alpha) log(1 + sum_p e^{-alpha (s - base)})
    + (1/beta) log(1 + sum_n e^{beta (s - base)}), as PML's masked form."""
    a, b, base = float(module.alpha), float(module.beta), float(module.base)

    def per_row(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        pos = row_lse(-a * pair_dots(x, y, a1, p) + a * base, a1, x.shape[0], add_one=True)
        neg = row_lse(b * pair_dots(x, y, a2, n) - b * base, a2, x.shape[0], add_one=True)
        return pos / a + neg / b
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, is_unit_cosine, per_row)


def listed_generalized_lifted(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """GeneralizedLiftedStructureLoss on listed pairs: per row relu(log sum_p e^{d - pos_margin}
    + log sum_n e^{neg_margin - d}), a side without pairs contributing 0, as PML's masked form."""
    from ._common import has_short_rows
    from ._epilogue import SHORT_ROWS

    if has_short_rows(embeddings, ref_emb):
        return decline(module, SHORT_ROWS)
    pm, nm = float(module.pos_margin), float(module.neg_margin)

    def per_row(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        pos = row_lse(unit_distance(pair_dots(x, y, a1, p)) - pm, a1, x.shape[0], add_one=False)
        neg = row_lse(nm - unit_distance(pair_dots(x, y, a2, n)), a2, x.shape[0], add_one=False)
        return torch.relu(pos + neg)
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, is_unit_euclidean, per_row)


def listed_supcon(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """SupConLoss on listed pairs: per row -(sum_p s_ip/t - |P(i)| lse_i) / (|P(i)| + tiny), lse_i
    over the row's listed positive and negative pairs; zero unless both kinds are listed (PML)."""
    from ._epilogue import ZERO_LOSS

    inv_t = 1.0 / float(module.temperature)

    def per_row(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        if len(a1) == 0 or len(a2) == 0:
            return ZERO_LOSS
        z_pos, z_neg = inv_t * pair_dots(x, y, a1, p), inv_t * pair_dots(x, y, a2, n)
        lse = row_lse(torch.cat([z_pos, z_neg]), torch.cat([a1, a2]), x.shape[0], add_one=False)
        zeros = torch.zeros(x.shape[0], dtype=z_pos.dtype, device=z_pos.device)
        count = zeros.index_add(0, a1, torch.ones_like(z_pos))
        pos_sum = zeros.index_add(0, a1, z_pos)
        return -(pos_sum - count * lse) / (count + torch.finfo(embeddings.dtype).tiny)
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, is_unit_cosine, per_row,
                        column=False)


def listed_contrastive(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """ContrastiveLoss on listed pairs (as given: PML's pair-based form keeps duplicates): per
    positive pair relu(d - pos_margin), per negative pair relu(neg_margin - d) (CosineSimilarity:
    relu(pos_margin - s), relu(s - neg_margin)), returned per pair for any reducer."""
    from ..reference._embedding_common import _entry
    from ._common import has_short_rows
    from ._epilogue import SHORT_ROWS, ZERO_LOSS

    euclidean = is_unit_euclidean(module.distance)
    if static_shapes():
        return decline(module, "an indices_tuple under torch.compile (data-dependent pair counts)")
    if not (euclidean or is_unit_cosine(module.distance)):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    if embeddings.dtype not in (torch.float32, torch.float64) and embeddings.device.type == "cpu":
        return decline(module, f"{embeddings.dtype} on cpu with an indices_tuple (listed pairs run fp32 / fp64)")
    if euclidean and has_short_rows(embeddings, ref_emb):
        return decline(module, SHORT_ROWS)
    a1, p, a2, n = convert_to_pairs(indices_tuple, labels, ref_labels)
    if all(len(t) <= 1 for t in (a1, p, a2, n)):
        return ZERO_LOSS  # PML's len <= 1 rule
    if is_dense(len(a1) + len(a2), embeddings, ref_emb):
        return decline(module, DENSE)
    sd = stats_dtype(embeddings.dtype)
    x = unit_rows(embeddings).to(sd)
    y = None if ref_emb is embeddings else unit_rows(ref_emb).to(sd)
    pm, nm = float(module.pos_margin), float(module.neg_margin)

    def values(rows, cols):
        s = pair_dots(x, y, rows, cols)
        return unit_distance(s) if euclidean else s

    pos_loss, neg_loss = 0, 0
    if len(a1) > 0:
        v = values(a1, p)
        pos_loss = torch.relu(v - pm if euclidean else pm - v).to(embeddings.dtype)
    if len(a2) > 0:
        v = values(a2, n)
        neg_loss = torch.relu(nm - v if euclidean else v - nm).to(embeddings.dtype)
    return {"pos_loss": _entry(pos_loss, (a1, p), "pos_pair"),
            "neg_loss": _entry(neg_loss, (a2, n), "neg_pair")}, BACKEND
