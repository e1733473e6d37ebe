"""Functional embedding losses: one function per loss, keyword hyperparameters, PML semantics.

Each function is generated from its ``dmlkern.losses`` class (``_from_module.make_function``) and
runs that module: the same dispatcher, so the fused engine runs wherever the module would run it
(O(N) memory, bit-identical values and gradients). It returns what the module returns (a 0-dim
tensor, or the loss dict with ``reducer=DoNothingReducer()``). ``distance`` and ``reducer``
default to the loss's own defaults. Example::

    loss = multi_similarity_loss(embeddings, labels, alpha=2, beta=50, base=0.5)
"""

from .. import losses as _L
from ._from_module import make_function

# name -> (loss class, a one-line summary)
_FUNCTIONS = {
    "contrastive_loss": (_L.ContrastiveLoss, "Pair loss: ``relu(d_ap - pos_margin)`` and "
                                             "``relu(neg_margin - d_an)``, AvgNonZero each, summed."),
    "triplet_margin_loss": (_L.TripletMarginLoss, "``relu(d_ap - d_an + margin)`` per triplet, AvgNonZero."),
    "margin_loss": (_L.MarginLoss, "Margin loss; ``beta`` a number or a tensor of shape (1,) or (num_classes,) "
                                   "(may require grad)."),
    "multi_similarity_loss": (_L.MultiSimilarityLoss, "Multi-similarity loss (cosine similarity, mean over rows)."),
    "lifted_structure_loss": (_L.LiftedStructureLoss, "Lifted structure loss, averaged over positive pairs."),
    "generalized_lifted_structure_loss": (_L.GeneralizedLiftedStructureLoss,
                                          "Generalized lifted structure loss, averaged over rows."),
    "n_pairs_loss": (_L.NPairsLoss, "N-pairs loss (labels required; ref_emb is not supported and raises "
                                    "ValueError, as in PML)."),
    "ntxent_loss": (_L.NTXentLoss, "NT-Xent, averaged over positive pairs."),
    "supcon_loss": (_L.SupConLoss, "Supervised contrastive loss, AvgNonZero over anchors."),
    "tuplet_margin_loss": (_L.TupletMarginLoss, "Tuplet margin loss; ``margin`` in degrees."),
    "angular_loss": (_L.AngularLoss, "Angular loss; ``alpha`` in degrees; labels required."),
    "nca_loss": (_L.NCALoss, "NCA loss (squared normalised Euclidean by default); labels required."),
    "circle_loss": (_L.CircleLoss, "Circle loss (cosine similarity), AvgNonZero over rows."),
}

__all__ = list(_FUNCTIONS)

for _name, (_cls, _note) in _FUNCTIONS.items():
    globals()[_name] = make_function(_name, _cls, _note, module_name=__name__)
del _name, _cls, _note
