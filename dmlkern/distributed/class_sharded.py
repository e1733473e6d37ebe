"""Class-sharded margin-softmax and proxy losses (Partial FC without sampling): rank r holds the
class weights of its classes [c0_r, c1_r) only, and the loss is exactly the wrapped loss on the
global batch (every rank's embeddings, concatenated in rank order) against all the classes.

`ClassShardedLoss(loss_class, num_classes, embedding_size, class_range=None, group=None,
**loss_kwargs)` wraps ArcFaceLoss, CosFaceLoss, SphereFaceLoss, NormalizedSoftmaxLoss,
ProxyNCALoss or SubCenterArcFaceLoss (dmlkern.losses), built with this rank's classes only
(`.loss`; its weight, `.weight`, is the shard). class_range defaults to an even split (rank r:
[r C / world, (r + 1) C / world), rounded down); the ranks' ranges must tile [0, C). Its forward
takes this rank's embeddings (N_r rows, any N_r, 0 included) and labels (an integer tensor of
global class ids).

Per call: one all_gather of a few integers per rank (row counts, input checks, class ranges, so
that bad input raises the same ValueError on every rank), then the embeddings and labels are
gathered in rank order. Each rank computes, for every global sample, its shard's part of the
softmax: the log-sum-exp over its classes other than the target (`_ShardLSE`: the column blocks
and block kernels of fused/class_softmax.py, no N x C logits) and the target's (margin-modified)
logit when the target is one of its classes. The parts are combined exactly: an all-reduce of
each sample's maximum of the shards' log-sum-exps, then of their sums of exp relative to it; the
target logit is the owner's value plus the other ranks' zeros (the two sums in one all-reduce). Then
loss_i = log(1 + e^(lse_i - t_i)) (class_softmax.class_cross_entropy) and the wrapped loss's
reducer on the global per-sample losses (ProxyNCA first leaves out the samples whose target
probability underflows to 0, as its fused path does). Memory per rank: O(N_global D + C_shard D).

Gradient contract:
- The returned value is the global loss L, the same on every rank.
- The shard's weights get exactly dL/dW_shard. They are not replicated: keep them out of DDP
  (don't put this module inside the DistributedDataParallel model, which would broadcast rank 0's
  shard to every rank and average the shards' gradients; step them with their own optimiser).
- The embeddings get world_size * dL/d(this rank's embeddings), so that once DDP has averaged the
  model's gradients over the ranks they equal the single-process gradient of L on the global
  batch.
- No double backward (create_graph=True raises).

world_size 1 (or torch.distributed not initialised): no collective runs, the shard is every
class, and value and gradients are those of the wrapped loss's fused path on the batch.
Not covered (ValueError at construction): weight or embedding regularizers, distances other than
the fused paths' (the margin family's cosine; ProxyNCA's squared Euclidean or cosine of unit rows).
Eager only (the owned samples are found with a data-dependent nonzero); no indices_tuple.
"""
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from ..fused import _common
from ..fused._epilogue import _element
from ..fused.class_softmax import (ClassLayout, EngineBlock, GroupedBlock, _lse_over_blocks, blocked_backward,
                                   class_cross_entropy)
from ..fused.grouped_classes import MaxOverGroup, per_class
from ..fused.margin_softmax import logit_rows, target_logits, target_weight_rows, without_zero_probability
from ..fused.proxy_nca import _is_unit_squared_euclidean, _supported as _proxy_nca_distance_ok
from ..losses import (ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, ProxyNCALoss, SphereFaceLoss,
                      SubCenterArcFaceLoss)
from ..ops import pair_engine as pe
from ..reference import classification_losses as ref
from . import collectives as co

NOT_OWNED = -1  # a sample's shard-local label when its target is another shard's class: no class matches it


class _ShardLSE(torch.autograd.Function):
    """(lse, w_t) of one class shard: lse_i = log sum_j exp(logit_ij) over the shard's classes j
    other than labels[i] (shard-local labels; NOT_OWNED: every class counts), and w_t the class
    rows of the samples `owned` (their labels in [0, C_shard)). class_softmax._ClassLSE with the
    targets of a subset of the samples: the same column blocks and block kernels, and one
    C_shard x D gradient buffer (the target rows' gradient added to it in place)."""

    @staticmethod
    def forward(x, weight, labels, owned, kernel, layout):
        lse = _lse_over_blocks(x, weight, labels, kernel, layout)
        return lse, layout.target(weight, labels.index_select(0, owned))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, labels, owned, kernel, layout = inputs
        ctx.save_for_backward(x, weight, labels, owned, output[0])
        ctx.config = (kernel, layout)

    @staticmethod
    def backward(ctx, grad, grad_target):
        x, weight, labels, owned, lse = ctx.saved_tensors
        if pe.backward_needs_graph(x):
            raise RuntimeError("ClassShardedLoss has no double backward (create_graph=True)")
        kernel, layout = ctx.config
        gx, gw = blocked_backward(x, weight, labels, kernel, layout, grad, lse, ctx.needs_input_grad[:2])
        if gw is not None:
            layout.add_target_grad(gw, labels.index_select(0, owned), grad_target)
        return (None if gx is None else gx.to(x.dtype)), gw, None, None, None, None


class _Spec(NamedTuple):
    """How a loss enters the class path (the table of fused/margin_softmax.py): its weight, the
    layout of its class rows, whether x and the weight rows enter the logits as unit vectors, the
    block kernel for a backend, and the target's logit from (x, w_t, cos_t)."""
    weight_name: str
    layout: ClassLayout
    unit_x: bool
    unit_w: bool
    kernel: Callable
    target_logit: Callable
    drop_zero_probability: bool = False
    logits_times_norm: bool = False  # (SphereFace) margin_softmax.class_loss_dict's
    cdist: bool = False  # (ProxyNCA's Euclidean distance) margin_softmax.class_loss_dict's


def _engine_kernel(unit_w, scale, offset=0.0, autocast_rounding=True):
    return lambda x, backend: EngineBlock(unit_w, scale, offset, backend, x, autocast_rounding)


def _columns(module):
    return ClassLayout(columns=True, num_classes=module.W.shape[1])


def _arcface(m):
    s, margin = float(m.scale), float(m.margin)
    return _Spec("W", _columns(m), True, True, _engine_kernel(True, s),
                 lambda x, w, cos: s * ref.arcface_target_logit(cos, margin))


def _cosface(m):
    s, margin = float(m.scale), float(m.margin)
    return _Spec("W", _columns(m), True, True, _engine_kernel(True, s), lambda x, w, cos: s * (cos - margin))


def _sphereface(m):
    s, margin = float(m.scale), int(m.margin)
    return _Spec("W", _columns(m), False, True, _engine_kernel(True, s),
                 lambda x, w, cos: ref._lm_target(cos, margin) * torch.linalg.vector_norm(x, dim=1) * s,
                 logits_times_norm=True)


def _normalized_softmax(m):
    inv_t = 1.0 / float(m.temperature)
    return _Spec("W", _columns(m), True, True, _engine_kernel(True, inv_t), lambda x, w, cos: cos * inv_t)


def _proxy_nca(m):
    s = float(m.softmax_scale)
    euclidean = _is_unit_squared_euclidean(m.distance)
    sc, off = (2 * s, -2 * s) if euclidean else (s, 0.0)
    return _Spec("proxies", ClassLayout(columns=False, num_classes=m.proxies.shape[0]), True, True,
                 _engine_kernel(True, sc, off, autocast_rounding=not euclidean), lambda x, w, cos: sc * cos + off,
                 drop_zero_probability=True, cdist=euclidean)


def _subcenter_arcface(m):
    s, margin, k = float(m.scale), float(m.margin), int(m.sub_centers)
    return _Spec("W", ClassLayout(columns=True, num_classes=int(m.num_classes), group=k), True, True,
                 lambda x, backend: GroupedBlock(MaxOverGroup, s, k, backend),
                 lambda x, w, cos: s * ref.arcface_target_logit(per_class(cos, k).max(dim=-1).values, margin))


_SPECS = {ArcFaceLoss: _arcface, CosFaceLoss: _cosface, SphereFaceLoss: _sphereface,
          NormalizedSoftmaxLoss: _normalized_softmax, ProxyNCALoss: _proxy_nca,
          SubCenterArcFaceLoss: _subcenter_arcface}


def even_class_range(num_classes, world, r):
    """Rank r's classes in the default split: [r C / world, (r + 1) C / world), rounded down."""
    return r * num_classes // world, (r + 1) * num_classes // world


def _combine_over_ranks(t_part, lse_part, group):
    """(t, lse) of every sample over all the shards: t the sum of the shards' target logits (the
    owner's, and zeros), lse the log of the sum of exp(lse_part) over the ranks, exact and
    differentiable in lse_part (the all-reduced maximum is only a shift, taken without gradient).
    The sums share one all-reduce."""
    top = lse_part.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, 0.0)  # no other class on any shard: lse = -inf
    t, total = co.all_reduce_sum(torch.stack([t_part, torch.exp(lse_part - top)]), group)
    return t, top + torch.log(total)


# Each rank's facts of a call, exchanged before anything else so that every rank raises together.
_ROWS, _PROBLEM, _LOW, _HIGH, _C0, _C1 = range(6)
_OK, _BAD_EMBEDDINGS, _BAD_LABELS = range(3)


class ClassShardedLoss(torch.nn.Module):
    """The wrapped class-weight loss with its classes split across the ranks of `group`: see the
    module docstring for the semantics and the gradient contract.

    `.loss` is the local module (num_classes = this shard's class count; its parameter `.weight`
    is the shard), `.class_range` = (c0, c1) this rank's global class ids, `shard_of(full)` this
    rank's part of a tensor shaped like the unsharded weight, `load_from_full(full_loss)` copies
    this rank's slice of an unsharded loss's weight into the shard, `last_backend` the engine
    backend of the last call ("cpp", "triton", or "reference" where no kernel covers the dtype;
    SubCenterArcFace: "cpp" for the grouped CPU kernel, "blocked" for its torch block ops)."""

    def __init__(self, loss_class, num_classes, embedding_size, class_range=None, group=None, **loss_kwargs):
        super().__init__()
        if loss_class not in _SPECS:
            names = ", ".join(c.__name__ for c in _SPECS)
            raise ValueError(f"loss_class must be one of {names}, got {getattr(loss_class, '__name__', loss_class)}")
        self.group = group
        world, r = co.world_size(group), co.rank(group)
        if class_range is None:
            if num_classes < world:
                raise ValueError(f"num_classes={num_classes} is less than the world size {world}: "
                                 "give every rank a non-empty class_range")
            class_range = even_class_range(num_classes, world, r)
        c0, c1 = (int(c) for c in class_range)
        if not 0 <= c0 < c1 <= num_classes:
            raise ValueError(f"class_range must be (c0, c1) with 0 <= c0 < c1 <= num_classes={num_classes}, "
                             f"got {tuple(class_range)}")
        self.num_classes, self.embedding_size, self.class_range = int(num_classes), int(embedding_size), (c0, c1)
        self.loss = loss_class(num_classes=c1 - c0, embedding_size=embedding_size, **loss_kwargs)
        for name in ("weight_regularizer", "embedding_regularizer"):
            if getattr(self.loss, name, None) is not None:
                raise ValueError(f"ClassShardedLoss does not apply a {name}")
        distance_ok = _proxy_nca_distance_ok if loss_class is ProxyNCALoss else _common.is_unit_cosine
        if not distance_ok(self.loss.distance):
            raise ValueError(f"ClassShardedLoss has no path for {loss_class.__name__} with the distance "
                             f"{type(self.loss.distance).__name__}")
        self.last_backend = None

    def _spec(self):
        return _SPECS[type(self.loss)](self.loss)

    @property
    def weight(self):
        """This rank's shard of the class weights (a parameter of `.loss`)."""
        return getattr(self.loss, self._spec().weight_name)

    def shard_of(self, full):
        """This rank's part of `full`, a tensor shaped like the unsharded loss's weight (W (D, C K)
        or proxies (C, D)): its values, or its gradient."""
        layout = self._spec().layout
        c0, c1 = self.class_range
        rows = layout.rows(full)[c0 * layout.group:c1 * layout.group]
        return rows.t() if layout.columns else rows

    def load_from_full(self, full_loss):
        """Copies this rank's slice of an unsharded loss's weight (same class, num_classes) into the
        shard, in the full weight's dtype and device."""
        full = getattr(full_loss, self._spec().weight_name)
        part = self.shard_of(full)
        if type(full_loss) is not type(self.loss) or full_loss.num_classes != self.num_classes \
                or part.shape != self.weight.shape:
            raise ValueError(f"full_loss must be an unsharded {type(self.loss).__name__} with num_classes="
                             f"{self.num_classes} and embedding_size={self.embedding_size}")
        self.loss.cast_types(full.dtype, full.device)
        with torch.no_grad():
            self.weight.copy_(part)

    def _facts(self, embeddings, labels):
        """This rank's row count, input problem and label range, and class range (int64)."""
        n, problem, low, high = 0, _OK, 0, 0
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 \
                or embeddings.shape[1] != self.embedding_size:
            problem = _BAD_EMBEDDINGS
        elif not isinstance(labels, torch.Tensor) or labels.shape != (embeddings.shape[0],) \
                or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            problem = _BAD_LABELS
        else:
            n = embeddings.shape[0]
            if n:
                low, high = torch.stack(torch.aminmax(labels.to(torch.int64))).tolist()  # one read
        device = embeddings.device if isinstance(embeddings, torch.Tensor) else None
        return torch.tensor([n, problem, low, high, *self.class_range], dtype=torch.int64, device=device)

    def _check(self, facts):
        """Raises the same ValueError on every rank for any rank's bad input; else the row counts."""
        for r, (n, problem, low, high, _, _) in enumerate(facts.tolist()):
            if problem == _BAD_EMBEDDINGS:
                raise ValueError(f"embeddings on rank {r} must be a 2-D tensor with embedding_size="
                                 f"{self.embedding_size} columns")
            if problem == _BAD_LABELS:
                raise ValueError(f"labels on rank {r} must be a 1-D integer tensor with one entry per embedding")
            if n and (low < 0 or high >= self.num_classes):
                raise ValueError(f"labels must be class ids in [0, num_classes={self.num_classes}), got values "
                                 f"from {low} to {high} on rank {r}")
        ranges = sorted((c0, c1) for c0, c1 in facts[:, _C0:].tolist())
        if ranges[0][0] != 0 or ranges[-1][1] != self.num_classes or any(
                a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
            raise ValueError(f"the ranks' class_range must tile [0, num_classes={self.num_classes}), got "
                             f"{facts[:, _C0:].tolist()} (rank order)")
        return facts[:, _ROWS].tolist()

    def forward(self, embeddings, labels):
        """The global loss (the same on every rank) for this rank's embeddings (N_r, D) and labels
        (N_r,), global class ids."""
        world = co.world_size(self.group)
        facts = self._facts(embeddings, labels)
        if world > 1:
            parts = [torch.empty_like(facts) for _ in range(world)]
            dist.all_gather(parts, facts, group=self.group)
            facts = torch.stack(parts)
        sizes = self._check(facts.reshape(world, -1))
        labels = labels.to(device=embeddings.device, dtype=torch.int64)
        if world > 1:
            x_all = co.gather_columns(co.scale_grad(embeddings, world), sizes, own_first_order=False, group=self.group)
            labels_all = co.gather_labels(labels, sizes, own_first_order=False, group=self.group)
        else:
            x_all, labels_all = embeddings, labels
        if x_all.shape[0] == 0:
            return torch.sum(x_all * 0)
        self.loss.cast_types(x_all.dtype, x_all.device)
        spec = self._spec()
        losses = self._global_losses(x_all, labels_all, spec, world > 1)
        entry = _element(losses.to(x_all.dtype), len(losses))
        loss_dict = {"loss": entry}
        if spec.drop_zero_probability:  # the same global losses on every rank: the same samples kept
            loss_dict = without_zero_probability(self.loss, entry, losses)
        return self.loss.reducer(loss_dict, x_all, labels_all)

    def _global_losses(self, x_all, labels_all, spec, spread):
        """Every global sample's loss: this shard's parts, combined over the ranks when spread."""
        backend = _common.engine_backend(x_all, self.loss.backend) or "reference"
        self.last_backend = backend
        layout, weight = spec.layout, getattr(self.loss, spec.weight_name)
        x = logit_rows(x_all, spec.unit_x, spec.cdist, spec.logits_times_norm)
        local = labels_all - self.class_range[0]
        is_owned = (local >= 0) & (local < layout.num_classes)
        owned = is_owned.nonzero().squeeze(1)
        local = torch.where(is_owned, local, NOT_OWNED)
        kernel = spec.kernel(x, backend)
        lse_part, w_t = _ShardLSE.apply(x, weight, local, owned, kernel, layout)
        self.last_backend = getattr(kernel, "ran", None) or backend  # (SubCenter's grouped blocks: their own)
        w_t = target_weight_rows(w_t, x, spec.cdist)
        x_t = x.index_select(0, owned)  # index_select: a deterministic (serial) backward on a CPU
        t_owned = target_logits(x_t, w_t, layout, spec.unit_x, spec.unit_w, spec.target_logit).to(lse_part.dtype)
        t_part = torch.zeros_like(lse_part).index_copy(0, owned, t_owned)
        if spread:
            t, lse = _combine_over_ranks(t_part, lse_part, self.group)
        else:
            t, lse = t_part, lse_part
        return class_cross_entropy(t, lse, x_all.dtype)
