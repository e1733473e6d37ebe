"""Multi-Similarity loss on the engine: per row softplus(lse_pos)/alpha + softplus(lse_neg)/beta from
one lse2 pass; with MultiSimilarityMiner's lazy pairs the kernel mines them itself (an extrema pass
first, then lse2 with the miner's masks)."""
import torch

from ..engine_spec import MINING_MULTI_SIMILARITY, MINING_NONE, PASS_EXTREMA, EngineParams
from ..ops import pair_engine as pe
from ._common import (Degenerate, LabelStats, all_pairs_plan, decline, engine_distance, engine_rows,
                      engine_rows_reason, is_unit_cosine, no_pos_or_neg, value_params)
from ._epilogue import ZERO_LOSS, _at_most_one_pair_each, _engine_or_decline, _log1p_exp_as_pml, _lse2, _per_row
from .lazy_pairs import LazyMinedPairs
from .listed_pairs import listed_multi_similarity

_ROW_CHUNK = 4096


def _row_dots(v, y):
    """y @ v as per-row products and sums, in chunks of rows (O(chunk D) memory). Not a BLAS
    gemv: MKL's splits the products by the thread count on a CPU (bits differ between 1 and 2
    threads); a row's sum over D here is one thread's, in one order."""
    if y.device.type != "cpu":
        return y @ v
    return torch.cat([(y[c:c + _ROW_CHUNK] * v).sum(dim=1) for c in range(0, max(len(y), 1), _ROW_CHUNK)])


def _mined_count_in_one_row(x, y, labels, ref_labels, row, exclude_diag, keep):
    """How many pairs the miner kept in query row `row` (a 1-element index tensor): one row of
    similarities, O(M D). `keep(sim, same_label)` is the miner's rule for that row."""
    sim = _row_dots(x.index_select(0, row)[0], y)
    same = labels.index_select(0, row) == ref_labels
    kept = keep(sim, same)
    if exclude_diag:
        kept = kept & (torch.arange(len(ref_labels), device=ref_labels.device) != row)
    return kept.sum()


def _at_most_one_mined_pair_each(x, y, labels, ref_labels, row_in, lse, eps, exclude_diag):
    """PML's `len <= 1` rule on the miner's pairs: at most one positive and at most one negative
    pair in the whole batch (then the loss is zero). A row whose masked LSE is finite has at least
    one mined pair, so two such rows decide at once; with exactly one, count that row's pairs.
    Tensor valued: no host sync, traceable by torch.compile."""
    has_pos, has_neg = torch.isfinite(lse[:, 0]), torch.isfinite(lse[:, 1])
    # The first such row, as a 1-element index (tensor indexing, not .item(): no host sync).
    pos_row = torch.argmax(has_pos.to(torch.int8)).view(1)
    neg_row = torch.argmax(has_neg.to(torch.int8)).view(1)
    max_neg, min_pos = row_in[:, 0].index_select(0, pos_row), row_in[:, 1].index_select(0, neg_row)

    def pos_kept(sim, same):  # s_ap - eps < max over the row's negatives
        return same & (sim.to(max_neg.dtype) - eps < max_neg)

    def neg_kept(sim, same):  # s_an + eps > min over the row's positives
        return ~same & (sim.to(min_pos.dtype) + eps > min_pos)

    pos_count = _mined_count_in_one_row(x, y, labels, ref_labels, pos_row, exclude_diag, pos_kept)
    neg_count = _mined_count_in_one_row(x, y, labels, ref_labels, neg_row, exclude_diag, neg_kept)
    rows_pos, rows_neg = has_pos.sum(), has_neg.sum()
    pos_le1 = (rows_pos == 0) | ((rows_pos == 1) & (pos_count <= 1))
    neg_le1 = (rows_neg == 0) | ((rows_neg == 1) & (neg_count <= 1))
    return pos_le1 & neg_le1


def _mined_pairs_in_kernel(module, mined, embeddings, ref_emb):
    """Whether the kernel can mine the pairs of `mined` (the miner's lazy result) itself; else
    records why not. It can when the miner's distance is the unit cosine, its diagonal rule is
    the kernel's, and the embeddings still hold the values mined on."""
    if not is_unit_cosine(mined.distance):
        return decline(module, f"the miner's distance {type(mined.distance).__name__} is not the default")
    if not mined.kernel_can_mine:
        return decline(module, "the miner's ref_emb / ref_labels drop self-pairs unlike the kernel can")
    if not mined.shape_matches(embeddings, ref_emb) or not mined.holds_inputs(embeddings, ref_emb):
        return decline(module, "the miner's pairs come from other embeddings (or they changed since mining)")
    return True


def multi_similarity_params(module, eps=0.0, distance=None):
    """The lse2 pass's logits from the module's attributes: alpha(base - s) / beta(s - base) for a
    similarity (None: the unit cosine), alpha(d - base) / beta(base - d) for a distance (PML's
    distance.margin), through `value_params`."""
    a, b, base = float(module.alpha), float(module.beta), float(module.base)
    if distance is None:
        return EngineParams(sc_pos=-a, off_pos=a * base, sc_neg=b, off_neg=-b * base, eps=eps)
    if not distance.is_inverted:
        return value_params(distance, sc_pos=a, off_pos=-a * base, sc_neg=-b, off_neg=b * base, eps=eps)
    return value_params(distance, sc_pos=-a, off_pos=a * base, sc_neg=b, off_neg=-b * base, eps=eps)


def multi_similarity(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _engine_or_decline(module, embeddings)
    if backend is None:
        return None
    if engine_distance(module.distance) is None:
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    mining_eps = None
    plan = all_pairs_plan(indices_tuple, embeddings, ref_emb)
    if plan is not None:  # CrossBatchMemory's pairs: the engine on the rolled queue
        labels, ref_labels, ref_emb, indices_tuple = plan.labels, plan.ref_labels, plan.ref_emb, None
    if indices_tuple is not None:
        if not isinstance(indices_tuple, LazyMinedPairs):  # any other pairs: only those (O(pairs))
            return listed_multi_similarity(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if not is_unit_cosine(module.distance):  # the kernel mines on the loss's values: the miner's pairs
            return listed_multi_similarity(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if not _mined_pairs_in_kernel(module, indices_tuple, embeddings, ref_emb):
            return None
        # The pairs are the miner's: its labels and epsilon as they were at mining time.
        labels, ref_labels = indices_tuple.mining_labels()
        mining_eps = indices_tuple.epsilon
    elif labels is None:
        return decline(module, "no labels")
    reason = engine_rows_reason(module.distance, embeddings, ref_emb)
    if reason is not None:
        return decline(module, reason)
    exclude_diag = ref_labels is labels if plan is None else plan.exclude_diag
    stats = LabelStats(labels, ref_labels) if plan is None else plan.stats
    if mining_eps is None:  # PML's `len <= 1` rule
        degenerate = Degenerate(labels, _at_most_one_pair_each(stats) if plan is None else plan.pair_rule())
    else:  # the miner returns no pairs at all. (Implied by the mined-pairs rule below, which the
        # branch-free path applies; eager on the CPU this returns before any kernel.)
        degenerate = Degenerate(labels, False)
        if not degenerate.branchless:
            degenerate.include(lambda: no_pos_or_neg(stats))
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    x, y, transform = engine_rows(module.distance, embeddings, ref_emb)
    params = multi_similarity_params(module, mining_eps or 0.0, module.distance)
    a, b = float(module.alpha), float(module.beta)
    row_in, mining = None, MINING_NONE
    if mining_eps is not None:
        with torch.no_grad():
            extrema = pe.engine_forward(x, y, labels, ref_labels, pass_kind=PASS_EXTREMA, params=params,
                                        exclude_diag=exclude_diag, backend=backend)
        row_in = torch.cat([extrema, torch.zeros_like(extrema[:, :1])], dim=1)
        mining = MINING_MULTI_SIMILARITY
    lse = _lse2(x, y, labels, ref_labels, params, exclude_diag, backend, row_in, transform=transform, mining=mining)
    if mining_eps is not None:
        degenerate.include(lambda: _at_most_one_mined_pair_each(x, y, labels, ref_labels, row_in, lse, mining_eps,
                                                                exclude_diag))
        if degenerate.returns_zero_now():
            return ZERO_LOSS
    softplus = _log1p_exp_as_pml(lse, embeddings.dtype)  # both columns in one op (each op is a GPU launch)
    losses = degenerate.zero_where(softplus[:, 0] / a + softplus[:, 1] / b)
    return {"loss": _per_row(losses, embeddings)}, backend
