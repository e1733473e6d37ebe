"""InstanceLoss on the class path (class_softmax.py): each row's cross-entropy over the batch with
the batch's own unit rows as the classes. PML's target is the row's class index (the labels
ranked by torch.unique), read as a column of the batch. The logits gamma * <x_i, x_j> are walked
in column blocks by the engine (`class_lse`): never N x N, forward or backward."""
import torch

from ._common import decline, is_unit_cosine, unit_rows
from ._epilogue import _element, _engine_or_decline
from ._stats import record_distance
from .class_softmax import ClassLayout, EngineBlock, class_cross_entropy, class_lse


def instance(module, embeddings, labels):
    """(loss_dict, backend), or None after `decline` (the reference runs)."""
    backend = _engine_or_decline(module, embeddings)
    if backend is None:
        return None
    if not is_unit_cosine(module.distance):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    record_distance(module.distance, embeddings, embeddings)
    gamma = float(module.gamma)
    x = unit_rows(embeddings)
    _, target = torch.unique(labels, return_inverse=True)
    # x is both the rows and the "class weights": autograd adds the two gradients
    lse, x_target = class_lse(x, x, target, EngineBlock(False, gamma, 0.0, backend, x),
                              ClassLayout(columns=False, num_classes=x.shape[0]))
    losses = class_cross_entropy(gamma * (x * x_target).sum(dim=1), lse, embeddings.dtype)
    return {"loss": _element(losses.to(embeddings.dtype), len(losses))}, backend
