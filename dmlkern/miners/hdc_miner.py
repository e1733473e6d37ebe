from ..reference.indices import convert_to_pairs, get_all_pairs_indices
from ..reference.miners import hdc_miner
from .base import BaseTupleMiner


class HDCMiner(BaseTupleMiner):
    """Hard-Aware Deeply Cascaded mining: keeps the ``ceil(filter_percentage * n)`` globally
    hardest positive and negative pairs, starting from all pairs or from the pairs given to
    ``set_idx_externally`` (which, as in PML, stay in effect, and are re-filtered on every call,
    until ``reset_idx()``)."""

    def __init__(self, filter_percentage=0.5, **kwargs):
        super().__init__(**kwargs)
        self.filter_percentage = filter_percentage
        self.add_to_recordable_attributes(list_of_names=["filter_percentage"], is_stat=False)
        self.reset_idx()

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        if not self.was_set_externally:
            self.a1, self.p, self.a2, self.n = get_all_pairs_indices(labels, ref_labels)
        self.a1, self.p, self.a2, self.n = hdc_miner(
            mat, self.a1, self.p, self.a2, self.n, self.filter_percentage, self.distance.is_inverted
        )
        return self.a1, self.p, self.a2, self.n

    def set_idx_externally(self, external_indices_tuple, labels):
        self.a1, self.p, self.a2, self.n = convert_to_pairs(external_indices_tuple, labels)
        self.was_set_externally = True

    def reset_idx(self):
        self.a1, self.p, self.a2, self.n = None, None, None, None
        self.was_set_externally = False
