"""ManifoldLoss (PML 2.9.0, Ensemble Deep Manifold Similarity Learning using Hard Proxies):
``proxies`` (K, l); each row gets a meta class (a proxy): ``indices_tuple`` is read as the
(N,) tensor of meta classes, as in PML, or they are drawn at random (every proxy at least once,
so N >= K). Labels and ref_emb are not supported (ValueError); CosineSimilarity by default."""

import torch

from .._validation import InvalidInputError
from ..distances import CosineSimilarity
from ..reference.more_losses import manifold_loss_dict
from ._classification_common import ref_not_supported
from ._unsupported import labels_not_supported
from .base import BaseMetricLossFunction


class ManifoldLoss(BaseMetricLossFunction):
    def __init__(self, l: int, K: int = 50, lambdaC: float = 1.0, alpha: float = 0.8, margin: float = 5e-4, **kwargs):
        super().__init__(**kwargs)
        if lambdaC < 0:
            raise ValueError(
                f"Incorrect value for lambdaC argument. Given lambdaC={lambdaC} but accepted only non-negative values"
            )
        self.K = K
        self.l = l
        self.proxies = torch.nn.Parameter(torch.randn(K, l))
        self.lambdaC = lambdaC
        self.alpha = alpha
        self.margin = margin
        self._meta_classes = None
        self.add_to_recordable_attributes(list_of_names=["K", "l", "lambdaC", "alpha", "margin"], is_stat=False)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        # indices_tuple holds the meta classes, not index tuples: it bypasses the tuple checks.
        self._meta_classes = indices_tuple
        try:
            return super().forward(embeddings, labels, None, ref_emb, ref_labels)
        finally:
            self._meta_classes = None

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        labels_not_supported(labels, None if ref_labels is labels else ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if embeddings.shape[1] != self.l:
            raise InvalidInputError(f"ManifoldLoss: embeddings have {embeddings.shape[1]} columns, l={self.l}")
        n = len(embeddings)
        meta_classes = self._meta_classes
        if meta_classes is None:
            meta_classes = torch.cat((torch.arange(self.K), torch.randint(0, self.K, (n - self.K,))))
            meta_classes = meta_classes[torch.randperm(n)]
        return manifold_loss_dict(
            embeddings, self.proxies, torch.as_tensor(meta_classes, device=embeddings.device), lambdaC=self.lambdaC, alpha=self.alpha,
            margin=self.margin, distance=self.distance,
        )

    def get_default_distance(self):
        return CosineSimilarity()
