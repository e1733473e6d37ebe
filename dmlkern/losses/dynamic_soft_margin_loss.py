"""DynamicSoftMarginLoss (PML 2.9.0, CDF-based dynamic soft margin): the mean of x * CDF(x) over
x = d_ap - d_an, with the CDF from a running histogram of x (``hist_``, ``num_bins`` bins on
[min_val, -min_val], updated with ``momentum``). With labels every triplet is used
(``indices_tuple`` as triplets / pairs); without labels row i of ``embeddings`` and row i of
``ref_emb`` are a positive pair. Requires a normalised LpDistance(p=2).

Deviations from PML (which raises in both cases): ``hist_`` is kept without its autograd
history, so a second backward works (PML: "backward through the graph a second time"); a
difference in the histogram's last bin or outside its range is counted in the first / last bin
(PML: index error); without labels the backward works (PML: an in-place write breaks it).

With labels and no indices_tuple or ref_emb the triplets are never listed (`fused/dynamic_soft_margin.py`,
last_backend "blocked"): per bin of the differences, their count and sum, from row blocks.
"""

import torch

from ..fused.dynamic_soft_margin import dynamic_soft_margin as _fused
from ..reference.embedding_losses import require_distance
from ..reference.more_losses import soft_margin_differences, soft_margin_histogram, soft_margin_weigh
from .base import BaseMetricLossFunction


class DynamicSoftMarginLoss(BaseMetricLossFunction):
    def __init__(self, min_val=-2.0, num_bins=10, momentum=0.01, **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "LpDistance", normalize_embeddings=True, p=2)
        self.min_val = min_val
        self.num_bins = int(num_bins)
        self.delta = 2 * abs(min_val) / num_bins
        self.momentum = momentum
        self.hist_ = torch.zeros((num_bins,))
        self.add_to_recordable_attributes(list_of_names=["num_bins"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return _fused(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.hist_ = self.hist_.to(device=embeddings.device, dtype=embeddings.dtype)
        diffs = soft_margin_differences(embeddings, labels, indices_tuple, ref_emb, ref_labels, self.distance)
        if len(diffs) == 0:
            return self.zero_losses()
        hist = soft_margin_histogram(self.hist_, diffs, self.min_val, self.delta, self.momentum)
        self.hist_ = hist.detach()
        loss = soft_margin_weigh(hist, diffs, self.min_val, self.delta).mean()
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
