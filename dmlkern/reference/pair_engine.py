"""Materialising reference of the tiled pair engine (docs/ENGINE.md): the ground truth every
backend's `engine_forward` / `engine_backward` is tested against. Readable, not fast."""
import math

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["engine_values", "engine_masks", "engine_forward", "engine_backward", "check_symmetric",
           "check_hinge_mining", "check_circle"]

from ..engine_spec import (COEF_WIDTH, COEF_WIDTH_HINGE, COEF_WIDTH_LIFT, PARAM_COUNTS, PARAMS_BASE, PARAMS_CIRCLE,
                           PASS_EXTREMA, PASS_HINGE, PASS_LIFTED_PAIRS, PASS_LSE2, PASS_POS_SOFTPLUS, TRANSFORM_CIRCLE, EngineParams,
                           stats_dtype)
from .pair_reductions import masked_row_lse


def engine_values(x, y, transform):
    """v = s (transforms 0 and 2) or sqrt(max(2 - 2s, 0)) (transform 1), in the stats dtype."""
    s = x.to(stats_dtype(x.dtype)) @ y.to(stats_dtype(x.dtype)).T
    if transform in (0, TRANSFORM_CIRCLE):
        return s
    if transform == 1:
        # sqrt with the kernels' gradient convention at 0 (dv/ds = 0 where v = 0): finite second
        # derivatives too (create_graph=True recomputes on this path). NaN stays NaN.
        d2 = torch.clamp(2 - 2 * s, min=0)
        pos = d2 > 0
        return torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), d2 * 0)
    raise ValueError(f"transform must be 0 or 1, got {transform}")


def engine_masks(v, x_labels, y_labels, row_in, mining, eps, exclude_diag):
    """(pos kept, neg kept) boolean N x M masks."""
    pos = x_labels[:, None] == y_labels[None, :]
    if exclude_diag:
        pos = pos & ~torch.eye(v.shape[0], v.shape[1], dtype=torch.bool, device=v.device)
    neg = x_labels[:, None] != y_labels[None, :]
    if mining == 1:
        pos = pos & (v - eps < row_in[:, 0:1])
        neg = neg & (v + eps > row_in[:, 1:2])
    return pos, neg


def _same_rows(a, b):
    """The same tensor, or equal values (NaN equal to NaN). Tensors that torch.compile traces
    (fake: no values) pass on their shapes; views of the same memory without a comparison."""
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if isinstance(a, FakeTensor) or isinstance(b, FakeTensor):
        return True
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b).all())


def check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, what):
    """Pass 3 and the C_lift column read row_in[j] for column j: the symmetric case only."""
    if not exclude_diag:
        raise ValueError(f"{what} needs the symmetric case: exclude_diag must be True")
    if not _same_rows(x, y):
        raise ValueError(f"{what} needs the symmetric case: y must be x (the same rows)")
    if not _same_rows(x_labels, y_labels):
        raise ValueError(f"{what} needs the symmetric case: y_labels must be x_labels")
    if int(mining) != 0:
        raise ValueError(f"{what} needs mining=0, got mining={mining}")


def check_circle(transform, mining, params, pass_kind=None, coef_width=None):
    """Transform 2 (circle): the lse2 pass and its softmax backward (row_coef (N, 5)), mining 0,
    9 params. No-op for the other transforms."""
    if int(transform) != TRANSFORM_CIRCLE:
        return
    if int(mining) != 0:
        raise ValueError(f"transform=2 (circle) needs mining=0, got mining={mining}")
    if len(params) < PARAMS_CIRCLE:
        raise ValueError(f"transform=2 (circle) needs 9 params (relu_pos, shift_pos, relu_neg, shift_neg after "
                         f"the 5), got {len(params)}")
    if pass_kind is not None and int(pass_kind) != PASS_LSE2:
        raise ValueError(f"transform=2 (circle) needs pass_kind=1 (lse2), got pass_kind={pass_kind}")
    if coef_width is not None and coef_width != COEF_WIDTH:
        raise ValueError(f"transform=2 (circle) needs row_coef with 5 columns (the lse2 backward), got {coef_width}")


def params_of(params):
    """The EngineParams of params (5, 9 or 10 floats; the circle constants default to 0, log_floor to
    -inf)."""
    params = tuple(params)
    if len(params) not in PARAM_COUNTS:
        raise ValueError(f"params must hold 5 floats [sc_pos, off_pos, sc_neg, off_neg, eps], 9 (then relu_pos, "
                         f"shift_pos, relu_neg, shift_neg) or 10 (then log_floor), got {len(params)}")
    p = EngineParams(*params)
    if math.isnan(p.log_floor) or p.log_floor == float("inf"):
        raise ValueError(f"params[9] (log_floor) must be finite or -inf, got {p.log_floor}")
    return p


def set_values(v, params):
    """Transform 2's per-set values (v_pos, v_neg) of v = s, their relu weights detached (PML's
    CircleLoss): relu(relu_pos - s)(s - shift_pos) and relu(s - relu_neg)(s - shift_neg)."""
    p = params_of(params)
    return (torch.relu(p.relu_pos - v.detach()) * (v - p.shift_pos),
            torch.relu(v.detach() - p.relu_neg) * (v - p.shift_neg))


def check_hinge_mining(mining, what):
    """The hinge pass and its backward keep every pair: mining 0 only."""
    if int(mining) != 0:
        raise ValueError(f"{what} needs mining=0, got mining={mining}")


def hinge_args(v, L, params):
    """(t_pos, t_neg) = (sc_pos v + off_pos + L_i, sc_neg v + off_neg - L_i), N x M."""
    sc_pos, off_pos, sc_neg, off_neg = params[:4]
    return (sc_pos * v + off_pos) + L[:, None], (sc_neg * v + off_neg) - L[:, None]


def softplus_slope(z, floor):
    """d/dz of the pos_softplus pass's term: sigmoid(z), times sigmoid(-(F + softplus(z))) with a
    log_floor F (the floored term -log(e^-softplus(z) + e^F))."""
    if floor == float("-inf"):
        return torch.sigmoid(z)
    return torch.sigmoid(z) * torch.sigmoid(-(floor + torch.logaddexp(z, torch.zeros_like(z))))


def lifted_relu(v, L, sc_pos, off_pos):
    """relu(z_ij), z_ij = logaddexp(L_i, L_j) + sc_pos * v_ij + off_pos (N x N); NaN stays NaN."""
    return torch.relu(torch.logaddexp(L[:, None], L[None, :]) + (sc_pos * v + off_pos))


def engine_forward(x, y, x_labels, y_labels, row_in, pass_kind, transform, mining, params, exclude_diag):
    sc_pos, off_pos, sc_neg, off_neg, eps = params_of(params)[:PARAMS_BASE]
    check_circle(transform, mining, params, pass_kind=pass_kind)
    v = engine_values(x, y, transform)
    if pass_kind == PASS_EXTREMA:
        pos, neg = engine_masks(v, x_labels, y_labels, row_in, 0, eps, exclude_diag)
        # As PML's MultiSimilarityMiner reads them from an ascending sort (NaN sorts last): the
        # max over neg is NaN if a kept v is NaN, the min over pos skips NaN (+inf if none left).
        max_neg = v.masked_fill(~neg, float("-inf")).amax(dim=1) if v.shape[1] else v.new_full((v.shape[0],), float("-inf"))
        min_pos = v.masked_fill(~pos | torch.isnan(v), float("inf")).amin(dim=1) if v.shape[1] else v.new_full((v.shape[0],), float("inf"))
        return torch.stack([max_neg, min_pos], dim=1)
    pos, neg = engine_masks(v, x_labels, y_labels, row_in, mining, eps, exclude_diag)
    if pass_kind == PASS_LSE2:
        v_pos, v_neg = set_values(v, params) if transform == TRANSFORM_CIRCLE else (v, v)
        return torch.stack([masked_row_lse(sc_pos * v_pos + off_pos, pos),
                            masked_row_lse(sc_neg * v_neg + off_neg, neg)], dim=1)
    if pass_kind == PASS_POS_SOFTPLUS:
        z = row_in[:, 2:3] - sc_pos * v - off_pos
        zero = torch.zeros((), dtype=v.dtype, device=v.device)
        # log(1 + e^z) exactly: F.softplus returns z above 20 (up to 2e-9 off); PML's NT-Xent doesn't
        floor = params_of(params).log_floor
        softplus, sigmoid = torch.logaddexp(z, zero), softplus_slope(z, floor)
        if floor != float("-inf"):  # -log(p + e^F), p = e^-softplus; 0 at p = 1 (PML's 1 + tiny rounds to 1)
            softplus = torch.where(softplus == 0, softplus,
                                   -torch.logaddexp(-softplus, torch.full_like(softplus, floor)))
        softplus = torch.where(pos, softplus, zero).sum(dim=1)
        sigmoid = torch.where(pos, sigmoid, zero).sum(dim=1)
        return torch.stack([softplus, sigmoid, pos.sum(dim=1).to(v.dtype)], dim=1)
    if pass_kind == PASS_LIFTED_PAIRS:
        check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, "pass_kind=3 (lifted_pairs)")
        L = row_in[:, 2]
        r = lifted_relu(v, L, sc_pos, off_pos)
        f = r * r * 0.5
        zero = torch.zeros((), dtype=v.dtype, device=v.device)
        # d f / d L_i = relu(z) * sigmoid(L_i - L_j), exactly 0 where relu(z) = 0 (also where
        # L_i = L_j = -inf and the sigmoid is NaN).
        w = torch.where(r != 0, r * torch.sigmoid(L[:, None] - L[None, :]), zero)
        return torch.stack([torch.where(pos, f, zero).sum(dim=1), torch.where(pos, w, zero).sum(dim=1),
                            (pos & (f > 0)).sum(dim=1).to(v.dtype)], dim=1)
    if pass_kind == PASS_HINGE:
        check_hinge_mining(mining, "pass_kind=4 (hinge)")
        t_pos, t_neg = hinge_args(v, row_in[:, 2], params)
        zero = torch.zeros((), dtype=v.dtype, device=v.device)
        # torch.relu keeps NaN; the counts compare > 0, which is false for NaN
        return torch.stack([torch.where(pos, torch.relu(t_pos), zero).sum(dim=1),
                            (pos & (t_pos > 0)).sum(dim=1).to(v.dtype),
                            torch.where(neg, torch.relu(t_neg), zero).sum(dim=1),
                            (neg & (t_neg > 0)).sum(dim=1).to(v.dtype)], dim=1)
    raise ValueError(f"pass_kind must be 0, 1, 2, 3 or 4, got {pass_kind}")


def engine_backward(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params, exclude_diag,
                    symmetric=False):
    sc_pos, off_pos, sc_neg, off_neg, eps = params_of(params)[:PARAMS_BASE]
    if row_coef.shape[1] not in (COEF_WIDTH, COEF_WIDTH_LIFT, COEF_WIDTH_HINGE):
        raise ValueError(f"row_coef must be (N, 5), (N, 6) or (N, 2) (the hinge backward), got {tuple(row_coef.shape)}")
    check_circle(transform, mining, params, coef_width=row_coef.shape[1])
    if row_coef.shape[1] == COEF_WIDTH_HINGE:
        check_hinge_mining(mining, "row_coef with 2 columns (the hinge backward)")
    v = engine_values(x, y, transform)
    pos, neg = engine_masks(v, x_labels, y_labels, row_in, mining, eps, exclude_diag)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    if row_coef.shape[1] == COEF_WIDTH_HINGE:  # H_pos, H_neg: relu's derivative [t > 0]
        t_pos, t_neg = hinge_args(v, row_in[:, 2], params)
        h_pos, h_neg = row_coef[:, 0:1], row_coef[:, 1:2]
        dv = (torch.where(pos & (h_pos != 0) & (t_pos > 0), h_pos * sc_pos, zero)
              + torch.where(neg & (h_neg != 0) & (t_neg > 0), h_neg * sc_neg, zero))
        return _backward_products(dv, v, x, y, x_labels, y_labels, transform, symmetric)
    a_pos, lse_pos, a_neg, lse_neg, b_pos = (row_coef[:, k:k + 1] for k in range(5))
    v_pos, v_neg = set_values(v, params) if transform == TRANSFORM_CIRCLE else (v, v)

    def lse_term(a, sc, off, lse, keep, v):
        live = keep & (a != 0) & (lse != float("-inf"))
        return torch.where(live, a * sc * torch.exp(sc * v + off - torch.where(live, lse, zero)), zero)

    live_b = pos & (b_pos != 0)
    slope = softplus_slope(row_in[:, 2:3] - sc_pos * v_pos - off_pos, params_of(params).log_floor)
    dv_pos = lse_term(a_pos, sc_pos, off_pos, lse_pos, pos, v_pos) - torch.where(live_b, b_pos * sc_pos * slope, zero)
    dv_neg = lse_term(a_neg, sc_neg, off_neg, lse_neg, neg, v_neg)
    if transform == TRANSFORM_CIRCLE:  # dv/ds: each set's relu weight (detached in PML)
        p = params_of(params)
        dv = (torch.where(pos, dv_pos * torch.relu(p.relu_pos - v), zero)
              + torch.where(neg, dv_neg * torch.relu(v - p.relu_neg), zero))
        return _backward_products(dv, v, x, y, x_labels, y_labels, 0, symmetric)
    dv = dv_pos + dv_neg
    if row_coef.shape[1] == 6:  # the lifted pairs term: C_lift_i sc_pos relu(z_ij) on pos pairs
        check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, "row_coef with 6 columns (C_lift)")
        c_lift = row_coef[:, 5:6]
        live_l = pos & (c_lift != 0)
        dv = dv + torch.where(live_l, c_lift * sc_pos * lifted_relu(v, row_in[:, 2], sc_pos, off_pos), zero)
    return _backward_products(dv, v, x, y, x_labels, y_labels, transform, symmetric)


def _backward_products(dv, v, x, y, x_labels, y_labels, transform, symmetric):
    """(grad_x, grad_y) from dl/dv: dv/ds, then the two products (their sum when symmetric)."""
    if transform == 1:
        dv = torch.where(v > 0, -dv / torch.where(v > 0, v, 1.0), torch.zeros((), dtype=v.dtype, device=v.device))
    grad_x = dv @ y.to(dv.dtype)
    grad_y = dv.T @ x.to(dv.dtype)
    if symmetric:  # y is x: the caller wants the sum (docs/ENGINE.md)
        if x.shape != y.shape or x_labels.shape != y_labels.shape:
            raise ValueError(f"symmetric=True needs y of x's shape (y is x), got {tuple(x.shape)} and {tuple(y.shape)}")
        grad_x, grad_y = grad_x + grad_y, torch.zeros_like(grad_y)
    return grad_x.to(x.dtype), grad_y.to(y.dtype)
