from .base import BaseMetricLossFunction, GenericPairLoss, WeightRegularizerMixin, EmbeddingRegularizerMixin  # noqa: F401
from .contrastive_loss import ContrastiveLoss  # noqa: F401
from .triplet_margin_loss import TripletMarginLoss  # noqa: F401
from .margin_loss import MarginLoss  # noqa: F401
from .multi_similarity_loss import MultiSimilarityLoss  # noqa: F401
from .lifted_structure_loss import LiftedStructureLoss  # noqa: F401
from .generalized_lifted_structure_loss import GeneralizedLiftedStructureLoss  # noqa: F401
from .n_pairs_loss import NPairsLoss  # noqa: F401
from .ntxent_loss import NTXentLoss  # noqa: F401
from .supcon_loss import SupConLoss  # noqa: F401
from .tuplet_margin_loss import TupletMarginLoss  # noqa: F401
from .angular_loss import AngularLoss  # noqa: F401
from .nca_loss import NCALoss  # noqa: F401
from .circle_loss import CircleLoss  # noqa: F401
from .proxy_nca_loss import ProxyNCALoss  # noqa: F401
from .proxy_anchor_loss import ProxyAnchorLoss  # noqa: F401
from .soft_triple_loss import SoftTripleLoss  # noqa: F401
from .large_margin_softmax_loss import LargeMarginSoftmaxLoss  # noqa: F401
from .sphereface_loss import SphereFaceLoss  # noqa: F401
from .cosface_loss import CosFaceLoss  # noqa: F401
from .arcface_loss import ArcFaceLoss  # noqa: F401
from .subcenter_arcface_loss import SubCenterArcFaceLoss  # noqa: F401
from .normalized_softmax_loss import NormalizedSoftmaxLoss  # noqa: F401
from .center_loss import CenterLoss  # noqa: F401
from .softmax_loss import SoftmaxLoss  # noqa: F401
from .base_loss_wrapper import BaseLossWrapper  # noqa: F401
from .multiple_losses import MultipleLosses  # noqa: F401
from .cross_batch_memory import CrossBatchMemory  # noqa: F401
from .self_supervised_loss import SelfSupervisedLoss  # noqa: F401
from .dynamic_soft_margin_loss import DynamicSoftMarginLoss  # noqa: F401
from .fast_ap_loss import FastAPLoss  # noqa: F401
from .histogram_loss import HistogramLoss  # noqa: F401
from .instance_loss import InstanceLoss  # noqa: F401
from .intra_pair_variance_loss import IntraPairVarianceLoss  # noqa: F401
from .manifold_loss import ManifoldLoss  # noqa: F401
from .p2s_grad_loss import P2SGradLoss  # noqa: F401
from .pnp_loss import PNPLoss  # noqa: F401
from .ranked_list_loss import RankedListLoss  # noqa: F401
from .signal_to_noise_ratio_losses import SignalToNoiseRatioContrastiveLoss  # noqa: F401
from .smooth_ap import SmoothAPLoss  # noqa: F401
from .tcm_loss import ThresholdConsistentMarginLoss  # noqa: F401
from .vicreg_loss import VICRegLoss  # noqa: F401

from .. import _pml_paths  # noqa: E402
from . import base as _base  # noqa: E402

# PML's files that dmlkern keeps elsewhere, and GeneralizedLiftedStructureLoss, which PML defines
# in lifted_structure_loss.py too
_pml_paths.register(__name__, {"base_metric_loss_function": ["BaseMetricLossFunction"],
                               "generic_pair_loss": ["GenericPairLoss"], "proxy_losses": ["ProxyNCALoss"],
                               "lifted_structure_loss": ["GeneralizedLiftedStructureLoss"]})
_pml_paths.register(__name__, {"mixins": ["WeightMixin", "WeightRegularizerMixin", "EmbeddingRegularizerMixin"]},
                    source=_base)
