"""Contrastive loss on the engine: one hinge pass gives each row's sum of the positive pairs' losses
relu(d - pos_margin) and of the negative pairs' relu(neg_margin - d), and how many of each are > 0;
each sub-loss comes back already reduced (AvgNonZeroReducer, MeanReducer, SumReducer). The
per-pair losses are never listed; the op's backward is the engine's hinge backward."""
import torch

from .._determinism import fixed_order_sum
from ..engine_spec import PASS_HINGE
from ..ops import pair_engine as pe
from ..reducers import AvgNonZeroReducer, MeanReducer, SumReducer
from ._common import (Degenerate, LabelStats, all_pairs_plan, branch_free, decline, engine_distance, engine_rows,
                      engine_rows_reason, reduced_sub_loss, value_params)
from ._epilogue import ZERO_LOSS, _already_reduced, _already_reduced_kinds, _at_most_one_pair_each, _plain_backend
from .lazy_pairs import LazyMarginPairs
from .listed_pairs import listed_contrastive
from .pair_margin_contrastive import pair_margin_contrastive

SUB_LOSSES = ("pos_loss", "neg_loss")
_KINDS = {AvgNonZeroReducer: "nonzero", MeanReducer: "mean", SumReducer: "sum"}
NAN_PAIRS = "a NaN pair value (the reference drops or keeps each NaN pair loss as its reducer does)"


def hinge_totals(out):
    """The four columns of a hinge pass summed over the rows (bits independent of the thread count)."""
    return [fixed_order_sum(out[:, k]) for k in range(4)]


def nan_in(*totals):
    """Whether a total is NaN, read only where a branch costs no host sync (eager on the CPU): there
    the reference runs instead (PML's reducers drop or keep each NaN pair loss; the kernels' sums
    hold them all). On CUDA and under torch.compile the NaN propagates (a documented deviation)."""
    return not branch_free(totals[0]) and bool(torch.isnan(torch.stack(totals)).any())


def hinge_plan(module, embeddings, labels, indices_tuple, ref_emb, sub_losses, reducer_kinds, why_not=None):
    """The checks the hinge losses share: (backend, each sub-loss's reducer kind), or None after
    `decline` recorded why. why_not(): the loss's own reason to decline, or None. Any distance
    `_common.engine_rows` expresses (the hinge pass is linear in the value: no bound assumed)."""
    backend = _plain_backend(module, embeddings, labels, indices_tuple, lambda d: engine_distance(d) is not None)
    if backend is None:
        return None
    reason = why_not() if why_not is not None else None
    if reason is not None:
        return decline(module, reason)
    kinds = _already_reduced_kinds(module, sub_losses, reducer_kinds)
    if kinds is None:
        return None
    reason = engine_rows_reason(module.distance, embeddings, ref_emb)
    if reason is not None:
        return decline(module, reason)
    return backend, kinds


def hinge_params(module, distance):
    """The hinge pass's terms from the module's margins, for any distance `_common.engine_rows`
    expresses (`value_params`)."""
    pm, nm = float(module.pos_margin), float(module.neg_margin)
    if distance.is_inverted:  # a similarity: relu(pm - s), relu(s - nm)
        return value_params(distance, sc_pos=-1.0, off_pos=pm, sc_neg=1.0, off_neg=-nm)
    return value_params(distance, sc_pos=1.0, off_pos=-pm, sc_neg=-1.0, off_neg=nm)  # relu(d - pm), relu(nm - d)


def contrastive(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """pos_loss over the positive pairs (i, j): relu(d_ij - pos_margin); neg_loss over the negative
    pairs: relu(neg_margin - d_ij) (CosineSimilarity: relu(pos_margin - s), relu(s - neg_margin)),
    each reduced by its reducer; from the totals of one hinge pass (O(N) statistics). With an
    indices_tuple: only its pairs (`listed_pairs.listed_contrastive`), except CrossBatchMemory's
    all pairs (`_common.all_pairs_plan`: the hinge pass on the rolled queue) and a PairMarginMiner's
    lazy pairs (`pair_margin_contrastive`: row blocks, no pair listed)."""
    pairs = all_pairs_plan(indices_tuple, embeddings, ref_emb)
    if pairs is not None:
        labels, ref_labels, ref_emb, indices_tuple = pairs.labels, pairs.ref_labels, pairs.ref_emb, None
    elif indices_tuple is not None:
        if isinstance(indices_tuple, LazyMarginPairs):  # a PairMarginMiner's pairs: kept, not listed
            out = pair_margin_contrastive(module, indices_tuple, embeddings, ref_emb)
            if not isinstance(out, str):
                return out
        return listed_contrastive(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    plan = hinge_plan(module, embeddings, labels, indices_tuple, ref_emb, SUB_LOSSES, _KINDS)
    if plan is None:
        return None
    backend, kinds = plan
    if pairs is None:
        exclude_diag, stats = ref_labels is labels, LabelStats(labels, ref_labels)
        degenerate = Degenerate(labels, _at_most_one_pair_each(stats))  # PML's len <= 1 rule
    else:
        exclude_diag, stats = pairs.exclude_diag, pairs.stats
        degenerate = Degenerate(labels, pairs.pair_rule())
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    x, y, transform = engine_rows(module.distance, embeddings, ref_emb)
    params = hinge_params(module, module.distance)
    out = pe.engine_forward(x, y, labels, ref_labels, pass_kind=PASS_HINGE, transform=transform, params=params,
                            exclude_diag=exclude_diag, backend=backend)
    pos_sum, pos_nonzero, neg_sum, neg_nonzero = hinge_totals(out)
    if nan_in(pos_sum, neg_sum):
        return decline(module, NAN_PAIRS)
    loss_dict = {}
    for name, total, nonzero, count in (("pos_loss", pos_sum, pos_nonzero, stats.pos_total),
                                        ("neg_loss", neg_sum, neg_nonzero, stats.neg_total)):
        kind, reducer = kinds[name]
        value = reduced_sub_loss(kind, total, nonzero.detach(), count, reducer, embeddings)
        loss_dict[name] = _already_reduced(degenerate.zero_where(value), embeddings)
    return loss_dict, backend
