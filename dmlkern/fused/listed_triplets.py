"""TripletMarginLoss on listed triplets (an explicit indices_tuple: a miner's (a, p, n), or PML's
pairs (a1, p, a2, n) turned into triplets as PML's convert_to_triplets does) without the N x M
distance matrix the reference builds to read 2T entries of it.

Per triplet the reference's maths: d_ap, d_an (and d_pn with `swap`, p read as a query row as PML
does) from the dots of gathered unit rows, <x_a, y_p> in chunks (`pair_lists.pair_dots`, O(T) memory
besides the rows), d = sqrt(max(2 - 2s, 0)) for the default LpDistance (no gradient at d = 0,
as the blocked path) or s itself for CosineSimilarity; then the distance's own margin /
smallest_dist, relu or softplus. The result is the reference's per-triplet loss dict, so every
reducer works. Work and memory O(T · D); values and gradients don't depend on the CPU thread
count (index_select gathers, whose backward index_add is serial on the CPU)."""
import torch

from .._tracing import static_shapes
from ..engine_spec import stats_dtype
from ._common import decline, has_short_rows, is_unit_cosine, is_unit_euclidean, unit_rows
from ._epilogue import SHORT_ROWS, ZERO_LOSS
from .listed_pairs import DENSE, is_dense
from .pair_lists import pair_dots, positive_pairs, unit_distance
from .triplet import _term

BACKEND = "listed"  # what `last_backend` says: the listed triplets, gathered rows, no N x M matrix


def pairs_to_triplets(a1, p, a2, n):
    """PML's convert_to_triplets for pairs: every (a1[i], p[i], n[j]) with a1[i] == a2[j],
    ordered by (i, j), in O(pairs + triplets) instead of PML's len(a1) x len(a2) match matrix."""
    i, j = positive_pairs(a1, a2, exclude_diag=False)
    return a1.index_select(0, i), p.index_select(0, i), n.index_select(0, j)


def listed_triplet_margin(module, embeddings, indices_tuple, ref_emb):
    """(loss_dict, "listed"), ZERO_LOSS for no triplet, or None (the reference) after `decline`."""
    distance = module.distance
    euclidean = is_unit_euclidean(distance)
    if not (euclidean or is_unit_cosine(distance)):
        return decline(module, f"distance {type(distance).__name__} with listed triplets "
                               "(the listed path: the default LpDistance or CosineSimilarity)")
    if embeddings.dtype not in (torch.float32, torch.float64):
        return decline(module, f"dtype {embeddings.dtype} (the listed triplet path runs fp32 / fp64)")
    if static_shapes():
        return decline(module, "torch.compile (the listed triplet path has data-dependent shapes)")
    if len(indices_tuple) == 4:
        indices = pairs_to_triplets(*(t.long() for t in indices_tuple))
    else:
        indices = tuple(indices_tuple)
    a, p, n = (t.long() for t in indices)
    if len(a) == 0:
        return ZERO_LOSS  # the reference's zeros, before it computes any distance
    if is_dense(2 * len(a), embeddings, ref_emb):  # two gathered dot products per triplet
        return decline(module, DENSE)
    if module.swap and int(p.max()) >= embeddings.shape[0]:
        return decline(module, "swap=True with a positive index past the embeddings' rows (the reference raises)")
    if euclidean and has_short_rows(embeddings, ref_emb):
        return decline(module, SHORT_ROWS)
    distance.record_stats(embeddings, ref_emb)  # where the reference calls the distance (no-op without stats)
    # (under torch.autocast: the rows in the autocast dtype, their products in fp32, as the blocked path)
    x = unit_rows(embeddings).to(stats_dtype(embeddings.dtype))
    y = None if ref_emb is embeddings else unit_rows(ref_emb).to(x.dtype)

    def dist(rows, cols):
        s = pair_dots(x, y, rows, cols)
        return unit_distance(s) if euclidean else s

    d_ap, d_an = dist(a, p), dist(a, n)
    if module.swap:
        d_an = distance.smallest_dist(d_an, dist(p, n))  # PML: mat[p, n], p as a query row
    violation = distance.margin(d_ap, d_an) + module.margin
    losses = _term(violation, bool(module.smooth_loss))  # softplus from exp / log1p: thread-count independent
    return {"loss": {"losses": losses, "indices": indices, "reduction_type": "triplet"}}, BACKEND
