"""Pair losses on an explicit indices_tuple (pairs from any miner, or built by hand) without the
N x M matrix: only the listed pairs' values (gathered rows of `_common.engine_rows`, so every
distance the engine expresses; `pair_lists.pair_dots`, `distance_values`) and
per-row sums over them, O(pairs + N) memory. MultiSimilarity, GeneralizedLiftedStructure, SupCon,
Circle (PML's mat-based losses: 0/1 masks from the pairs, so duplicates collapse; here the unique
pairs), Contrastive, LiftedStructure, NTXent, TupletMargin (pair-based: every listed pair, duplicates
included).

Each row's log-sum-exp over its listed pairs comes from a per-row maximum (scatter_reduce amax,
order-free) and a per-row sum (index_add: serial on a CPU, so the bits don't depend on the thread
count; its backward is a gather).
"""
import torch
import torch.nn.functional as F

from .._determinism import logaddexp
from .._tracing import static_shapes
from .._validation import InvalidInputError
from ..engine_spec import stats_dtype
from ..reference._embedding_common import _entry
from ..reference.indices import convert_to_pairs
from ..engine_spec import TRANSFORM_UNIT_DISTANCE
from . import _common
from ._common import (DOT_KINDS, decline, engine_distance, engine_rows, engine_rows_reason, engine_transform,
                      is_unit_cosine, matrix_dtype, small_problem, unit_rows, value_params, widened)
from ._epilogue import ZERO_LOSS, _element, _engine_or_decline, _log1p_exp, _log1p_exp_as_pml, _per_row
from .pair_lists import pair_dots, unit_distance

BACKEND = "listed"  # what `last_backend` says


# Listing costs a gather of two rows per pair (~10x a matrix product's work per pair, and ~40 bytes
# per pair): past 1/16 of all pairs the reference's N x M matrix is cheaper, and its memory is
# PML's. (PML's MultiSimilarityMiner keeps ~all negatives of random embeddings.) Not for the losses
# whose reference builds a positive pairs x negative pairs matrix (Lifted, NTXent, Tuplet):
# listing is always cheaper there.
DENSE_FRACTION = 1 / 16
DENSE = "a dense indices_tuple (over 1/16 of all pairs: the reference's matrix is cheaper than listing them)"


def is_dense(num_pairs, embeddings, ref_emb):
    return num_pairs > DENSE_FRACTION * embeddings.shape[0] * ref_emb.shape[0]


def any_distance(distance):
    """Every distance `_common.engine_rows` expresses (the listed values come from its rows)."""
    return engine_distance(distance) is not None


def a_similarity(distance):
    """The similarities `_common.engine_rows` expresses: the cosine, the raw dot product."""
    return engine_distance(distance) in DOT_KINDS


def materialized(indices_tuple, device):
    """A miner's lazy result (`lazy_pairs.LazyMined`) as PML's plain tuple; any other tuple as is."""
    from .lazy_pairs import LazyMined

    if isinstance(indices_tuple, LazyMined):
        return tuple(t.to(device) for t in indices_tuple.materialize())
    return indices_tuple


def listed_rows(embeddings, ref_emb, distance=None):
    """The rows the listed values come from (`_common.engine_rows` of `distance`; None: unit rows):
    (x, y), y None when it is x. fp16 / bf16 embeddings are widened to fp32 first."""
    sd = stats_dtype(embeddings.dtype)
    emb_w, ref_w = widened(embeddings, ref_emb)
    if distance is None:
        x = unit_rows(emb_w).to(sd)
        return x, None if ref_w is emb_w else unit_rows(ref_w).to(sd)
    x, y, _ = engine_rows(distance, emb_w, ref_w)
    return x.to(sd), None if y is x else y.to(sd)


def pair_values(x, y, rows, cols, euclidean):
    """The distance's value of each listed pair: the unit Euclidean distance, or the cosine."""
    s = pair_dots(x, y, rows, cols)
    return unit_distance(s) if euclidean else s


def distance_values(x, y, rows, cols, distance):
    """The distance's own value (PML's matrix entry) of each listed pair, from the rows
    `listed_rows(..., distance)` gave: the engine's value v of their dot product s (s, or
    sqrt(max(2 - 2s, 0)) with no gradient at 0), then scale * v + shift (the squared distances)."""
    s = pair_dots(x, y, rows, cols)
    v = unit_distance(s) if engine_transform(distance) == TRANSFORM_UNIT_DISTANCE else s
    terms = value_params(distance, sc_pos=1.0)
    return v if (terms.sc_pos, terms.off_pos) == (1.0, 0.0) else terms.sc_pos * v + terms.off_pos


def unique_pairs(a, b, num_cols):
    """The distinct pairs (a, b), sorted by a then b, and their keys a * num_cols + b."""
    keys = torch.unique(a * num_cols + b)
    return keys // num_cols, keys % num_cols, keys


def row_lse(z, rows, num_rows, add_one, empty=0.0):
    """Per row r: log(sum over the pairs k of row r of exp(z_k)), plus a term exp(0) with
    add_one; `empty` for a row without pairs (0: PML's masked logsumexp)."""
    init = 0.0 if add_one else float("-inf")
    with torch.no_grad():  # the shift: the row's largest term (or the added 0)
        shift = torch.full((num_rows,), init, dtype=z.dtype, device=z.device).scatter_reduce(
            0, rows, z.detach(), "amax", include_self=True)
        has_pairs = torch.zeros(num_rows, dtype=torch.bool, device=z.device).index_fill(0, rows, True)
        shift = torch.where(torch.isinf(shift) & (shift < 0), 0.0, shift)  # no pairs and no added one
    sums = torch.zeros(num_rows, dtype=z.dtype, device=z.device).index_add(0, rows, torch.exp(z - shift[rows]))
    if add_one:
        return shift + torch.log(torch.exp(-shift) + sums)
    return torch.where(has_pairs, shift + torch.log(torch.where(has_pairs, sums, 1.0)), empty)


def listed_pairs(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, distance_ok=is_unit_cosine,
                 dedupe=True, dense_rule=True):
    """(pos (a1, p), neg (a2, n)) with PML's checks: unique and sorted (dedupe, PML's mat-based
    losses, where a pair may not be both), else as given; "zero" for PML's `len <= 1` rule; or
    None after recording why this path can't take the call (the reference runs)."""
    if _engine_or_decline(module, embeddings) is None:
        return None
    if static_shapes():
        return decline(module, "an indices_tuple under torch.compile (data-dependent pair counts)")
    if not distance_ok(module.distance):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    if embeddings.dtype not in (torch.float32, torch.float64) and embeddings.device.type == "cpu":
        return decline(module, f"{embeddings.dtype} on cpu with an indices_tuple (listed pairs run fp32 / fp64)")
    reason = small_problem(embeddings, ref_emb) or engine_rows_reason(module.distance, embeddings, ref_emb)
    if reason is not None:
        return decline(module, reason)
    a1, p, a2, n = convert_to_pairs(materialized(indices_tuple, embeddings.device), labels, ref_labels)
    if all(len(t) <= 1 for t in (a1, p, a2, n)):
        return "zero"
    if dense_rule and is_dense(len(a1) + len(a2), embeddings, ref_emb):
        return decline(module, DENSE)
    if not dedupe:
        return (a1, p), (a2, n)
    m = ref_emb.shape[0]
    a1, p, pos_keys = unique_pairs(a1, p, m)
    a2, n, neg_keys = unique_pairs(a2, n, m)
    if torch.isin(pos_keys, neg_keys).any():
        raise InvalidInputError("indices_tuple: each pair should be either positive or negative, not both")
    return (a1, p), (a2, n)


NAN_BEYOND_THE_LIST = "a NaN embedding with an indices_tuple (PML's NaN reaches pairs beyond the list; eager)"


def _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, distance_ok, loss_dict,
                 nan_to_reference=False, **pair_options):
    """The listed pairs and unit rows of a call, then loss_dict(x, y, (a1, p), (a2, n)) -> PML's
    loss dict (or ZERO_LOSS); ZERO_LOSS / None as `listed_pairs` decides. nan_to_reference: the
    losses whose PML form lets a NaN row poison anchors it has no listed pair with (SupCon's row
    maximum over the whole matrix, NT-Xent's pairs x pairs product) run the reference on a NaN."""
    if nan_to_reference and _common.has_entry(torch.isnan, embeddings, ref_emb):
        return decline(module, NAN_BEYOND_THE_LIST)
    pairs = listed_pairs(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, distance_ok,
                         **pair_options)
    if pairs is None or pairs == "zero":
        return None if pairs is None else ZERO_LOSS
    out = loss_dict(*listed_rows(embeddings, ref_emb, module.distance), *pairs)
    return ZERO_LOSS if out is ZERO_LOSS else (out, BACKEND)


def listed_multi_similarity(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """MultiSimilarityLoss on listed pairs: per row (1/alpha) log(1 + sum_p e^{-alpha (s - base)})
    + (1/beta) log(1 + sum_n e^{beta (s - base)}) (a distance: e^{alpha (d - base)}, e^{beta (base - d)},
    PML's distance.margin), as PML's masked form."""
    a, b, base = float(module.alpha), float(module.beta), float(module.base)
    distance = module.distance
    sign = 1.0 if distance.is_inverted else -1.0

    def loss_dict(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        if distance.is_inverted and engine_distance(distance) == "unit_cosine":  # (the bits of before)
            pos_v, neg_v = pair_dots(x, y, a1, p), pair_dots(x, y, a2, n)
        else:
            pos_v, neg_v = distance_values(x, y, a1, p, distance), distance_values(x, y, a2, n, distance)
        pos = row_lse(-sign * a * pos_v + sign * a * base, a1, x.shape[0], add_one=True)
        neg = row_lse(sign * b * neg_v - sign * b * base, a2, x.shape[0], add_one=True)
        return {"loss": _per_row(pos / a + neg / b, embeddings)}
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, any_distance, loss_dict)


def listed_generalized_lifted(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """GeneralizedLiftedStructureLoss on listed pairs: per row relu(log sum_p e^{d - pos_margin}
    + log sum_n e^{neg_margin - d}) (a similarity: e^{pos_margin - s}, e^{s - neg_margin}), a side
    without pairs contributing 0, as PML's masked form."""
    pm, nm = float(module.pos_margin), float(module.neg_margin)
    distance = module.distance
    sign = -1.0 if distance.is_inverted else 1.0

    def loss_dict(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        pos = row_lse(sign * (distance_values(x, y, a1, p, distance) - pm), a1, x.shape[0], add_one=False)
        neg = row_lse(sign * (nm - distance_values(x, y, a2, n, distance)), a2, x.shape[0], add_one=False)
        return {"loss": _per_row(torch.relu(pos + neg), embeddings)}
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, any_distance, loss_dict)


def listed_supcon(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """SupConLoss on listed pairs: per row -(sum_p s_ip/t - |P(i)| lse_i) / (|P(i)| + tiny), lse_i
    over the row's listed positive and negative pairs; zero unless both kinds are listed (PML)."""
    inv_t = 1.0 / float(module.temperature)

    def loss_dict(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        if len(a1) == 0 or len(a2) == 0:
            return ZERO_LOSS
        z_pos, z_neg = inv_t * pair_dots(x, y, a1, p), inv_t * pair_dots(x, y, a2, n)
        lse = row_lse(torch.cat([z_pos, z_neg]), torch.cat([a1, a2]), x.shape[0], add_one=False)
        zeros = torch.zeros(x.shape[0], dtype=z_pos.dtype, device=z_pos.device)
        count = zeros.index_add(0, a1, torch.ones_like(z_pos))
        pos_sum = zeros.index_add(0, a1, z_pos)
        losses = -(pos_sum - count * lse) / (count + torch.finfo(embeddings.dtype).tiny)
        return {"loss": _element(losses.to(embeddings.dtype), len(losses))}  # (N,), as PML's SupCon
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, a_similarity, loss_dict,
                        nan_to_reference=True)


def listed_circle(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """CircleLoss on listed pairs: per row softplus(lse_p(-gamma [1+m-s]_+ (s-1+m)) + lse_n(gamma
    [s+m]_+ (s-m))), the [.]_+ weights detached; 0 for a row without a positive or a negative
    pair, as PML's masked form. (N, 1) element losses for any reducer."""
    gamma, op, on, delta_p, delta_n = (float(v) for v in (module.gamma, module.op, module.on, module.delta_p,
                                                           module.delta_n))

    def loss_dict(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        s_p, s_n = pair_dots(x, y, a1, p), pair_dots(x, y, a2, n)
        z_pos = -gamma * torch.relu(op - s_p.detach()) * (s_p - delta_p)
        z_neg = gamma * torch.relu(s_n.detach() - on) * (s_n - delta_n)
        rows = x.shape[0]
        complete = torch.zeros(rows, dtype=torch.bool, device=x.device).index_fill(0, a1, True)
        complete &= torch.zeros_like(complete).index_fill(0, a2, True)
        lse = row_lse(z_pos, a1, rows, add_one=False) + row_lse(z_neg, a2, rows, add_one=False)
        return {"loss": _per_row(F.softplus(lse) * complete.to(lse.dtype), embeddings)}
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, is_unit_cosine, loss_dict)


def listed_contrastive(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """ContrastiveLoss on listed pairs (as given: PML's pair-based form keeps duplicates): per
    positive pair relu(d - pos_margin), per negative pair relu(neg_margin - d) (CosineSimilarity:
    relu(pos_margin - s), relu(s - neg_margin)), returned per pair for any reducer."""
    distance = module.distance
    euclidean = not distance.is_inverted  # a distance
    pm, nm = float(module.pos_margin), float(module.neg_margin)

    def loss_dict(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        pos_loss, neg_loss = 0, 0
        if len(a1) > 0:
            v = distance_values(x, y, a1, p, distance)
            pos_loss = torch.relu(v - pm if euclidean else pm - v).to(embeddings.dtype)
        if len(a2) > 0:
            v = distance_values(x, y, a2, n, distance)
            neg_loss = torch.relu(nm - v if euclidean else v - nm).to(embeddings.dtype)
        return {"pos_loss": _entry(pos_loss, (a1, p), "pos_pair"), "neg_loss": _entry(neg_loss, (a2, n), "neg_pair")}
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, any_distance, loss_dict,
                        dedupe=False)


def _row_lse_at(z, rows, num_rows, at):
    """(log sum exp(z) over the pairs of row at[k], duplicates each counted; whether there are
    any): 0 where there are none (no -inf: its logaddexp has no finite second derivative)."""
    lse = row_lse(z, rows, num_rows, add_one=False, empty=float("-inf")).index_select(0, at)
    has = ~torch.isneginf(lse)
    return torch.where(has, lse, 0.0), has


def listed_lifted(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """LiftedStructureLoss on listed pairs (as given: PML's pair-based form keeps duplicates): per
    positive pair (a, p) relu(log sum_{negative pairs (a2, n) with a2 == a or a2 == p} e^{neg_margin - d}
    + d_ap - pos_margin)^2 / 2 (CosineSimilarity: e^{s - neg_margin}, pos_margin - s_ap); the sum
    matches a2 with a and p by index value, as PML does (also with ref_emb), and is 0 for none.
    It is the logaddexp of a's and p's own row sums: O(pairs), where PML builds pairs x pairs."""
    distance = module.distance
    euclidean = not distance.is_inverted  # a distance
    pm, nm = float(module.pos_margin), float(module.neg_margin)

    def loss_dict(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        if len(a1) == 0 or len(a2) == 0:
            return ZERO_LOSS
        v_pos, v_neg = distance_values(x, y, a1, p, distance), distance_values(x, y, a2, n, distance)
        rows = max(x.shape[0], (x if y is None else y).shape[0])  # p indexes the reference rows
        neg_term = nm - v_neg if euclidean else v_neg - nm
        at_a, has_a = _row_lse_at(neg_term, a2, rows, a1)
        at_p, has_p = _row_lse_at(neg_term, a2, rows, p)
        has_p = has_p & (p != a1)  # a == p: its pairs once
        at_p = torch.where(has_p, at_p, 0.0)
        neg_part = torch.where(has_a & has_p, logaddexp(at_a, at_p), at_a + at_p)  # one side: that side; none: 0
        losses = torch.relu(neg_part + (v_pos - pm if euclidean else pm - v_pos)) ** 2 / 2
        return {"loss": _entry(losses.to(embeddings.dtype).unsqueeze(1), (a1, p), "pos_pair")}
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, any_distance, loss_dict,
                        dedupe=False, dense_rule=False)


def listed_ntxent(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """NTXentLoss on listed pairs (as given: duplicates kept): per positive pair (a, p)
    -log(e^{z_ap} / (e^{z_ap} + sum_{negative pairs (a, n)} e^{z_an}) + tiny), z = s / t (a
    distance: -d / t), as PML's form; O(pairs), where PML builds pairs x pairs."""
    distance = module.distance
    t = float(module.temperature)

    def loss_dict(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        if len(a1) == 0 or len(a2) == 0:
            return ZERO_LOSS
        sign = 1.0 if distance.is_inverted else -1.0
        z_pos = sign * distance_values(x, y, a1, p, distance) / t
        z_neg = sign * distance_values(x, y, a2, n, distance) / t
        neg_lse, has_neg = _row_lse_at(z_neg, a2, x.shape[0], a1)
        softplus = torch.where(has_neg, _log1p_exp(neg_lse - z_pos), 0.0)
        losses = -torch.log(torch.exp(-softplus) + torch.finfo(matrix_dtype(distance, embeddings)).tiny)  # PML's + tiny
        return {"loss": _entry(losses.to(embeddings.dtype), (a1, p), "pos_pair")}
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, any_distance, loss_dict,
                        nan_to_reference=True, dedupe=False, dense_rule=False)


def listed_tuplet(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """TupletMarginLoss on listed pairs (as given: duplicates kept): per positive pair (a, p)
    log(1 + sum_{negative pairs (a, n)} e^{scale (s_an - cos(acos(s_ap) - margin))}) =
    softplus(lse_a - scale cos(acos(s_ap) - margin)), lse_a over a's listed negatives' scale s_an;
    O(pairs), where PML builds pairs x pairs. The angle statistics from the listed pairs."""
    from ..losses._stats import degrees_mean_acos

    module.reset_stats()  # PML's forward does (avg_pos_angle / avg_neg_angle)
    scale, margin = float(module.scale), float(module.margin)

    def loss_dict(x, y, pos_pairs, neg_pairs):
        (a1, p), (a2, n) = pos_pairs, neg_pairs
        if len(a1) == 0 or len(a2) == 0:
            return ZERO_LOSS
        s_pos, s_neg = pair_dots(x, y, a1, p), pair_dots(x, y, a2, n)
        if module.collect_stats:
            with torch.no_grad():
                module.avg_pos_angle, module.avg_neg_angle = degrees_mean_acos(s_pos), degrees_mean_acos(s_neg)
        shifted = torch.cos(torch.acos(s_pos.clamp(-1, 1)) - margin)  # the reference's clamp (PML: NaN past 1)
        neg_lse, has_neg = _row_lse_at(scale * s_neg, a2, x.shape[0], a1)
        losses = torch.where(has_neg, _log1p_exp_as_pml(neg_lse - scale * shifted, embeddings.dtype), 0.0)
        return {"loss": _entry(losses.to(embeddings.dtype).unsqueeze(1), (a1, p), "pos_pair")}
    return _listed_call(module, embeddings, labels, indices_tuple, ref_emb, ref_labels, is_unit_cosine, loss_dict,
                        dedupe=False, dense_rule=False)
