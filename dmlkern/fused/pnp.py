"""PNPLoss without PML's (N, N, N) tensors (backend "blocked").

PML's loss, per query q with a positive: the mean over q's class (q itself included) of f(r_qj),
with r_qj = sum over q's negatives k of sig((s_qk - s_qj) / anneal), sig PML's clamped sigmoid
(`reference.ranking_losses.pnp_sigmoid`: exponent in [-50, 50], zero gradient outside) and f the
variant's; the loss is the mean over those queries (1 - it for "Dq"), already reduced.

Each row q needs only its similarity row s_q = x_q . X (unit rows): a block of rows b builds the
(B, P, N) differences s_qk - s_qj for the P members j of each row's class (P the largest class;
shorter classes padded and masked) and reduces them to one number per row, sum_j f(r_qj)
(`ranking.row_stats`: row blocks of a `fixed_mm` product, the backward recomputing each block).
Work O(N P N), memory O(B P N + N D) with B P N ~1M values, against PML's N^3 (which it holds
several times). The backward is written out (autograd through the block would keep several
(B, P, N) tensors): with e = exp(clamped exponent), d sig / d(s_qk - s_qj) = e / (1 + e)^2 / anneal
inside the clamp, 0 outside, times f'(r_qj) by the vector-Jacobian product of f on the (B, P) ranks. On a
CPU the ranks and their backward run in C++ (`dmlkern::pnp_ranks`, csrc/cpu/pnp_rows_cpu.cpp: one
pass over the row per member, no (B, P, N) tensor); elsewhere the torch ops above.
"""
import torch

from .._autograd import vjp
from .._determinism import fixed_order_sum
from ..ops.dispatch import extension_loaded
from ._common import decline, is_unit_cosine
from ._epilogue import ZERO_LOSS
from ._stats import record_distance
from .ranking import ClassMembers, _common_checks, _rows_of, _Spec, row_stats

BACKEND = "blocked"
_CLAMP = 50.0  # PML's bound on the sigmoid's exponent
_CPU_KERNEL = extension_loaded() and hasattr(torch.ops.dmlkern, "pnp_ranks")
if _CPU_KERNEL:  # their shapes, for FakeTensor tracing
    @torch.library.register_fake("dmlkern::pnp_ranks")
    def _pnp_ranks_fake(s, cols, real, row_labels, col_labels, anneal):
        return s.new_empty(cols.shape)

    @torch.library.register_fake("dmlkern::pnp_ranks_backward")
    def _pnp_ranks_backward_fake(s, cols, real, row_labels, col_labels, anneal, g_rank):
        return s.new_empty(s.shape)


def _variant_fn(variant, b, alpha):
    """f of PML's variant, on the ranks (the reference's expressions)."""
    return {
        "O": lambda r: r,
        "Ds": lambda r: torch.log(1 + r),
        "Dq": lambda r: 1 / (1 + r) ** alpha,
        "Iu": lambda r: (1 + r) * torch.log(1 + r),
        "Ib": lambda r: 1 / b**2 * (b * r - torch.log(1 + b * r)),
    }[variant]


class _PNPSpec(_Spec):
    def __init__(self, labels, anneal, f):
        self.anneal, self.f = anneal, f
        self.members = ClassMembers(labels)
        self.labels = self.members.ids
        # live values per row: a few (P, N) blocks in torch; in C++ only (N,) ones (s, its gradient)
        self.values_per_row = 4 if _CPU_KERNEL and labels.device.type == "cpu" else 4 * self.members.width

    def _members(self, r0, b):
        """(B, P) indices of each row's class members (padded with the row itself) and which are real
        (none for a row alone in its class: it has no positive and no loss)."""
        cols, real = self.members.block(r0, b, exclude_self=False)
        return cols, real & (self.members.sizes[self.labels[r0:r0 + b]] > 1)[:, None]

    def _kernel(self, s, differentiable=False):
        """Whether the block's ranks run in C++ (`dmlkern::pnp_ranks`, csrc/cpu/pnp_rows_cpu.cpp):
        a CPU block, not for the create_graph twin (the op has no autograd)."""
        return _CPU_KERNEL and s.device.type == "cpu" and not differentiable

    def _torch_block(self, s, r0):
        """The block's members, the 0/1 negative mask (B, N), the clamp's exponent e = exp(clamped)
        (B, P, N), where it is inside the clamp, and the ranks (B, P)."""
        cols, real = self._members(r0, s.shape[0])
        negative = (self.labels[r0:r0 + s.shape[0], None] != self.labels[None, :]).to(s.dtype)
        z = -(s[:, None, :] - s.gather(1, cols)[:, :, None]) / self.anneal  # PML's exponent
        inside = (z >= -_CLAMP) & (z <= _CLAMP)
        e = torch.exp(torch.clamp(z, min=-_CLAMP, max=_CLAMP))
        ranks = (1.0 / (1.0 + e) * negative[:, None, :]).sum(dim=-1)  # PML's product with the mask (NaN stays)
        return cols, real, negative, e, inside, ranks

    def _ranks(self, s, r0, differentiable=False):
        """(cols, real, ranks) of the block's rows' class members."""
        if self._kernel(s, differentiable):
            cols, real = self._members(r0, s.shape[0])
            ranks = torch.ops.dmlkern.pnp_ranks.default(s, cols, real, self.labels[r0:r0 + s.shape[0]], self.labels,
                                                self.anneal)
            return cols, real, ranks
        cols, real, _, _, _, ranks = self._torch_block(s, r0)
        return cols, real, ranks

    def rows(self, s, r0, differentiable=False):
        """Per row q: sum over its class members j of f(r_qj) (0 for a row alone in its class);
        differentiable as written in torch (the create_graph twin)."""
        _, real, ranks = self._ranks(s, r0, differentiable)
        return torch.where(real, self.f(ranks), 0).sum(dim=1, keepdim=True)

    def grad_rows(self, s, r0, g_out):
        if self._kernel(s):
            cols, real, ranks = self._ranks(s, r0)
        else:  # the block once: its ranks and what the slopes need
            cols, real, negative, e, inside, ranks = self._torch_block(s, r0)
        g_rank = torch.where(real, vjp(self.f, ranks, g_out[:, :1].expand_as(ranks)), 0)  # (B, P)
        if self._kernel(s):
            return torch.ops.dmlkern.pnp_ranks_backward.default(s, cols, real, self.labels[r0:r0 + s.shape[0]], self.labels,
                                                        self.anneal, g_rank)
        slope = torch.where(inside, e / ((1.0 + e) * (1.0 + e)), 0) / self.anneal  # d sig / d(s_qk - s_qj)
        w = g_rank[:, :, None] * slope * negative[:, None, :]  # dL / d(s_qk - s_qj)
        g_s = w.sum(dim=1)  # + d/ds_qk
        # - d/ds_qj; a padded slot (the row itself) adds exactly 0
        return g_s.scatter_add_(1, cols, -w.sum(dim=2))


def pnp(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    why = _common_checks(module, embeddings, labels, indices_tuple, ref_emb)
    if why is None and not is_unit_cosine(module.distance):
        why = f"distance {type(module.distance).__name__} (not unit cosine)"
    if why is not None:
        return decline(module, why)
    spec = _PNPSpec(labels, module.anneal, _variant_fn(module.variant, module.b, module.alpha))
    class_size = spec.members.sizes[spec.labels]
    has_pos = class_size > 1  # PML's safe_N: the row has a positive (then itself counts too)
    if not bool(has_pos.any()):
        return ZERO_LOSS
    record_distance(module.distance, embeddings, embeddings)
    per_row = row_stats(_rows_of(embeddings, "cosine"), spec).to(embeddings.dtype)[:, 0]
    n_pos = class_size[has_pos].to(per_row.dtype)
    loss = fixed_order_sum(per_row[has_pos] / n_pos) / has_pos.sum()
    if module.variant == "Dq":
        loss = 1 - loss
    return {"loss": {"losses": loss, "indices": torch.where(has_pos)[0],
                     "reduction_type": "already_reduced"}}, BACKEND


__all__ = ["pnp"]
