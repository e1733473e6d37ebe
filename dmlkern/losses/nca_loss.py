"""NCALoss (PML 2.9.0): ``-log sum_{same label} softmax(scale * -d^2)`` per query, with
``LpDistance(power=2)`` (normalised) by default and the diagonal excluded when the references are
the batch. Rows without any positive probability are dropped.

Deviation: when no row has a positive, the loss is the grad-carrying zero (PML: NaN); with
DoNothingReducer the dict holds PML's empty entry.
"""

from ..distances import LpDistance
from ..fused._epilogue import reduces_empty_on_graph, returns_loss_dict
from ..fused.nca import nca
from ..reference import embedding_losses as R
from .base import BaseMetricLossFunction


class NCALoss(BaseMetricLossFunction):
    # labels are checked after the single-sample short-circuit, as in PML
    _labels_required = None
    _reference_for_empty_ref = True

    def __init__(self, softmax_scale=1, **kwargs):
        super().__init__(**kwargs)
        self.softmax_scale = softmax_scale
        self.add_to_recordable_attributes(list_of_names=["softmax_scale"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return nca(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.nca_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, softmax_scale=self.softmax_scale, distance=self.distance,
            empty_entry=returns_loss_dict(self), zero_on_graph=reduces_empty_on_graph(self),
        )

    def get_default_distance(self):
        return LpDistance(power=2)
