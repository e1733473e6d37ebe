"""Reference (pure PyTorch, materialising) embedding losses with PML 2.9.0 semantics.

The losses live in three modules by family, all re-exported here (the module the rest of
dmlkern and the tests import):

* ``pair_losses``: Contrastive, MultiSimilarity, LiftedStructure, GeneralizedLiftedStructure,
  Circle (PML's GenericPairLoss family);
* ``tuple_losses``: TripletMargin, Margin, TupletMargin, Angular;
* ``softmax_losses``: NPairs, NTXent, SupCon, NCA;

with their shared helpers (loss-dict entries, ``pair_setup``/``pair_masks``,
``require_distance``, the body of the public functions) in ``_embedding_common``.

Every loss has two functions:

* ``<name>_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, <params>,
  distance)``: the maths. Takes already prepared inputs (see ``dmlkern._validation.prepare_inputs``:
  ``ref_emb``/``ref_labels`` are the batch itself when absent) and returns PML's loss dict
  ``{sub_loss_name: {"losses", "indices", "reduction_type"[, "divisor"]}}``. The loss classes in
  ``dmlkern.losses`` call these.
* ``<name>_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
  <params>, distance=None, reducer=None)``: validates and prepares the inputs, calls the dict
  function and reduces it with the loss's default reducer (or ``reducer``), returning exactly
  what the PML loss module returns.

Conventions: ``mat`` is the (B, M) distance/similarity matrix between queries and references;
"pairs" ``(a1, p, a2, n)`` index (query row, ref row); "all pairs" from labels exclude the
diagonal only when the references are the batch itself. ``distance.margin(x, y)`` is ``x - y``
for a distance and ``y - x`` for a similarity, which is how every formula is written for both
kinds.

Deviations from PML (documented; everywhere else the values and gradients match):

* NCA with no row that has a positive returns the grad-carrying zero (PML: NaN, the mean of an
  empty tensor).
* TupletMargin clamps the cosine to [-1, 1] before ``acos`` (PML gives NaN for a cosine that
  rounding pushed above 1; values are unchanged elsewhere).
* Distance-type requirements (Tuplet, Circle: CosineSimilarity; Angular: normalised
  LpDistance(p=2, power=1)) and the "pair is both positive and negative" check raise
  ``InvalidInputError`` (a ValueError that is also an AssertionError; PML asserts).
"""

from ._embedding_common import pair_masks, pair_setup, require_distance  # noqa: F401
from .pair_losses import *  # noqa: F401,F403
from .pair_losses import CONTRASTIVE_SUB_LOSSES  # noqa: F401
from .pair_losses import __all__ as _pair_all
from .softmax_losses import *  # noqa: F401,F403
from .softmax_losses import check_n_pairs_ref  # noqa: F401
from .softmax_losses import __all__ as _softmax_all
from .tuple_losses import *  # noqa: F401,F403
from .tuple_losses import MARGIN_SUB_LOSSES, make_margin_beta  # noqa: F401
from .tuple_losses import __all__ as _tuple_all

__all__ = [*_pair_all, *_tuple_all, *_softmax_all]
