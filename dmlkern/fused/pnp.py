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
inside the clamp, 0 outside, times f'(r_qj) by `torch.func.vjp` of f on the (B, P) ranks.
"""
import torch

from .._determinism import fixed_order_sum
from ._common import decline, is_unit_cosine
from ._epilogue import ZERO_LOSS
from ._stats import record_distance
from .ranking import _common_checks, _dense_ids, _rows_of, _Spec, row_stats

BACKEND = "blocked"
_CLAMP = 50.0  # PML's bound on the sigmoid's exponent


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
        self.labels, sizes = _dense_ids(labels)
        # each class's members, in row order: the class's rows are order[starts[c]:starts[c] + sizes[c]]
        self.order = torch.sort(self.labels, stable=True)[1]
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.sizes = sizes
        self.group = int(sizes.max())
        self.values_per_row = 4 * self.group  # a few (B, P, N) tensors live at once

    def _members(self, r0, b):
        """(B, P) indices of each row's class members (padded with the row itself) and which are real
        (none for a row alone in its class: it has no positive and no loss)."""
        device = self.labels.device
        rows = torch.arange(r0, r0 + b, device=device)
        ids = self.labels[r0:r0 + b]
        slot = torch.arange(self.group, device=device)
        size = self.sizes[ids][:, None]
        real = (slot < size) & (size > 1)
        at = (self.starts[ids][:, None] + torch.where(real, slot, 0)).clamp(max=len(self.order) - 1)
        return torch.where(real, self.order[at], rows[:, None]), real

    def _block(self, s, r0):
        """The block's members, the 0/1 negative mask (B, N), the clamp's exponent e = exp(clamped)
        (B, P, N), where it is inside the clamp, and the ranks (B, P)."""
        cols, real = self._members(r0, s.shape[0])
        negative = (self.labels[r0:r0 + s.shape[0], None] != self.labels[None, :]).to(s.dtype)
        z = -(s[:, None, :] - s.gather(1, cols)[:, :, None]) / self.anneal  # PML's exponent
        inside = (z >= -_CLAMP) & (z <= _CLAMP)
        e = torch.exp(torch.clamp(z, min=-_CLAMP, max=_CLAMP))
        ranks = (1.0 / (1.0 + e) * negative[:, None, :]).sum(dim=-1)  # PML's product with the mask (NaN stays)
        return cols, real, negative, e, inside, ranks

    def rows(self, s, r0, differentiable=False):
        """Per row q: sum over its class members j of f(r_qj) (0 for a row alone in its class);
        differentiable as written (the create_graph twin)."""
        _, real, _, _, _, ranks = self._block(s, r0)
        return torch.where(real, self.f(ranks), 0).sum(dim=1, keepdim=True)

    def grad_rows(self, s, r0, g_out):
        cols, real, negative, e, inside, ranks = self._block(s, r0)
        _, f_vjp = torch.func.vjp(self.f, ranks)
        g_rank = torch.where(real, f_vjp(g_out[:, :1].expand_as(ranks))[0], 0)  # (B, P)
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
    class_size = spec.sizes[spec.labels]
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
