from ..distances import CosineSimilarity
from ..reference.miners import multi_similarity_miner
from .base import BaseTupleMiner


class MultiSimilarityMiner(BaseTupleMiner):
    """Multi-similarity pair mining (Wang et al. 2019); default distance CosineSimilarity."""

    def __init__(self, epsilon=0.1, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def get_default_distance(self):
        return CosineSimilarity()

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        return multi_similarity_miner(
            mat, labels, ref_labels, self.epsilon, self.distance.is_inverted, embeddings is ref_emb
        )
