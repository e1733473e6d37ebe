"""Reducers: turn a loss dict into one scalar, with pytorch-metric-learning (PML 2.9.0) semantics.

A loss dict maps a sub-loss name to ``{"losses", "indices", "reduction_type"[, "divisor"]}``.
``reduction_type`` is one of ``element``, ``pos_pair``, ``neg_pair``, ``triplet`` or
``already_reduced``, and selects the ``<reduction_type>_reduction`` method.

* ``losses`` equal to the Python int ``0`` (what ``zero_losses()`` produces) reduces to the
  grad-carrying zero ``torch.sum(embeddings * 0)``: a 0-dim tensor with ``requires_grad`` whose
  backward gives all-zero gradients.
* ``MeanReducer``: mean over every entry, zeros included. ``SumReducer``: sum.
* ``ThresholdReducer(low, high)``: mean of the entries with ``low < x < high`` (either bound
  optional); the grad-carrying zero when none pass. ``AvgNonZeroReducer`` is ``low=0``.
* ``DivisorReducer``: ``sum(losses) / loss_info["divisor"]``; the zero when the divisor is 0.
* ``DoNothingReducer``: returns the loss dict unchanged.
* ``MultipleReducers``: one reducer per sub-loss (``default_reducer``, MeanReducer by default,
  for names without their own), results summed.
* ``PerAnchorReducer``: pair losses are first averaged per anchor row, then the per-anchor
  values are reduced as elements by the wrapped reducer.
* ``ClassWeightedReducer(weights)``: ``mean(losses * weights[labels[anchor]])``.

Statistics (PML's, with ``collect_stats=True`` or ``dmlkern.utils.common_functions.COLLECT_STATS``;
reset at each call): ``losses_size`` (every reducer but MultipleReducers / DoNothingReducer: the
number of entries reduced, 1 for an already-reduced value; a fused loss whose value arrives already
reduced passes the number of entries it stands for as ``loss_info["losses_size"]``);
ThresholdReducer ``num_past_filter``, ``num_above_low`` and, as PML 2.9.0 records it,
``num_above_high`` (the number of entries above ``low`` that are below ``high``; ``num_below_high``
is listed but stays 0, as in PML); DivisorReducer ``divisor`` (recorded on every call, as in PML).

Deviation from PML: malformed loss dicts raise ``ValueError`` (PML: ``AssertionError`` or
``AttributeError``).
"""

import copy

import torch

from . import _pml_paths
from ._determinism import fixed_order_mean, fixed_order_sum
from ._tracing import static_shapes
from .utils.common_functions import RecordsMixin

__all__ = [
    "BaseReducer",
    "MeanReducer",
    "SumReducer",
    "ThresholdReducer",
    "AvgNonZeroReducer",
    "DivisorReducer",
    "DoNothingReducer",
    "MultipleReducers",
    "PerAnchorReducer",
    "ClassWeightedReducer",
    "resolve_reducer",
]

_REDUCTION_TYPES = ("element", "pos_pair", "neg_pair", "triplet", "already_reduced")


def _is_zero_loss(losses):
    return (not torch.is_tensor(losses)) and losses == 0


def _grad_zero(embeddings):
    return torch.sum(embeddings * 0)


# PML raises KeyError (the missing loss_dict["divisor"]) and TypeError (indexing labels=None) for
# these; dmlkern raises the same class, with a clear message, also catchable as ValueError.
class _MissingDivisor(KeyError, ValueError):
    __str__ = ValueError.__str__  # the message, not KeyError's repr of it


class _MissingLabels(TypeError, ValueError):
    pass


class BaseReducer(RecordsMixin, torch.nn.Module):
    """Reduces a loss dict holding exactly one sub-loss."""

    def __init__(self, collect_stats=None, **kwargs):
        super().__init__(**kwargs)
        self._init_records(collect_stats)
        self.losses_size = 0
        self.add_to_recordable_attributes(name="losses_size", is_stat=True)

    # -------------------------------------------------------------- entry point
    def forward(self, loss_dict, embeddings, labels):
        self.reset_stats()
        if len(loss_dict) != 1:
            raise ValueError(
                f"{type(self).__name__} reduces exactly one sub-loss, got loss_dict with "
                f"{len(loss_dict)} entries; use MultipleReducers"
            )
        (loss_info,) = loss_dict.values()
        losses, loss_indices, reduction_type, kwargs = self.unpack_loss_info(loss_info)
        out = self.reduce_the_loss(losses, loss_indices, reduction_type, kwargs, embeddings, labels)
        if self.collect_stats and "losses_size" in loss_info:  # a fused, already-reduced value
            self.losses_size = int(loss_info["losses_size"])
        return out

    def unpack_loss_info(self, loss_info):
        return loss_info["losses"], loss_info["indices"], loss_info["reduction_type"], {}

    def reduce_the_loss(self, losses, loss_indices, reduction_type, kwargs, embeddings, labels):
        self.set_losses_size_stat(losses)
        if self.input_is_zero_loss(losses):
            return self.zero_loss(embeddings)
        self.assert_sizes(losses, loss_indices, reduction_type)
        return self.get_reduction_func(reduction_type)(losses, loss_indices, embeddings, labels, **kwargs)

    # -------------------------------------------------------------- reductions
    def already_reduced_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        if not (losses.ndim == 0 or len(losses) == 1):
            raise ValueError("an 'already_reduced' loss must hold a single value")
        return losses

    def element_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        raise NotImplementedError

    def pos_pair_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        raise NotImplementedError

    def neg_pair_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        raise NotImplementedError

    def triplet_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        raise NotImplementedError

    def get_reduction_func(self, reduction_type):
        if reduction_type not in _REDUCTION_TYPES:
            raise ValueError(
                f"unknown reduction_type {reduction_type!r}; expected one of {_REDUCTION_TYPES}"
            )
        return getattr(self, f"{reduction_type}_reduction")

    # -------------------------------------------------------------- helpers
    def set_losses_size_stat(self, losses):
        if self.collect_stats:
            self.losses_size = 1 if (not torch.is_tensor(losses) or losses.ndim == 0) else len(losses)

    def zero_loss(self, embeddings):
        return _grad_zero(embeddings)

    def input_is_zero_loss(self, losses):
        return _is_zero_loss(losses)

    def assert_sizes(self, losses, loss_indices, reduction_type):
        if reduction_type == "already_reduced":
            return
        if not torch.is_tensor(losses):
            raise ValueError(f"losses of reduction_type {reduction_type!r} must be a tensor")
        n = len(losses)
        if reduction_type == "element":
            ok = torch.is_tensor(loss_indices) and len(loss_indices) == n
        elif reduction_type in ("pos_pair", "neg_pair"):
            ok = (
                isinstance(loss_indices, (list, tuple))
                and len(loss_indices) == 2
                and all(torch.is_tensor(x) and len(x) == n for x in loss_indices)
            )
        elif reduction_type == "triplet":
            ok = (
                isinstance(loss_indices, (list, tuple))
                and len(loss_indices) == 3
                and all(len(x) == n for x in loss_indices)
            )
        else:
            raise ValueError(
                f"unknown reduction_type {reduction_type!r}; expected one of {_REDUCTION_TYPES}"
            )
        if not ok:
            raise ValueError(f"losses and indices do not match for reduction_type {reduction_type!r}")


class MeanReducer(BaseReducer):
    """Mean over every loss entry (zeros included)."""

    def element_reduction(self, losses, *args, **kwargs):
        return fixed_order_mean(losses)  # torch.mean, in a thread-count independent order on a CPU

    pos_pair_reduction = element_reduction
    neg_pair_reduction = element_reduction
    triplet_reduction = element_reduction


class SumReducer(MeanReducer):
    """Sum of every loss entry."""

    def element_reduction(self, losses, *args, **kwargs):
        return fixed_order_sum(losses)  # torch.sum, in a thread-count independent order on a CPU

    pos_pair_reduction = element_reduction
    neg_pair_reduction = element_reduction
    triplet_reduction = element_reduction


class ThresholdReducer(BaseReducer):
    """Mean of the entries strictly between ``low`` and ``high`` (each optional)."""

    def __init__(self, low=None, high=None, **kwargs):
        super().__init__(**kwargs)
        if low is None and high is None:
            raise ValueError("ThresholdReducer: at least one of low or high must be specified")
        self.low = low
        self.high = high
        self.add_to_recordable_attributes(list_of_names=["low", "high"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["num_past_filter", "num_above_low", "num_below_high"], is_stat=True
        )

    def _filtered_mean(self, losses, embeddings):
        # (one mask per bound, no all-True start: PML's peak memory)
        keep = None if self.low is None else losses > self.low
        if self.high is not None:
            keep = losses < self.high if keep is None else keep & (losses < self.high)
        if keep is None:
            keep = torch.ones_like(losses, dtype=torch.bool)
        if (static_shapes() or losses.is_cuda) and not self.collect_stats:
            # Same value and gradient without data-dependent shapes or branches (fullgraph)
            # or host syncs (CUDA).
            count = keep.sum()
            total = fixed_order_sum(torch.where(keep, losses, 0.0))
            return torch.where(count > 0, total / count.clamp(min=1), self.zero_loss(embeddings))
        kept = losses[keep]
        if self.collect_stats:
            with torch.no_grad():
                self.num_past_filter = len(kept)
                above_low = losses > self.low if self.low is not None else torch.ones_like(keep)
                if self.low is not None:
                    self.num_above_low = int(above_low.sum())
                if self.high is not None:  # PML's name and count: below `high`, among those above `low`
                    self.num_above_high = int((losses[above_low] < self.high).sum())
        if kept.numel() >= 1:
            return fixed_order_mean(kept)
        return self.zero_loss(embeddings)

    def element_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        return self._filtered_mean(losses, embeddings)

    pos_pair_reduction = element_reduction
    neg_pair_reduction = element_reduction
    triplet_reduction = element_reduction


class AvgNonZeroReducer(ThresholdReducer):
    """Mean of the strictly positive entries."""

    def __init__(self, **kwargs):
        super().__init__(low=0, **kwargs)


class DivisorReducer(BaseReducer):
    """``sum(losses) / divisor`` with the divisor taken from the loss dict."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.divisor = 0
        self.add_to_recordable_attributes(name="divisor", is_stat=True)

    def unpack_loss_info(self, loss_info):
        losses, loss_indices, reduction_type, kwargs = super().unpack_loss_info(loss_info)
        if reduction_type != "already_reduced":
            if "divisor" not in loss_info:
                raise _MissingDivisor("DivisorReducer needs a 'divisor' entry in the loss dict")
            kwargs = {"divisor": loss_info["divisor"]}
            self.divisor = loss_info["divisor"]
        return losses, loss_indices, reduction_type, kwargs

    def sum_and_divide(self, losses, embeddings, divisor):
        # torch.compile / CUDA: no data-dependent branch, no sync. (Eager on the CPU, PML's branch:
        # with divisor 0 its zero loss leaves the losses' graph out, whose NaN would reach the
        # gradient through a select's zero.)
        if torch.is_tensor(divisor) and (static_shapes() or divisor.is_cuda):
            safe = divisor.clamp(min=1).to(torch.promote_types(losses.dtype, torch.float32))
            out = (fixed_order_sum(losses) / safe).to(losses.dtype)  # a divisor > 65504 fits (fp16)
            if losses.dtype == torch.float16:  # PML's fp16 rule below, as a select
                out = torch.where(torch.isnan(out), (torch.sum(losses.float()) / safe).half(), out)
            return torch.where(divisor != 0, out, self.zero_loss(embeddings).to(out.dtype))
        if divisor != 0:
            out = fixed_order_sum(losses) / divisor  # torch.sum; thread-count independent on a CPU
            if losses.dtype == torch.float16 and torch.isnan(out):
                out = (torch.sum(losses.float()) / divisor).half()
            return out
        return self.zero_loss(embeddings)

    def element_reduction(self, losses, loss_indices, embeddings, labels, divisor=1):
        return self.sum_and_divide(losses, embeddings, divisor)

    pos_pair_reduction = element_reduction
    neg_pair_reduction = element_reduction
    triplet_reduction = element_reduction


class DoNothingReducer(BaseReducer):
    """Returns the loss dict itself."""

    def forward(self, loss_dict, embeddings, labels):
        return loss_dict


class MultipleReducers(BaseReducer):
    """Reduces each sub-loss with its own reducer and sums the results."""

    def __init__(self, reducers, default_reducer=None, **kwargs):
        super().__init__(**kwargs)
        self.reducers = torch.nn.ModuleDict(reducers)
        self.default_reducer = MeanReducer() if default_reducer is None else default_reducer

    def forward(self, loss_dict, embeddings, labels):
        self.reset_stats()
        vals = []
        for name, info in loss_dict.items():
            red = self.reducers[name] if name in self.reducers else self.default_reducer
            v = red({name: info}, embeddings, labels)
            vals.append(torch.as_tensor(v, device=embeddings.device).to(embeddings.dtype).reshape(()))
        if len(vals) == 0:
            sub_losses = embeddings.new_zeros(0)
        else:
            sub_losses = torch.stack(vals)
        return self.sub_loss_reduction(sub_losses, embeddings, labels)

    def sub_loss_reduction(self, sub_losses, embeddings=None, labels=None):
        return torch.sum(sub_losses)


def _per_anchor_mean(x, num_per_row):
    """Default PerAnchorReducer aggregation: row sum / number of filled entries (0 if none)."""
    out = torch.sum(x, dim=1) / num_per_row
    out[num_per_row == 0] = 0
    return out


class PerAnchorReducer(BaseReducer):
    """Aggregates pair losses per anchor row, then reduces the rows with ``reducer``."""

    def __init__(self, reducer=None, aggregation_func=_per_anchor_mean, **kwargs):
        super().__init__(**kwargs)
        self.reducer = MeanReducer() if reducer is None else reducer
        self.aggregation_func = aggregation_func

    def element_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        d = {"loss": {"losses": losses, "indices": loss_indices, "reduction_type": "element"}}
        return self.reducer(d, embeddings, labels)

    def _pair_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        anchors, others = loss_indices
        n_rows = embeddings.shape[0]
        n_cols = max(n_rows, int(others.max()) + 1 if len(others) else 0)
        grid = losses.new_zeros((n_rows, n_cols))
        filled = torch.zeros((n_rows, n_cols), dtype=torch.bool, device=losses.device)
        grid[anchors, others] = losses  # PML's assignment: (1, 1) losses fit one pair, (P, 1) fail as in PML
        filled[anchors, others] = True
        per_row = self.aggregation_func(grid, filled.sum(dim=1))
        d = {
            "loss": {
                "losses": per_row,
                "indices": torch.arange(n_rows, device=embeddings.device),
                "reduction_type": "element",
            }
        }
        return self.reducer(d, embeddings, labels)

    pos_pair_reduction = _pair_reduction
    neg_pair_reduction = _pair_reduction

    def triplet_reduction(self, *args, **kwargs):
        raise NotImplementedError("PerAnchorReducer does not support triplet reduction")


class ClassWeightedReducer(BaseReducer):
    """``mean(losses * weights[labels[i]])`` with ``i`` the element or the anchor of a tuple."""

    def __init__(self, weights, **kwargs):
        super().__init__(**kwargs)
        self.weights = weights

    def _weighted_mean(self, losses, idx, labels):
        if labels is None:
            raise _MissingLabels("ClassWeightedReducer needs labels")
        self.weights = torch.as_tensor(self.weights).to(device=losses.device, dtype=losses.dtype)
        return torch.mean(losses * self.weights[labels[idx]])

    def element_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        return self._weighted_mean(losses, loss_indices, labels)

    def pos_pair_reduction(self, losses, loss_indices, embeddings, labels, **kwargs):
        return self._weighted_mean(losses, loss_indices[0], labels)

    neg_pair_reduction = pos_pair_reduction
    triplet_reduction = pos_pair_reduction


def _is_passthrough_reducer(reducer):
    """MultipleReducers and DoNothingReducer (ours, or PML's by class name) are used as given."""
    names = {c.__name__ for c in type(reducer).__mro__}
    return bool(names & {"MultipleReducers", "DoNothingReducer"})


def resolve_reducer(reducer, sub_loss_names, default_factory=MeanReducer):
    """Build the reducer a loss uses, as PML's ``set_reducer`` does.

    * MultipleReducers / DoNothingReducer are used as given;
    * with one sub-loss: ``default_factory()`` if ``reducer`` is None, else a deep copy of it;
    * with several: a MultipleReducers holding one such reducer per sub-loss (summed).
    """
    if reducer is not None and _is_passthrough_reducer(reducer):
        return reducer
    names = list(sub_loss_names)

    def one():
        return default_factory() if reducer is None else copy.deepcopy(reducer)

    if len(names) == 1:
        return one()
    return MultipleReducers({k: one() for k in names})


_pml_paths.register(__name__, {
    "avg_non_zero_reducer": ["AvgNonZeroReducer"], "base_reducer": ["BaseReducer"],
    "class_weighted_reducer": ["ClassWeightedReducer"], "divisor_reducer": ["DivisorReducer"],
    "do_nothing_reducer": ["DoNothingReducer"], "mean_reducer": ["MeanReducer"],
    "multiple_reducers": ["MultipleReducers"], "per_anchor_reducer": ["PerAnchorReducer"],
    "sum_reducer": ["SumReducer"], "threshold_reducer": ["ThresholdReducer"],
})
