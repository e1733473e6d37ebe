"""Shared helpers for the proxy / classification loss modules (private)."""

import torch

from .._tracing import static_shapes
from ..fused import _stats as fused_stats
from ..fused import class_softmax


def ref_not_supported(embeddings, labels, ref_emb, ref_labels):
    """PML's rule: these losses compare the batch with their weights, never with a ref set."""
    if ref_emb is not embeddings or ref_labels is not labels:
        raise ValueError("ref_emb is not supported for this loss function")


def check_class_inputs(loss, embeddings, labels, ref_emb, ref_labels, embedding_size):
    """The class-weight losses' inputs, with errors that name the argument: no ref_emb (PML's
    rule), embeddings as wide as the loss's weights, labels class ids in [0, num_classes) (PML
    fails in F.one_hot there, or silently wraps a negative label to the last class). The range
    check reads the labels: one host sync on CUDA, as PML's F.one_hot; under torch.compile nothing
    may be read, so it is left out there."""
    ref_not_supported(embeddings, labels, ref_emb, ref_labels)
    name = type(loss).__name__
    if embeddings.shape[1] != embedding_size:
        raise ValueError(f"embeddings have {embeddings.shape[1]} columns, but this {name} was built with "
                         f"embedding_size={embedding_size}")
    if labels is not None and labels.numel() > 0 and not static_shapes():
        low, high = torch.stack(torch.aminmax(labels)).tolist()  # one read
        if low < 0 or high >= loss.num_classes:
            raise ValueError(f"labels must be class ids in [0, num_classes={loss.num_classes}) for {name}, "
                             f"got values from {low} to {high}")


def fused_class_call(loss, fused_fn, embeddings, labels, indices_tuple, distance_ref=None):
    """The class-weight losses' fused_loss_dict after their weights are cast: fused_fn(loss,
    embeddings, labels, indices_tuple) gives (loss_dict, backend), ZERO_LOSS or None (the reference
    runs). When it ran, the statistics of PML's distance(embeddings, distance_ref()) are recorded
    (distance_ref is called only when the distance collects them), and a fused loss dict gets the
    weight regularizer, as compute_loss adds it."""
    result = fused_fn(loss, embeddings, labels, indices_tuple)
    if result is not None and distance_ref is not None and loss.distance.collect_stats:
        fused_stats.record_distance(loss.distance, embeddings, distance_ref())
    if isinstance(result, tuple):  # (loss_dict, backend)
        loss.add_weight_regularization_to_loss_dict(result[0])
    return result


class ClassWeightsMixin:
    """What the class-weight losses do alike with their one weight parameter, named by
    `_class_weight`: PML's (D, C) columns (`W`; SoftTriple's `fc`, K columns per class) or its
    (C, D) rows (`proxies`, `_class_weight_rows = True`)."""
    _class_weight = "W"
    _class_weight_rows = False

    def cast_types(self, dtype, device):
        cast_parameter(getattr(self, self._class_weight), dtype, device)

    def regularized_weights(self):
        weight = getattr(self, self._class_weight)
        return weight if self._class_weight_rows else weight.t()

    # The class-softmax losses (fused/margin_softmax.py) leave small problems to the reference
    # (class_softmax.small_problem); ProxyAnchor's engine path has no such rule.
    _small_problems_to_reference = False

    def check_inputs(self, embeddings, labels, ref_emb, ref_labels):
        weight = getattr(self, self._class_weight)
        width = weight.shape[1] if self._class_weight_rows else weight.shape[0]
        check_class_inputs(self, embeddings, labels, ref_emb, ref_labels, width)

    def small_problem_reason(self, embeddings, ref_emb):
        if not self._small_problems_to_reference:
            return None
        weight = getattr(self, self._class_weight)
        return class_softmax.small_problem(embeddings, weight.shape[0] if self._class_weight_rows else weight.shape[1])


def cast_parameter(param, dtype, device):
    """Move a parameter's data to the embeddings' dtype/device in place (PML's ``cast_types``).
    Under torch.autocast the dtype is left alone (autocast casts per op; PML issue #293)."""
    if torch.is_autocast_enabled(device.type):
        dtype = param.dtype
    if param.dtype != dtype or param.device != device:
        param.data = param.data.to(device=device, dtype=dtype)


def new_weight(*shape):
    """An uninitialised parameter, to be filled by ``weight_init_func`` (as PML does)."""
    return torch.nn.Parameter(torch.empty(*shape))
