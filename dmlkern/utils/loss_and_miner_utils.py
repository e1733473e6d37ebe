"""PML 2.9.0's ``pytorch_metric_learning.utils.loss_and_miner_utils`` (``lmu``): every public
function, with PML's names, signatures and results. The implementations are dmlkern's
(``dmlkern.reference.indices``); the triplet enumeration never builds PML's (B, R, R) tensor.

``neg_inf``, ``pos_inf`` and ``small_val`` live in ``common_functions`` in PML; they are also
importable from here.
"""

from ..reference import indices as _indices
from ..reference.indices import *  # noqa: F401,F403
from ..reference.indices import _triplets_from_masks

__all__ = [*_indices.__all__, "get_all_triplets_indices_vectorized_method", "get_all_triplets_indices_loop_method"]


def get_all_triplets_indices_vectorized_method(all_matches, all_diffs):
    """Every (a, p, n) with ``all_matches[a, p]`` and ``all_diffs[a, n]``, ordered by (a, p, n)."""
    return _triplets_from_masks(all_matches.bool(), all_diffs.bool())


def get_all_triplets_indices_loop_method(labels, all_matches, all_diffs):
    """The same triplets as the vectorized method (PML's form for batches past INT_MAX triplet
    slots; here both use one O(B R + triplets) enumeration). ``labels`` is unused, as it only
    gives PML the device."""
    return _triplets_from_masks(all_matches.bool(), all_diffs.bool())
