"""TupletMargin on the engine: per positive pair (a, p),
log(1 + sum_{n: label_n != label_a} e^(scale (s_an - cos(acos(s_ap) - margin))))
= softplus(L_a - scale cos(acos(s_ap) - margin)), with L_a = log sum_n e^(scale s_an) from one lse2
pass (the negatives' column); s_ap on the listed positive pairs only (O(pairs D), chunked). PML
builds a (pairs x negative pairs) matrix."""
import torch

from ..engine_spec import EngineParams
from ._common import decline, is_unit_cosine
from ._epilogue import (ZERO_LOSS, _log1p_exp_as_pml, _pair_inputs, _plain_backend, _positive_pairs_and_neg_lse,
                        _stats_with_pair_rule)
from .listed_pairs import listed_tuplet


def tuplet_margin(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    if indices_tuple is not None:  # only the listed pairs (O(pairs))
        return listed_tuplet(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_cosine)
    if backend is None:
        return None
    module.reset_stats()  # PML's forward does (avg_pos_angle / avg_neg_angle)
    if module.collect_stats:
        return decline(module, "collect_stats with TupletMarginLoss (avg_neg_angle needs every negative pair)")
    if ref_labels.shape[0] != ref_emb.shape[0]:
        return decline(module, "ref_labels of another length than ref_emb")
    exclude_diag = ref_labels is labels  # PML's get_all_pairs_indices: the self-pairs by identity
    stats, degenerate = _stats_with_pair_rule(labels, ref_labels)
    if degenerate.now():  # the pair list has a data-dependent size anyway
        return ZERO_LOSS
    scale, margin = float(module.scale), float(module.margin)
    x, y = _pair_inputs(embeddings, ref_emb)
    a, p, s_ap, neg_lse = _positive_pairs_and_neg_lse(x, y, labels, ref_labels, EngineParams(sc_pos=0.0, sc_neg=scale),
                                                      exclude_diag, backend)
    shifted = torch.cos(torch.acos(s_ap.clamp(-1, 1)) - margin)  # the reference's clamp (PML: NaN past 1)
    # PML's exact zeros where 1 + e^z rounds to 1; an anchor without negatives: 0, as PML's masked
    # logsumexp (also for a NaN s_ap, whose -inf - NaN would be NaN)
    losses = torch.where(torch.isneginf(neg_lse), 0.0, _log1p_exp_as_pml(neg_lse - scale * shifted, embeddings.dtype))
    return {"loss": {"losses": losses.to(embeddings.dtype).unsqueeze(1), "indices": (a, p),
                     "reduction_type": "pos_pair"}}, backend
