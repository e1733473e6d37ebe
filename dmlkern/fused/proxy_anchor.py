"""Proxy-Anchor loss on the engine: per proxy, one lse2 pass over the batch (its class's samples
positive, the others negative)."""
import torch

from ..engine_spec import EngineParams
from ._common import is_unit_cosine, static_shapes, unit_rows
from ._epilogue import _log1p_exp_as_pml, _lse2, _plain_backend


def proxy_anchor_params(module):
    """The lse2 pass's logits -alpha(s - margin) / alpha(s + margin), a proxy being a row."""
    a, m = float(module.alpha), float(module.margin)
    return EngineParams(sc_pos=-a, off_pos=a * m, sc_neg=a, off_neg=a * m)


def proxy_anchor(module, embeddings, labels, indices_tuple, proxies):
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_cosine)
    if backend is None:
        return None  # e.g. miner weights (indices_tuple): the reference
    num_classes = proxies.shape[0]
    p = unit_rows(proxies)
    x = unit_rows(embeddings)
    proxy_labels = torch.arange(num_classes, device=labels.device)
    # Per proxy (a row of the engine): pos over its class's samples, neg over the others.
    lse = _lse2(p, x, proxy_labels, labels, proxy_anchor_params(module), False, backend)
    if static_shapes():  # labels can't be read (check_class_inputs): outside [0, C) gives NaN
        lse = torch.where(((labels >= 0) & (labels < num_classes)).all(), lse, float("nan"))
    # The number of proxies with a positive: a tensor under torch.compile and on CUDA (no host
    # sync; DivisorReducer divides by it either way), a Python int on the CPU as PML's.
    # (scatter into C + 1 slots, labels >= C in the last: a static shape, unlike bincount)
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=labels.device)
    num_with_pos = present.scatter(0, labels.clamp(0, num_classes), True)[:num_classes].sum()
    if not (static_shapes() or num_with_pos.is_cuda):
        num_with_pos = int(num_with_pos)
    idx = torch.arange(num_classes, device=embeddings.device)
    return {
        "pos_loss": {"losses": _log1p_exp_as_pml(lse[:, 0], embeddings.dtype).to(embeddings.dtype), "indices": idx,
                     "reduction_type": "element", "divisor": num_with_pos},
        "neg_loss": {"losses": _log1p_exp_as_pml(lse[:, 1], embeddings.dtype).to(embeddings.dtype), "indices": idx,
                     "reduction_type": "element", "divisor": num_classes},
    }, backend
