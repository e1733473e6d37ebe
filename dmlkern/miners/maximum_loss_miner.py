import torch

from ..reference.indices import get_all_pairs_indices
from ..reference.miners import maximum_loss_miner
from .base import BaseTupleMiner


class MaximumLossMiner(BaseTupleMiner):
    """Among ``num_trials`` random subsets of the candidate tuples, return the one on which
    ``loss`` is largest (PML < 2.0 had this miner; it was removed in 2.0).

    Candidates: the output of ``miner`` when given (pairs or triplets), else all pairs of the
    batch ``(a1, p, a2, n)``.

    Subset sizes (``subset_fraction``, default 0.5): per trial,
    ``ceil(subset_fraction * #triplets)`` triplets, or ``ceil(subset_fraction * #positive pairs)``
    positive pairs and ``ceil(subset_fraction * #negative pairs)`` negative pairs drawn
    independently; uniform without replacement, at least one of each non-empty kind, candidate
    order kept. The loss is evaluated as
    ``loss(embeddings, labels, indices_tuple=subset[, ref_emb=..., ref_labels=...])`` under
    ``torch.no_grad()``; ties go to the earliest trial. Randomness: the global torch (CPU) RNG.
    """

    def __init__(self, loss, miner=None, num_trials=5, subset_fraction=0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0 < subset_fraction <= 1:
            raise ValueError("subset_fraction must be in (0, 1]")
        if int(num_trials) < 1:
            raise ValueError("num_trials must be >= 1")
        self.loss = loss
        self.miner = miner
        self.num_trials = int(num_trials)
        self.subset_fraction = float(subset_fraction)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        own_ref = ref_emb is embeddings
        if self.miner is not None:
            if own_ref:
                candidates = self.miner(embeddings, labels)
            else:
                candidates = self.miner(embeddings, labels, ref_emb, ref_labels)
        else:
            candidates = get_all_pairs_indices(labels, ref_labels)
        ref_kwargs = {} if own_ref else {"ref_emb": ref_emb, "ref_labels": ref_labels}

        def loss_fn(subset):
            with torch.no_grad():
                return self.loss(embeddings, labels, indices_tuple=subset, **ref_kwargs)

        return maximum_loss_miner(loss_fn, candidates, self.num_trials, self.subset_fraction)
