"""Generalized Lifted Structure loss on the engine: relu(lse_pos + lse_neg) per row from one lse2
pass over unit Euclidean distances."""
import torch

from ..engine_spec import TRANSFORM_UNIT_DISTANCE, EngineParams
from . import _common
from ._common import Degenerate, LabelStats, decline, is_unit_euclidean
from ._epilogue import (SHORT_ROWS, ZERO_LOSS, _at_most_one_pair_each, _empty_as_zero, _lse2, _pair_inputs,
                        _per_row, _plain_backend)
from .listed_pairs import listed_generalized_lifted


def generalized_lifted_structure(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    if indices_tuple is not None:  # only the listed pairs (O(pairs))
        return listed_generalized_lifted(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_euclidean)
    if backend is None:
        return None
    if _common.has_short_rows(embeddings, ref_emb):
        return decline(module, SHORT_ROWS)
    exclude_diag = ref_labels is labels
    degenerate = Degenerate(labels, _at_most_one_pair_each(LabelStats(labels, ref_labels)))
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    x, y = _pair_inputs(embeddings, ref_emb)
    losses = degenerate.zero_where(generalized_lifted_rows(module, x, y, labels, ref_labels, exclude_diag, backend))
    return {"loss": _per_row(losses, embeddings)}, backend


def generalized_lifted_rows(module, x, y, labels, ref_labels, exclude_diag, backend):
    """Each row's relu(lse_pos + lse_neg) over unit Euclidean distances (x, y: unit rows)."""
    pm, nm = float(module.pos_margin), float(module.neg_margin)
    lse = _lse2(x, y, labels, ref_labels, EngineParams(sc_pos=1.0, off_pos=-pm, sc_neg=-1.0, off_neg=nm), exclude_diag,
                backend, transform=TRANSFORM_UNIT_DISTANCE)
    return torch.relu(_empty_as_zero(lse[:, 0]) + _empty_as_zero(lse[:, 1]))
