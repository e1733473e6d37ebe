"""Miners with pytorch-metric-learning 2.9.0 semantics (plus MaximumLossMiner).

The returned index sets, and their order, are PML's (DistanceWeightedMiner, UniformHistogramMiner:
the same triplets / pairs for the same torch seed). The maths is in ``dmlkern.reference.miners``.

Differences from PML:

* TripletMarginMiner works on blocks of anchors; AngularMiner, HDCMiner, DistanceWeightedMiner,
  UniformHistogramMiner, BatchHard/EasyHardMiner and PairMarginMiner on row blocks
  (fused/blocked_miners.py); HDCMiner
  past 2M pairs a side lists pairs tied in distance in row-major order;
* inputs are checked by ``dmlkern._validation.validate_inputs``: missing or non-integer labels,
  an empty batch, mismatched ref_emb raise ValueError/TypeError (PML crashes later or accepts
  float labels); AngularMiner/DistanceWeightedMiner with another distance raise
  ``InvalidInputError`` (a ValueError that is also the AssertionError PML raises);
* DistanceWeightedMiner given ref_emb without ref_labels uses ``labels`` for the reference rows
  (PML crashes), and returns empty tuples when every weight is inf/nan (PML crashes);
* MaximumLossMiner (removed from PML in 2.0) is re-defined here; see its docstring.
"""

from .angular_miner import AngularMiner
from .base import BaseMiner, BaseTupleMiner
from .batch_easy_hard_miner import BatchEasyHardMiner
from .batch_hard_miner import BatchHardMiner
from .distance_weighted_miner import DistanceWeightedMiner
from .embeddings_already_packaged_as_triplets import EmbeddingsAlreadyPackagedAsTriplets
from .hdc_miner import HDCMiner
from .maximum_loss_miner import MaximumLossMiner
from .multi_similarity_miner import MultiSimilarityMiner
from .pair_margin_miner import PairMarginMiner
from .triplet_margin_miner import TripletMarginMiner
from .uniform_histogram_miner import UniformHistogramMiner

__all__ = [
    "BaseMiner",
    "BaseTupleMiner",
    "AngularMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "DistanceWeightedMiner",
    "EmbeddingsAlreadyPackagedAsTriplets",
    "HDCMiner",
    "MaximumLossMiner",
    "MultiSimilarityMiner",
    "PairMarginMiner",
    "TripletMarginMiner",
    "UniformHistogramMiner",
]

from .. import _pml_paths  # noqa: E402

_pml_paths.register(__name__, {"base_miner": ["BaseMiner"]})  # PML's file (dmlkern's: miners/base.py)
