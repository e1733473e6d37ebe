from ..fused import blocked_miners
from ..reference.indices import convert_to_pairs
from .base import BaseTupleMiner


class HDCMiner(BaseTupleMiner):
    """Hard-Aware Deeply Cascaded mining: keeps the ``ceil(filter_percentage * n)`` globally
    hardest positive and negative pairs, starting from all pairs or from the pairs given to
    ``set_idx_externally`` (which, as in PML, stay in effect, and are re-filtered on every call,
    until ``reset_idx()``). Each list comes hardest first (torch.topk's order); pairs tied in
    distance keep their order in the candidate list (row-major for all pairs), where torch.topk
    leaves ties unordered. Mines on row blocks of the distance matrix (`fused/blocked_miners.py`):
    no N x M matrix or list of every pair."""

    def __init__(self, filter_percentage=0.5, **kwargs):
        super().__init__(**kwargs)
        self.filter_percentage = filter_percentage
        self.add_to_recordable_attributes(list_of_names=["filter_percentage"], is_stat=False)
        self.reset_idx()

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if self.was_set_externally:
            out = blocked_miners.hdc_listed_pairs(self.distance, embeddings, ref_emb, self.a1, self.p, self.a2,
                                                  self.n, self.filter_percentage)
        else:
            out = blocked_miners.hdc_all_pairs(self.distance, embeddings, labels, ref_emb, ref_labels,
                                               self.filter_percentage)
        self.a1, self.p, self.a2, self.n = out
        return out

    def set_idx_externally(self, external_indices_tuple, labels):
        self.a1, self.p, self.a2, self.n = convert_to_pairs(external_indices_tuple, labels)
        self.was_set_externally = True

    def reset_idx(self):
        self.a1, self.p, self.a2, self.n = None, None, None, None
        self.was_set_externally = False
