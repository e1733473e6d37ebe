"""Regularizers with pytorch-metric-learning 2.9.0 semantics (``pytorch_metric_learning.regularizers``).

A regularizer maps a (N, D) tensor (embeddings, or a loss's class weights) to a loss: its
``compute_loss(x)`` gives a loss dict that ``self.reducer`` reduces (labels: ``arange(N)``). A loss
takes one as ``embedding_regularizer=`` (every loss) or ``weight_regularizer=`` (the losses with
class weights) and adds the sub-loss ``embedding_reg_loss`` / ``weight_reg_loss`` =
regularizer(x) * reg_weight, as PML does (``dmlkern.losses.base``).

* ``LpRegularizer(p=2, power=1)``: per row ``||x||_p ** power``, MeanReducer.
* ``ZeroMeanRegularizer``: per row ``|sum_d x_d|``.
* ``CenterInvariantRegularizer``: per row ``(||w||^2 - mean ||w||^2)^2 / 4``; requires
  ``LpDistance(power=1, normalize_embeddings=False)`` (its norm).
* ``RegularFaceRegularizer``: per row the similarity to its most similar other row; requires a
  similarity (default CosineSimilarity).
* ``SparseCentersRegularizer(num_classes, centers_per_class)`` (SoftTriple's centers): over the
  pairs of centers of one class, ``sqrt(2 + tiny - min(2 s, 2))`` summed and divided by 2 * their
  number (DivisorReducer); statistics ``same_class_center_sim`` / ``diff_class_center_sim``.

Distance requirements raise ``InvalidInputError`` (a ValueError that is also PML's AssertionError).
"""

import torch

from . import _pml_paths
from ._validation import InvalidInputError
from .distances import CosineSimilarity, LpDistance
from .reducers import DivisorReducer, MeanReducer, resolve_reducer
from .reference.embedding_losses import require_distance
from .utils.common_functions import RecordsMixin, neg_inf, small_val, torch_arange_from_size

__all__ = [
    "BaseRegularizer",
    "LpRegularizer",
    "ZeroMeanRegularizer",
    "CenterInvariantRegularizer",
    "RegularFaceRegularizer",
    "SparseCentersRegularizer",
]


def _per_row(losses, x):
    return {"loss": {"losses": losses, "indices": torch_arange_from_size(x), "reduction_type": "element"}}


class BaseRegularizer(RecordsMixin, torch.nn.Module):
    def __init__(self, distance=None, reducer=None, collect_stats=None, **kwargs):
        super().__init__(**kwargs)
        self._init_records(collect_stats)
        self.distance = self.get_default_distance() if distance is None else distance
        self.set_reducer(reducer)

    def get_default_distance(self):
        return LpDistance(p=2)

    def get_default_reducer(self):
        return MeanReducer()

    def sub_loss_names(self):
        return ["loss"]

    def set_reducer(self, reducer):
        self.reducer = resolve_reducer(reducer, self.sub_loss_names(), self.get_default_reducer)

    def compute_loss(self, x):
        raise NotImplementedError

    def forward(self, x):
        """x: (N, D); returns the reduced regularization loss."""
        self.reset_stats()
        return self.reducer(self.compute_loss(x), x, torch_arange_from_size(x))


class LpRegularizer(BaseRegularizer):
    def __init__(self, p=2, power=1, **kwargs):
        super().__init__(**kwargs)
        self.p = p
        self.power = power
        self.add_to_recordable_attributes(list_of_names=["p", "power"], is_stat=False)

    def compute_loss(self, embeddings):
        reg = torch.norm(embeddings, p=self.p, dim=1)
        if self.power != 1:
            reg = reg**self.power
        return _per_row(reg, embeddings)


class ZeroMeanRegularizer(BaseRegularizer):
    def compute_loss(self, embeddings):
        return _per_row(torch.abs(torch.sum(embeddings, dim=1)), embeddings)


class CenterInvariantRegularizer(BaseRegularizer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "LpDistance", power=1, normalize_embeddings=False)

    def compute_loss(self, weights):
        sq_norms = self.distance.get_norm(weights) ** 2
        return _per_row((sq_norms - torch.mean(sq_norms)) ** 2 / 4, weights)

    def get_default_distance(self):
        return LpDistance(power=1, normalize_embeddings=False)


class RegularFaceRegularizer(BaseRegularizer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not self.distance.is_inverted:
            raise InvalidInputError("RegularFaceRegularizer requires a similarity (distance.is_inverted)")

    def compute_loss(self, weights):
        sims = self.distance(weights)
        with torch.no_grad():  # each row's most similar other row
            others = sims.clone()
            others.fill_diagonal_(neg_inf(weights.dtype))
            _, nearest = self.distance.smallest_dist(others, dim=1)
        return _per_row(sims.gather(1, nearest.unsqueeze(1)).squeeze(1), weights)

    def get_default_distance(self):
        return CosineSimilarity()


class SparseCentersRegularizer(BaseRegularizer):
    def __init__(self, num_classes, centers_per_class, **kwargs):
        super().__init__(**kwargs)
        if not centers_per_class > 1:
            raise InvalidInputError(f"SparseCentersRegularizer needs centers_per_class > 1, got {centers_per_class}")
        require_distance(type(self).__name__, self.distance, "CosineSimilarity")
        self.set_class_masks(num_classes, centers_per_class)
        # As in PML, these two recordable attributes are never assigned: they read 0.
        self.add_to_recordable_attributes(list_of_names=["num_classes", "centers_per_class"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["same_class_center_sim", "diff_class_center_sim"], is_stat=True
        )

    def set_class_masks(self, num_classes, centers_per_class):
        """same_class_mask: the pairs (i < j) of one class's centers; diff_class_mask: pairs of
        centers of different classes."""
        cls = torch.arange(num_classes * centers_per_class) // centers_per_class
        same = cls.unsqueeze(1) == cls.unsqueeze(0)
        self.same_class_mask = torch.triu(same, diagonal=1)
        self.diff_class_mask = ~same

    def compute_loss(self, weights):
        sims = self.distance(weights)
        same = self.same_class_mask.to(sims.device)
        masked = torch.clamp(2.0 * sims[same], max=2)
        reg = torch.sqrt(2.0 + small_val(weights.dtype) - masked)
        self.set_stats(sims)
        return {
            "loss": {
                "losses": reg,
                "indices": torch_arange_from_size(reg),
                "reduction_type": "element",
                "divisor": 2 * torch.sum(same),
            }
        }

    def set_stats(self, sims):
        if self.collect_stats:
            with torch.no_grad():
                self.same_class_center_sim = torch.mean(sims[self.same_class_mask.to(sims.device)]).item()
                self.diff_class_center_sim = torch.mean(sims[self.diff_class_mask.to(sims.device)]).item()

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_reducer(self):
        return DivisorReducer()


_pml_paths.register(__name__, {
    "base_regularizer": ["BaseRegularizer"], "center_invariant_regularizer": ["CenterInvariantRegularizer"],
    "lp_regularizer": ["LpRegularizer"], "regular_face_regularizer": ["RegularFaceRegularizer"],
    "sparse_centers_regularizer": ["SparseCentersRegularizer"], "zero_mean_regularizer": ["ZeroMeanRegularizer"],
})
