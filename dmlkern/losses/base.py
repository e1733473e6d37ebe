"""Loss base classes with pytorch-metric-learning (PML 2.9.0) semantics.

* ``BaseMetricLossFunction``: ``forward(embeddings, labels=None, indices_tuple=None,
  ref_emb=None, ref_labels=None)`` validates the inputs, sets ``ref_emb``/``ref_labels`` (the
  batch itself when absent), calls ``compute_loss`` (which returns a loss dict
  ``{name: {"losses", "indices", "reduction_type"[, "divisor"]}}``), adds the embedding
  regularizer's ``embedding_reg_loss`` and reduces with ``self.reducer``.
* The reducer is built as in PML: a ``MultipleReducers``/``DoNothingReducer`` is used as given;
  otherwise a loss with one sub-loss uses ``get_default_reducer()`` or a deep copy of
  ``reducer``, and a loss with several sub-losses (regularizers included) gets a
  ``MultipleReducers`` holding one copy per sub-loss (results summed).
* ``GenericPairLoss(mat_based_loss)``: converts ``indices_tuple`` to pairs, returns
  ``zero_losses()`` when every index tensor has at most one entry (PML's ``len <= 1``
  short-circuit), computes the distance matrix and calls ``_compute_loss`` with either the pair
  values (``pos_pair, neg_pair, indices_tuple``) or 0/1 masks (``mat, pos_mask, neg_mask``).
* ``WeightRegularizerMixin`` / ``EmbeddingRegularizerMixin``: optional regularizer losses
  (``weight_reg_loss`` / ``embedding_reg_loss``, already reduced, times the reg weight).
"""

import torch

from .. import reducers as _reducers
from .._validation import prepare_inputs
from ..distances import LpDistance
from ..fused import _common
from ..fused.lazy_pairs import LazyMined
from ..fused._epilogue import ZERO_LOSS
from ..reference.embedding_losses import pair_masks, pair_setup
from ..utils.common_functions import RecordsMixin

__all__ = [
    "BaseMetricLossFunction",
    "GenericPairLoss",
    "WeightMixin",
    "WeightRegularizerMixin",
    "EmbeddingRegularizerMixin",
    "TorchInitWrapper",
]


class TorchInitWrapper:
    """Calls ``init_func(tensor, **kwargs)``; the form of PML's ``weight_init_func``."""

    def __init__(self, init_func, **kwargs):
        self.init_func = init_func
        self.kwargs = kwargs

    def __call__(self, tensor):
        self.init_func(tensor, **self.kwargs)


def _zero_entry():
    return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}


def _reg_entry(regularizer, weight, x):
    loss = 0 if regularizer is None else regularizer(x) * weight
    return {"losses": loss, "indices": None, "reduction_type": "already_reduced"}


class EmbeddingRegularizerMixin:
    """Adds ``embedding_reg_loss = embedding_regularizer(embeddings) * embedding_reg_weight``."""

    def __init__(self, embedding_regularizer=None, embedding_reg_weight=1, **kwargs):
        # A placeholder so sub_loss_names() is right while the base class builds its reducer.
        self.embedding_regularizer = embedding_regularizer is not None
        super().__init__(**kwargs)
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        if embedding_regularizer is not None:
            self.add_to_recordable_attributes(list_of_names=["embedding_reg_weight"], is_stat=False)

    def embedding_regularization_loss(self, embeddings):
        return _reg_entry(self.embedding_regularizer, self.embedding_reg_weight, embeddings)

    def add_embedding_regularization_to_loss_dict(self, loss_dict, embeddings):
        if self.embedding_regularizer is not None:
            loss_dict["embedding_reg_loss"] = self.embedding_regularization_loss(embeddings)

    def regularization_loss_names(self):
        return ["embedding_reg_loss"]


class WeightMixin:
    """Holds ``weight_init_func`` (default: ``torch.nn.init.normal_``)."""

    def __init__(self, weight_init_func=None, **kwargs):
        super().__init__(**kwargs)
        self.weight_init_func = self.get_default_weight_init_func() if weight_init_func is None else weight_init_func

    def get_default_weight_init_func(self):
        return TorchInitWrapper(torch.nn.init.normal_)


class WeightRegularizerMixin(WeightMixin):
    """Adds ``weight_reg_loss = weight_regularizer(weights) * weight_reg_weight``.

    Put it before the loss base class: ``class X(WeightRegularizerMixin, BaseMetricLossFunction)``.
    """

    def __init__(self, weight_regularizer=None, weight_reg_weight=1, **kwargs):
        self.weight_regularizer = weight_regularizer is not None  # placeholder, see above
        super().__init__(**kwargs)
        self.weight_regularizer = weight_regularizer
        self.weight_reg_weight = weight_reg_weight
        if weight_regularizer is not None:
            self.add_to_recordable_attributes(list_of_names=["weight_reg_weight"], is_stat=False)

    def weight_regularization_loss(self, weights):
        return _reg_entry(self.weight_regularizer, self.weight_reg_weight, weights)

    def regularized_weights(self):
        """The class weights as the regularizer sees them (one row per class); each loss defines it."""
        raise NotImplementedError

    def add_weight_regularization_to_loss_dict(self, loss_dict, weights=None):
        if self.weight_regularizer is not None:
            weights = self.regularized_weights() if weights is None else weights
            loss_dict["weight_reg_loss"] = self.weight_regularization_loss(weights)

    def regularization_loss_names(self):
        return ["weight_reg_loss"]


def _reg_is_set(value):
    return value is not None and value is not False


class BaseMetricLossFunction(EmbeddingRegularizerMixin, RecordsMixin, torch.nn.Module):
    """Base of every dmlkern loss (PML's ``BaseMetricLossFunction``).

    Subclasses implement ``compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``
    returning a loss dict, and may override ``_sub_loss_names``, ``get_default_reducer``,
    ``get_default_distance``. ``_labels_required`` tells the input validator whether labels are
    required (True), labels or indices_tuple are (False), or neither (None, the default).
    """

    _labels_required = None
    # How labels are read (``_validation.prepare_inputs``): "compared" with == (float / bool
    # labels become int64 ids), "indices" of class weights (float / bool raise, as in PML),
    # "class_ids" compared with the class indices (ProxyNCA: integral floats are accepted).
    _label_kind = "compared"

    def __init__(self, distance=None, reducer=None, collect_stats=None, **kwargs):
        super().__init__(**kwargs)
        self._init_records(collect_stats)  # None: dmlkern.utils.common_functions.COLLECT_STATS
        self.distance = self.get_default_distance() if distance is None else distance
        self.set_reducer(reducer)

    # -------------------------------------------------------------- configuration
    def get_default_reducer(self):
        return _reducers.MeanReducer()

    def get_default_distance(self):
        return LpDistance(p=2)

    def set_reducer(self, reducer):
        self.reducer = _reducers.resolve_reducer(reducer, self.sub_loss_names(), self.get_default_reducer)

    def _sub_loss_names(self):
        return ["loss"]

    def sub_loss_names(self):
        return self._sub_loss_names() + self.all_regularization_loss_names()

    def all_regularization_loss_names(self):
        names = []
        if isinstance(self, WeightRegularizerMixin) and _reg_is_set(getattr(self, "weight_regularizer", None)):
            names.append("weight_reg_loss")
        if _reg_is_set(getattr(self, "embedding_regularizer", None)):
            names.append("embedding_reg_loss")
        return names

    def reset_stats(self):
        """Sets the statistics in ``_record_these_stats`` to 0 (PML's loss forward does it first;
        the losses with statistics do it at the start of their fused and reference paths)."""
        RecordsMixin.reset_stats(self)

    # -------------------------------------------------------------- loss dict helpers
    def zero_loss(self):
        return _zero_entry()

    def zero_losses(self):
        return {name: _zero_entry() for name in self.sub_loss_names()}

    # -------------------------------------------------------------- forward
    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        raise NotImplementedError

    # Fused kernels: `backend` ("auto", "cpp", "triton", "reference"; DMLKERN_BACKEND overrides
    # "auto") picks the engine; after each forward `last_backend` says which path ran.
    backend = "auto"
    last_backend = None
    last_fallback = None  # when the reference ran: why (README, "Why no speedup?")
    # an empty ref_emb (with more than one row): the reference's dict rather than the zero
    # (NCALoss: PML's per-row dict, empty, and ref_emb's (0, D) gradient)
    _reference_for_empty_ref = False

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        """PML's checks at the top of its compute_loss, in its order (`ref_not_supported`,
        `indices_tuple_not_supported`), run before either path: an empty batch raises as PML's."""

    def check_inputs(self, embeddings, labels, ref_emb, ref_labels):
        """Loss-specific input checks (raise naming the argument), run once per call on the prepared
        inputs, before either path. The losses with class weights check widths and label ranges."""

    def small_problem_reason(self, embeddings, ref_emb):
        """Why this call runs the reference as a small problem (a str), or None. The losses whose
        fused path leaves small eager CPU calls to the reference (the DMLKERN_SMALL_* rules) say so
        here, so that `forward` decides it first and such a call skips the fused path's host checks
        (the inf scan, the backend choice: ~50-80 us of a ~1 ms step at N = 64)."""
        return None

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """(loss_dict, backend) from the fused kernels, ZERO_LOSS, or None to use the reference
        (after `fused._common.decline` recorded why). Overridden by the losses that have a fused
        path (one module per loss in dmlkern/fused/)."""
        return None

    def _no_fused_path_reason(self):
        if type(self).fused_loss_dict is BaseMetricLossFunction.fused_loss_dict:
            return f"{type(self).__name__} has no fused kernel yet"
        return f"this configuration of {type(self).__name__} has no fused kernel"

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """Returns the reduced loss (a 0-dim tensor), or the loss dict with DoNothingReducer."""
        lazy = indices_tuple if isinstance(indices_tuple, LazyMined) else None
        if lazy is not None and not lazy.shape_matches(embeddings, embeddings if ref_emb is None else ref_emb):
            lazy = None  # pairs mined on a batch of another size: validated as any indices_tuple
        # The miner's labels, already int64 on the device, when these are them; only where labels are
        # just compared: the miner's ids keep PML's == but not the values (float labels: dense ids),
        # and the class-weight losses index or compare their classes with the values.
        if lazy is not None and self._label_kind == "compared":
            given, given_ref = lazy.given_labels
            labels = lazy.labels_as_given if labels is given and labels is not None else labels
            ref_labels = lazy.ref_labels_as_given if ref_labels is given_ref and ref_labels is not None else ref_labels
        # The miner's pairs are valid indices by construction: validation sees an empty stand-in.
        embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
            embeddings, labels, lazy.empty_stand_in() if lazy is not None else indices_tuple, ref_emb, ref_labels,
            labels_required=self._labels_required, label_kind=self._label_kind, loss_name=type(self).__name__,
        )
        self.check_unsupported(embeddings, lazy or indices_tuple, labels, ref_emb, ref_labels)
        self.check_inputs(embeddings, labels, ref_emb, ref_labels)
        loss_dict, self.last_fallback = None, None
        if (self._reference_for_empty_ref and ref_emb.shape[0] == 0 and embeddings.shape[0] > 1
                and not _common.static_shapes()):  # (under torch.compile: the zero, no data-dependent branch)
            self.last_fallback = EMPTY_REF
        elif embeddings.shape[0] == 0 or ref_emb.shape[0] == 0:
            loss_dict = ZERO_LOSS  # an empty batch: PML's grad-carrying zero, from the shapes alone
        elif self.backend != "reference" and (small := self.small_problem_reason(embeddings, ref_emb)) is not None:
            self.last_fallback = small
        elif self.backend != "reference" and _common.has_entry(torch.isinf, embeddings, ref_emb):
            self.last_fallback = INFINITE_ENTRY
        elif self.backend != "reference":
            loss_dict = self.fused_loss_dict(embeddings, labels, lazy or indices_tuple, ref_emb, ref_labels)
            if isinstance(loss_dict, tuple):  # the fused kernels ran: (loss_dict, backend)
                loss_dict, self.last_backend = loss_dict
        else:
            self.last_fallback = "backend='reference' requested (loss.backend or DMLKERN_BACKEND)"
        if loss_dict is ZERO_LOSS:
            loss_dict = self.zero_losses()
            self.last_backend, self.last_fallback = "zero", None  # no valid pair: the reference's zero
            if isinstance(self, WeightRegularizerMixin):  # PML's compute_loss regularizes the weights still
                self.cast_types(embeddings.dtype, embeddings.device)
                self.add_weight_regularization_to_loss_dict(loss_dict)
                # and the weights get PML's zero gradient, not None (an optimizer's step differs);
                # (empty sums: exactly 0 whatever the values)
                first = loss_dict[self._sub_loss_names()[0]]
                first["losses"] = embeddings.flatten()[:0].sum() + self.regularized_weights().flatten()[:0].sum()
        elif loss_dict is None:
            if lazy is not None:  # a fused loss didn't take the miner's lazy pairs: build them
                indices_tuple = tuple(t.to(embeddings.device) for t in lazy.materialize())
            self.last_backend = "reference"
            if self.last_fallback is None:
                self.last_fallback = self._no_fused_path_reason()
            loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        return self.reducer(loss_dict, embeddings, labels)


# (NCALoss) PML's rows against no reference: a per-row dict of no row, on ref_emb's graph
EMPTY_REF = "an empty ref_emb (PML's per-row dict of no row: O(N) on the reference)"
# (eager off CUDA: `_common.has_entry`) PML's inf / NaN / finite result there depends on its ops' order
INFINITE_ENTRY = "an infinite embedding entry (the kernels' rules follow PML's NaN, not inf; eager CPU)"


class GenericPairLoss(BaseMetricLossFunction):
    """Pair-based loss skeleton: subclasses implement ``_compute_loss``.

    ``mat_based_loss=False``: ``_compute_loss(pos_pair, neg_pair, indices_tuple)`` gets
    ``mat[a1, p]`` and ``mat[a2, n]`` (an empty list when the side has no pair).
    ``mat_based_loss=True``: ``_compute_loss(mat, pos_mask, neg_mask)`` gets 0/1 masks of the
    matrix's dtype (duplicate pairs collapse); a pair may not be both positive and negative.
    """

    _labels_required = False

    def __init__(self, mat_based_loss, **kwargs):
        super().__init__(**kwargs)
        self.mat_based = bool(mat_based_loss)
        self.loss_method = self.mat_based_loss if mat_based_loss else self.pair_based_loss

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, self.distance)
        if setup is None:
            return self.zero_losses()
        mat, pairs = setup
        return self.loss_method(mat, pairs)

    def _compute_loss(self, *args):
        raise NotImplementedError

    def mat_based_loss(self, mat, indices_tuple):
        pos_mask, neg_mask = pair_masks(mat, indices_tuple)
        return self._compute_loss(mat, pos_mask, neg_mask)

    def pair_based_loss(self, mat, indices_tuple):
        a1, p, a2, n = indices_tuple
        pos_pair = mat[a1, p] if len(a1) > 0 else []
        neg_pair = mat[a2, n] if len(a2) > 0 else []
        return self._compute_loss(pos_pair, neg_pair, indices_tuple)
