"""Mat-based pair losses on an explicit indices_tuple (pairs from any miner, or built by hand)
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
from ._common import decline, is_unit_cosine, unit_rows
from .pair_lists import pair_dots

BACKEND = "listed"  # what `last_backend` says


def unique_pairs(a, b, num_cols):
    """The distinct pairs (a, b), sorted by a then b, and their keys a * num_cols + b."""
    keys = torch.unique(a * num_cols + b)
    return keys // num_cols, keys % num_cols, keys


def listed_row_lse(x, y, rows, cols, scale, offset):
    """Per row r of x: log(1 + sum_{listed (r, c)} exp(scale * <x_r, y_c> + offset)), 0 for a row
    without pairs (PML's logsumexp(add_one=True) over the pairs' mask). y None: y is x."""
    z = scale * pair_dots(x, y, rows, cols) + offset
    with torch.no_grad():  # the shift: the row's largest term, or the added 0
        shift = torch.zeros(x.shape[0], dtype=z.dtype, device=z.device).scatter_reduce(
            0, rows, z.detach(), "amax", include_self=True)
    sums = torch.zeros(x.shape[0], dtype=z.dtype, device=z.device).index_add(0, rows, torch.exp(z - shift[rows]))
    return shift + torch.log(torch.exp(-shift) + sums)


def listed_pairs(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """(pos (a1, p), neg (a2, n)) unique and sorted, with PML's checks; ZERO for PML's `len <= 1`
    rule; or None after recording why this path can't take the call."""
    if static_shapes():
        return decline(module, "an indices_tuple under torch.compile (data-dependent pair counts)")
    if not is_unit_cosine(module.distance):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    if embeddings.dtype not in (torch.float32, torch.float64) and embeddings.device.type == "cpu":
        return decline(module, f"{embeddings.dtype} on cpu with an indices_tuple (listed pairs run fp32 / fp64)")
    a1, p, a2, n = convert_to_pairs(indices_tuple, labels, ref_labels)
    if all(len(t) <= 1 for t in (a1, p, a2, n)):
        return "zero"
    m = ref_emb.shape[0]
    a1, p, pos_keys = unique_pairs(a1, p, m)
    a2, n, neg_keys = unique_pairs(a2, n, m)
    if torch.isin(pos_keys, neg_keys).any():
        raise InvalidInputError("indices_tuple: each pair should be either positive or negative, not both")
    return (a1, p), (a2, n)


def listed_multi_similarity(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """MultiSimilarityLoss on listed pairs: per row (1/alpha) log(1 + sum_p e^{-alpha (s - base)})
    + (1/beta) log(1 + sum_n e^{beta (s - base)}), as PML's masked form."""
    from ._epilogue import ZERO_LOSS, _per_row

    pairs = listed_pairs(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    if pairs is None or pairs == "zero":
        return None if pairs is None else ZERO_LOSS
    (a1, p), (a2, n) = pairs
    sd = stats_dtype(embeddings.dtype)
    x = unit_rows(embeddings).to(sd)
    y = None if ref_emb is embeddings else unit_rows(ref_emb).to(sd)
    a, b, base = float(module.alpha), float(module.beta), float(module.base)
    pos = listed_row_lse(x, y, a1, p, -a, a * base)
    neg = listed_row_lse(x, y, a2, n, b, -b * base)
    return {"loss": _per_row(pos / a + neg / b, embeddings)}, BACKEND
