"""The margin-softmax family and the plain / normalised softmax losses on the class path
(class_softmax.py): per loss, how the rows and the class weights enter the engine's logits
sc * <x_i, w_j> + off, and the target's logit. Exact rewrites of PML's formulas:

| loss | x | w_j | sc | target logit t_i |
| --- | --- | --- | --- | --- |
| ArcFace | unit | unit | scale | scale * psi_arc(cos_t) |
| CosFace | unit | unit | scale | scale * (cos_t - margin) |
| SphereFace | raw | unit | scale | scale * |x_i| * psi(cos_t) (cos * |x| * scale = <x, w_hat> * scale) |
| L-Softmax | raw | raw | scale | scale * |x_i| |w_t| * psi(cos_t) (cos * |w| |x| * scale = <x, w> * scale) |
| NormalizedSoftmax | unit | unit | 1 / T | cos_t / T |
| Softmax | raw | raw | 1 | <x_i, w_t> |
"""
import torch

from ..ops.pair_engine import autocast_rows
from ..reference import classification_losses as ref
from ..reference.indices import convert_to_weights
from ._common import branch_free, decline, is_unit_cosine, static_shapes, unit_rows
from ._epilogue import _element, _engine_or_decline, kept_rows_loss
from .class_softmax import ClassLayout, EngineBlock, class_cross_entropy, class_lse, no_grad_at_short_rows, normalized
from .lazy_pairs import LazyMined


def miner_weights(indices_tuple, labels, dtype, using_ref=False):
    """PML's per-sample weights from a miner's tuple (all ones without one): O(N + tuples)."""
    if isinstance(indices_tuple, LazyMined):
        indices_tuple = tuple(t.to(labels.device) for t in indices_tuple.materialize())
    return convert_to_weights(indices_tuple, labels, dtype=dtype, using_ref=using_ref)


def logit_rows(embeddings, unit_x, cdist=False, logits_times_norm=False):
    """x as it enters the logits: unit rows (unit_x) or the rows as given, under autocast in the
    autocast dtype (matmul's rule; not for cdist: `_common.unit_rows` full_precision); logits_times_norm: no
    gradient at rows shorter than eps (`no_grad_at_short_rows`)."""
    x = unit_rows(embeddings, cdist) if unit_x else autocast_rows(embeddings)
    return no_grad_at_short_rows(x) if logits_times_norm else x


def target_weight_rows(w_t, x, cdist=False):
    """The targets' weight rows as they enter the target logit: rounded as the other classes' are
    (`EngineBlock`), in x's dtype."""
    return (w_t if cdist else autocast_rows(w_t)).to(x.dtype)


def target_logits(x, w_t, layout, unit_x, unit_w, target_logit):
    """target_logit(x, w_t, cos_t) from the rows and their targets' weight rows as they enter the
    logits, with cos_t their cosines ((N,), or (N, K) for K rows per class), normalised with
    autograd (PML's F.normalize)."""
    unit_w_t = normalized(w_t)
    direction = x if unit_x else normalized(x)
    cos_t = ((direction if layout.group == 1 else direction[:, None]) * unit_w_t).sum(dim=-1)
    return target_logit(x, unit_w_t if unit_w else w_t, cos_t)


def class_loss_dict(module, embeddings, labels, indices_tuple, weight, layout, kernel_for, *, unit_x, unit_w,
                    target_logit, using_ref=False, drop_zero_probability=False, logits_times_norm=False, cdist=False):
    """PML's {"loss": per-sample losses}, the other classes' logits from the block kernel
    kernel_for(x), the target's from target_logit(x, w_t, cos_t) (x, w_t as they enter the logits:
    (N, D), w_t (N, K, D) for K rows per class; cos_t their cosines, (N,) or (N, K)).
    drop_zero_probability (ProxyNCA): the samples whose target probability underflows to 0 (a loss
    past ~104 in fp32) are left out, as PML does; kept under torch.compile (no data-dependent
    shape) and on CUDA (no host sync). logits_times_norm (L-Softmax, SphereFace): PML's gradient 0
    for a zero row (no_grad_at_short_rows). cdist (ProxyNCA's Euclidean distance, PML's torch.cdist):
    the rows and weight rows without autocast's rounding (`_common.unit_rows` full_precision)."""
    num_classes = layout.num_classes
    x = logit_rows(embeddings, unit_x, cdist, logits_times_norm)
    lse, w_t = class_lse(x, weight, labels, kernel_for(x), layout)
    t = target_logits(x, target_weight_rows(w_t, x, cdist), layout, unit_x, unit_w, target_logit)
    losses = class_cross_entropy(t, lse, embeddings.dtype)
    if static_shapes():  # labels outside [0, C) could not be rejected: NaN, as ProxyAnchor's
        losses = torch.where(((labels >= 0) & (labels < num_classes)).all(), losses, float("nan"))
    weights = miner_weights(indices_tuple, labels, embeddings.dtype, using_ref)
    entry = _element(losses.to(embeddings.dtype) * weights, len(losses))
    if drop_zero_probability:
        return without_zero_probability(module, entry, losses)
    return {"loss": entry}


def without_zero_probability(module, entry, losses):
    """{"loss": entry} less the samples whose probability e^-loss is 0 in the entry's dtype, as
    PML's ProxyNCA drops them (`kept_rows_loss`; eager off CUDA: `branch_free` calls keep them)."""
    if branch_free(losses):
        return {"loss": entry}
    return kept_rows_loss(module, entry, torch.exp(-losses.detach().to(entry["losses"].dtype)) != 0)


def _backend_for(module, embeddings, distance_ok=is_unit_cosine):
    backend = _engine_or_decline(module, embeddings)
    if backend is not None and not distance_ok(module.distance):
        return decline(module, f"non-default distance {type(module.distance).__name__}")
    return backend


def _fused(module, embeddings, labels, indices_tuple, weight, layout, distance_ok=is_unit_cosine, *, scale=None,
           offset=0.0, kernel=None, unit_x=True, unit_w=True, cdist=False, **config):
    """(loss_dict, backend), or None after `decline`. kernel: a block kernel's factory, kernel(backend)
    (GroupedBlock, which reports the backend that ran its blocks), else the engine's for logits
    scale * <x, w> + offset."""
    backend = _backend_for(module, embeddings, distance_ok)
    if backend is None:
        return None
    block = kernel(backend) if kernel is not None else None
    kernel_for = (lambda x: block) if block is not None else (
        lambda x: EngineBlock(unit_w, scale, offset, backend, x, autocast_rounding=not cdist))
    loss_dict = class_loss_dict(module, embeddings, labels, indices_tuple, weight, layout, kernel_for,
                                unit_x=unit_x, unit_w=unit_w, cdist=cdist, **config)
    return loss_dict, getattr(block, "ran", None) or backend


def _columns_of(W):
    """PML's W (D, C): a class per column."""
    return ClassLayout(columns=True, num_classes=W.shape[1])


def arcface(module, embeddings, labels, indices_tuple):
    s, m = float(module.scale), float(module.margin)
    return _fused(module, embeddings, labels, indices_tuple, module.W, _columns_of(module.W), unit_x=True, unit_w=True, scale=s,
                  offset=0.0, target_logit=lambda x, w, cos: s * ref.arcface_target_logit(cos, m))


def cosface(module, embeddings, labels, indices_tuple):
    s, m = float(module.scale), float(module.margin)
    return _fused(module, embeddings, labels, indices_tuple, module.W, _columns_of(module.W), unit_x=True, unit_w=True, scale=s,
                  offset=0.0, target_logit=lambda x, w, cos: s * (cos - m))


def sphereface(module, embeddings, labels, indices_tuple):
    s, m = float(module.scale), int(module.margin)
    return _fused(module, embeddings, labels, indices_tuple, module.W, _columns_of(module.W), unit_x=False, unit_w=True, scale=s,
                  offset=0.0, logits_times_norm=True,
                  target_logit=lambda x, w, cos: ref._lm_target(cos, m) * torch.linalg.vector_norm(x, dim=1) * s)


def large_margin_softmax(module, embeddings, labels, indices_tuple):
    s, m = float(module.scale), int(module.margin)

    def target(x, w, cos):
        norms = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(w, dim=1)
        return ref._lm_target(cos, m) * norms * s

    return _fused(module, embeddings, labels, indices_tuple, module.W, _columns_of(module.W), unit_x=False, unit_w=False, scale=s,
                  offset=0.0, logits_times_norm=True, target_logit=target)


def normalized_softmax(module, embeddings, labels, indices_tuple):
    inv_t = 1.0 / float(module.temperature)
    return _fused(module, embeddings, labels, indices_tuple, module.W, _columns_of(module.W), unit_x=True, unit_w=True, scale=inv_t,
                  offset=0.0, target_logit=lambda x, w, cos: cos * inv_t)


def softmax(module, embeddings, labels, indices_tuple):
    return _fused(module, embeddings, labels, indices_tuple, module.W, _columns_of(module.W), distance_ok=lambda d: True,
                  unit_x=False, unit_w=False, scale=1.0, offset=0.0,
                  target_logit=lambda x, w, cos: (x * w).sum(dim=1))
