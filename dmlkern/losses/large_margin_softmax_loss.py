import math

import numpy as np
import torch

from .._validation import InvalidInputError
from ..distances import CosineSimilarity
from ..fused import margin_softmax
from ..reference import classification_losses as ref
from ._classification_common import ClassWeightsMixin, fused_class_call, new_weight
from .base import BaseMetricLossFunction, WeightRegularizerMixin


class LargeMarginSoftmaxLoss(ClassWeightsMixin, WeightRegularizerMixin, BaseMetricLossFunction):
    """L-Softmax (``W`` (D, C), init ``normal_``; CosineSimilarity required; MeanReducer).

    The target logit's cosine becomes ``(-1)^k cos(m theta) - 2k`` (integer ``margin`` m); all
    logits are multiplied by ``||W_j|| ||x_i|| * scale``. SphereFace, CosFace, ArcFace and
    SubCenterArcFace derive from this class, as in PML.
    """
    _small_problems_to_reference = True

    _labels_required = True
    _label_kind = "indices"  # labels index the class weights (base.py)

    def __init__(self, num_classes, embedding_size, margin=4, scale=1, **kwargs):
        super().__init__(**kwargs)
        if "CosineSimilarity" not in {c.__name__ for c in type(self.distance).__mro__}:
            raise InvalidInputError(f"{type(self).__name__} requires the distance metric to be CosineSimilarity")
        self.margin = margin
        self.num_classes = num_classes
        self.scale = scale
        self.embedding_size = embedding_size
        self.add_to_recordable_attributes(list_of_names=["num_classes", "margin", "scale"], is_stat=False)
        self.add_to_recordable_attributes(name="avg_angle", is_stat=True)
        self.init_margin()
        self.W = new_weight(embedding_size, num_classes)
        self.weight_init_func(self.W)
        self.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none")

    def init_margin(self):
        self.margin = int(self.margin)
        self.max_n = self.margin // 2
        # coefficients of the multiple-angle formula, kept as attributes for PML parity
        self.n_range = torch.tensor(list(range(self.max_n + 1)))
        self.margin_choose_n = torch.tensor([float(math.comb(self.margin, 2 * n)) for n in range(self.max_n + 1)])
        self.cos_powers = torch.tensor([self.margin - 2 * n for n in range(self.max_n + 1)])
        self.alternating = torch.tensor([(-1) ** n for n in range(self.max_n + 1)])

    def get_default_distance(self):
        return CosineSimilarity()

    # -------------------------------------------------------------- maths (reference module)
    def _loss_dict(self, embeddings, labels, indices_tuple):
        return ref.large_margin_softmax_loss_dict(
            embeddings, labels, self.W, indices_tuple, margin=self.margin, scale=self.scale, distance=self.distance
        )

    def get_cosine(self, embeddings):
        return self.distance(embeddings, self.W.t())

    def target_cosine(self, embeddings, labels):
        """cosine[i, labels[i]] of ``get_cosine`` in O(N D), without the N x C matrix."""
        w = self.W.t()[labels]
        return torch.sum(self.distance.normalize(embeddings) * self.distance.normalize(w), dim=1)

    def get_angles(self, cosine_of_target_classes):
        return torch.acos(torch.clamp(cosine_of_target_classes, -1, 1))

    def get_target_mask(self, embeddings, labels):
        return ref._target_mask(labels, self.num_classes, embeddings.dtype)

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        return ref._lm_target(cosine_of_target_classes, self.margin)

    def scale_logits(self, logits, embeddings):
        magnitudes = self.distance.get_norm(self.W, dim=0).unsqueeze(0) * self.distance.get_norm(embeddings).unsqueeze(1)
        return logits * magnitudes * self.scale

    def _start_call(self, embeddings, labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        self.reset_stats()
        if self.collect_stats:
            with torch.no_grad():  # PML: the mean angle between each sample and its class weight
                cosine = torch.clamp(self.target_cosine(embeddings, labels), -1, 1)
                self.avg_angle = math.degrees(torch.mean(torch.acos(cosine)).item())

    # The fused path (dmlkern/fused/margin_softmax.py): one function per loss class, None if none.
    _fused_path = staticmethod(margin_softmax.large_margin_softmax)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if self._fused_path is None:
            return None
        self._start_call(embeddings, labels)
        return fused_class_call(self, self._fused_path, embeddings, labels, indices_tuple,
                                lambda: self.W.t())  # PML's loss always calls distance(embeddings, W.t())

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._start_call(embeddings, labels)
        loss_dict = self._loss_dict(embeddings, labels, indices_tuple)
        self.add_weight_regularization_to_loss_dict(loss_dict)
        return loss_dict

    def get_logits(self, embeddings):
        return self.scale_logits(self.get_cosine(embeddings), embeddings)


def _degrees_to_radians(x):
    return float(np.radians(x))
