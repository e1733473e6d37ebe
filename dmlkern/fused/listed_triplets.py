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
index_add is serial on the CPU)."""

from .._tracing import static_shapes
from ..ops import pair_engine as pe
from ..reference.tuple_losses import margin_anchor_beta, margin_triplets_dict
from ._common import decline, engine_distance, engine_rows_reason
from ._epilogue import ZERO_LOSS
from .listed_pairs import DENSE, distance_values, is_dense, listed_rows, materialized
from .pair_lists import positive_pairs
from .triplet import _term

BACKEND = "listed"  # what `last_backend` says: the listed triplets, gathered rows, no N x M matrix


def pairs_to_triplets(a1, p, a2, n):
    """PML's convert_to_triplets for pairs: every (a1[i], p[i], n[j]) with a1[i] == a2[j],
    ordered by (i, j), in O(pairs + triplets) instead of PML's len(a1) x len(a2) match matrix."""
    i, j = positive_pairs(a1, a2, exclude_diag=False)
    return a1.index_select(0, i), p.index_select(0, i), n.index_select(0, j)


def listed_triplets(module, embeddings, indices_tuple, ref_emb):
    """The triplets (a, p, n) of a listed-triplet call, with the checks both losses share;
    ZERO_LOSS for no triplet, or None after `decline` (the reference runs)."""
    distance = module.distance
    if pe.choose_backend(module.backend, embeddings.device) == "reference":  # torch ops only: any dtype, device
        return decline(module, "backend='reference' requested (loss.backend or DMLKERN_BACKEND)")
    if engine_distance(distance) is None:
        return decline(module, f"distance {type(distance).__name__} with listed triplets (the listed path: "
                               "LpDistance(p=2, power 1 or 2), CosineSimilarity, DotProductSimilarity)")
    if static_shapes():
        return decline(module, "torch.compile (the listed triplet path has data-dependent shapes)")
    indices_tuple = materialized(indices_tuple, embeddings.device)
    if len(indices_tuple) == 4:
        indices_tuple = pairs_to_triplets(*(t.long() for t in indices_tuple))
    a, p, n = (t.long() for t in indices_tuple)
    if len(a) == 0:
        return ZERO_LOSS  # the reference's zeros, before it computes any distance
    if is_dense(2 * len(a), embeddings, ref_emb):  # two gathered dot products per triplet
        return decline(module, DENSE)
    reason = engine_rows_reason(distance, embeddings, ref_emb)  # short rows, half-precision raw Lp
    if reason is not None:
        return decline(module, reason)
    return a, p, n


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
