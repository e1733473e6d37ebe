"""Circle loss on the engine: one lse2 pass on transform 2 (TRANSFORM_CIRCLE). PML's logits are
-gamma relu(op - s) (s - delta_p) over the positives and gamma relu(s - on) (s - delta_n) over the
negatives, the relu weights detached: the transform's per-set values with relu_pos = op,
shift_pos = delta_p, relu_neg = on, shift_neg = delta_n, scaled by sc_pos = -gamma, sc_neg = gamma
(no offsets); its dv/ds is the detached weight, as PML's autograd gives. Per row
softplus(lse_pos + lse_neg) (nn.Softplus's: z above 20 gives z, gradient 1), an empty set's lse
taken as 0, times 0 for a row lacking a positive or a negative (a NaN row stays NaN, as PML's
product); element losses for any reducer. An indices_tuple runs `listed_pairs.listed_circle`
(CircleLoss's hook chooses)."""
import torch

from ..engine_spec import TRANSFORM_CIRCLE, EngineParams
from ._common import Degenerate, LabelStats, is_unit_cosine
from ._epilogue import (ZERO_LOSS, _at_most_one_pair_each, _empty_as_zero, _log1p_exp, _lse2, _pair_inputs, _per_row,
                        _plain_backend)

_SOFTPLUS_THRESHOLD = 20.0  # torch.nn.Softplus's default, which PML's CircleLoss uses


def circle_params(module):
    """The lse2 pass's EngineParams from the module's attributes as PML reads them at call time."""
    gamma = float(module.gamma)
    return EngineParams(sc_pos=-gamma, sc_neg=gamma, relu_pos=float(module.op), shift_pos=float(module.delta_p),
                        relu_neg=float(module.on), shift_neg=float(module.delta_n))


def circle(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_cosine)
    if backend is None:
        return None
    stats = LabelStats(labels, ref_labels)
    degenerate = Degenerate(labels, _at_most_one_pair_each(stats))  # PML's len <= 1 rule
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    x, y = _pair_inputs(embeddings, ref_emb)
    complete = (stats.pos > 0) & (stats.m - stats.same > 0)
    losses = circle_rows(module, x, y, labels, ref_labels, ref_labels is labels, backend, complete)
    return {"loss": _per_row(degenerate.zero_where(losses), embeddings)}, backend


def circle_rows(module, x, y, labels, ref_labels, exclude_diag, backend, complete):
    """Each row's loss (x, y: unit rows); `complete`: the rows with a positive and a negative."""
    lse = _lse2(x, y, labels, ref_labels, circle_params(module), exclude_diag, backend, transform=TRANSFORM_CIRCLE)
    z = _empty_as_zero(lse[:, 0]) + _empty_as_zero(lse[:, 1])
    losses = torch.where(z > _SOFTPLUS_THRESHOLD, z, _log1p_exp(z))  # PML's nn.Softplus: z above 20
    return losses * complete.to(losses.dtype)

