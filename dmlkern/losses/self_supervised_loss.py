import torch

from .base_loss_wrapper import BaseLossWrapper


class SelfSupervisedLoss(BaseLossWrapper):
    """``loss(embeddings, ref_emb)`` for two views of the same N inputs, row i of one matching
    row i of the other: labels are ``arange(N)``. ``symmetric=True`` (default) stacks the two views
    into one batch of 2N; otherwise ``ref_emb`` is the loss's reference set. Only the losses in
    ``supported_losses()`` are accepted (others raise ValueError, an Exception as in PML)."""

    def __init__(self, loss, symmetric=True, **kwargs):
        super().__init__(loss=loss, **kwargs)
        self.loss = loss
        self.symmetric = symmetric

    @staticmethod
    def supported_losses():
        return [
            "AngularLoss",
            "CircleLoss",
            "ContrastiveLoss",
            "GeneralizedLiftedStructureLoss",
            "IntraPairVarianceLoss",
            "LiftedStructureLoss",
            "MultiSimilarityLoss",
            "NTXentLoss",
            "SignalToNoiseRatioContrastiveLoss",
            "SupConLoss",
            "TripletMarginLoss",
            "NCALoss",
            "TupletMarginLoss",
        ]

    @classmethod
    def check_loss_support(cls, loss_name):
        if loss_name not in cls.supported_losses():
            raise ValueError(f"SelfSupervisedLoss not supported for {loss_name}")

    def forward(self, embeddings, ref_emb):
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0))
        return self.loss(embeddings=embeddings, labels=labels, ref_emb=ref_emb, ref_labels=labels.clone())
