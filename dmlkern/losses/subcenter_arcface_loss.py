import math

import torch

from ..fused import grouped_classes
from ..reference import classification_losses as ref
from .arcface_loss import ArcFaceLoss


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace: ``W`` (D, num_classes * sub_centers); column ``c * K + k`` is
    sub-center k of class c; each class's cosine is the max over its sub-centers."""

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, sub_centers=3, **kwargs):
        super().__init__(
            num_classes=num_classes * sub_centers, embedding_size=embedding_size, margin=margin, scale=scale, **kwargs
        )
        self.sub_centers = sub_centers
        self.num_classes = num_classes

    _fused_path = staticmethod(grouped_classes.subcenter_arcface)

    def _loss_dict(self, embeddings, labels, indices_tuple):
        return ref.subcenter_arcface_loss_dict(
            embeddings, labels, self.W, indices_tuple, num_classes=self.num_classes, sub_centers=self.sub_centers,
            margin_radians=self.margin, scale=self.scale, distance=self.distance,
        )

    def get_cosine(self, embeddings):
        return ref.subcenter_cosine(
            embeddings, self.W, num_classes=self.num_classes, sub_centers=self.sub_centers, distance=self.distance
        )

    def target_cosine(self, embeddings, labels):
        """The cosine to the nearest sub-center of each sample's class, in O(N K D)."""
        K = self.sub_centers
        w = self.W.t()[(labels * K).unsqueeze(1) + torch.arange(K, device=labels.device)]  # (N, K, D)
        x = self.distance.normalize(embeddings).unsqueeze(1)
        return torch.sum(x * self.distance.normalize(w, dim=2), dim=2).max(dim=1).values

    def get_outliers(self, embeddings, labels, threshold=75, return_dominant_centers=True):
        """Samples far from their class's dominant sub-center.

        For each class present in ``labels``: every sample votes for its nearest sub-center; the
        most voted one (lowest index on ties) is the class's dominant center; samples whose
        cosine to it is below ``cos(threshold degrees)`` are outliers.

        Returns ``(outliers, dominant_centers)``: outliers a 1-D LongTensor of batch indices
        (class by class, ascending within a class); dominant_centers (D, num_classes), zeros
        for classes absent from the batch. As in PML the tuple is returned whatever
        ``return_dominant_centers`` says.
        """
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError("labels must be a 1D tensor with one entry per embedding")
        dtype, device = embeddings.dtype, embeddings.device
        self.cast_types(dtype, device)
        labels = labels.to(device)
        cos_threshold = math.cos(math.radians(threshold))
        K = self.sub_centers
        outliers = []
        dominant = torch.zeros(self.W.shape[0], self.num_classes, dtype=dtype, device=device)
        with torch.no_grad():
            for c in range(self.num_classes):
                members = torch.where(labels == c)[0]
                if len(members) == 0:
                    continue
                centers = self.W[:, c * K : (c + 1) * K]
                cos = self.distance(embeddings[members], centers.t())
                votes = torch.bincount(torch.argmax(cos, dim=1), minlength=K)
                best = int(torch.argmax(votes))
                dominant[:, c] = centers[:, best]
                outliers.append(members[cos[:, best] < cos_threshold])
        outliers = torch.cat(outliers) if outliers else torch.empty(0, dtype=torch.long, device=device)
        return outliers, dominant
