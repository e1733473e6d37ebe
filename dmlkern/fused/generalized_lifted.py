"""Generalized Lifted Structure loss on the engine: relu(lse_pos + lse_neg) per row from one lse2
pass, on any distance `_common.engine_rows` expresses (PML's default: the unit Euclidean)."""
import torch

from ..engine_spec import TRANSFORM_UNIT_DISTANCE, EngineParams
from ._common import Degenerate, LabelStats, engine_rows, engine_transform, value_params
from ._epilogue import ZERO_LOSS, _at_most_one_pair_each, _empty_as_zero, _lse2, _per_row, _rows_backend
from .listed_pairs import listed_generalized_lifted


def generalized_lifted_structure(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    if indices_tuple is not None:  # only the listed pairs (O(pairs))
        return listed_generalized_lifted(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    backend = _rows_backend(module, embeddings, labels, indices_tuple, ref_emb)
    if backend is None:
        return None
    exclude_diag = ref_labels is labels
    degenerate = Degenerate(labels, _at_most_one_pair_each(LabelStats(labels, ref_labels)))
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    x, y, _ = engine_rows(module.distance, embeddings, ref_emb)
    losses = degenerate.zero_where(generalized_lifted_rows(module, x, y, labels, ref_labels, exclude_diag, backend,
                                                           module.distance))
    return {"loss": _per_row(losses, embeddings)}, backend


def generalized_lifted_rows(module, x, y, labels, ref_labels, exclude_diag, backend, distance=None):
    """Each row's relu(lse_pos + lse_neg) (x, y: `engine_rows` of `distance`; None: the unit
    Euclidean distance on unit rows). PML's logits are distance.margin(mat, pos_margin) and
    distance.margin(neg_margin, mat): d - pm and nm - d, or pm - s and s - nm for a similarity."""
    pm, nm = float(module.pos_margin), float(module.neg_margin)
    if distance is None:
        params, transform = EngineParams(sc_pos=1.0, off_pos=-pm, sc_neg=-1.0, off_neg=nm), TRANSFORM_UNIT_DISTANCE
    else:
        sign = -1.0 if distance.is_inverted else 1.0
        params = value_params(distance, sc_pos=sign, off_pos=-sign * pm, sc_neg=-sign, off_neg=sign * nm)
        transform = engine_transform(distance)
    lse = _lse2(x, y, labels, ref_labels, params, exclude_diag, backend, transform=transform)
    return torch.relu(_empty_as_zero(lse[:, 0]) + _empty_as_zero(lse[:, 1]))
