"""NPairsLoss (PML 2.9.0): cross-entropy over ``S[anchors, positives]`` with one positive pair
per anchor label (the first one), normalised dot product, no temperature. Labels required;
ref_emb not supported.
"""

from ..distances import DotProductSimilarity
from ..fused._common import small_problem
from ..fused.n_pairs import n_pairs
from ..reference import embedding_losses as R
from ..reference.indices import convert_to_pos_pairs_with_unique_labels
from .base import BaseMetricLossFunction


class NPairsLoss(BaseMetricLossFunction):
    _labels_required = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.num_pairs = 0
        self.add_to_recordable_attributes(name="num_pairs", is_stat=True)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        self.reset_stats()
        R.check_n_pairs_ref(embeddings, labels, ref_emb, ref_labels)
        return super().forward(embeddings, labels, indices_tuple)

    def small_problem_reason(self, embeddings, ref_emb):
        return small_problem(embeddings, embeddings, "n_pairs")

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return n_pairs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        pairs = None
        if labels is not None:  # PML records it on every call
            pairs = convert_to_pos_pairs_with_unique_labels(indices_tuple, labels)
            self.num_pairs = len(pairs[0])
        return R.n_pairs_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance=self.distance,
                                   pairs=pairs)

    def get_default_distance(self):
        return DotProductSimilarity()
