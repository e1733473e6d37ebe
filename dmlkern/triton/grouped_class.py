"""The class path's grouped block kernel in Triton: the GPU twin of csrc/cpu/grouped_class_cpu.cpp
(SubCenterArcFace's sub-centres, SoftTriple's centres: K weight rows per class), with the same
contract as the ops in dmlkern/ops/grouped_class_op.py; GroupedBlock (fused/class_softmax.py) calls
it for blocks on the Triton backend, and its torch ops are the yardstick of its tests
(tests/test_grouped_class_triton.py).

A column tile holds BLOCK_C whole classes, each padded from K to KP (a power of two) weight rows, so
one product gives an (rows, BLOCK_C * KP) tile that reshapes to (rows, BLOCK_C, KP): the per-class
reduction (max over k, or the soft assignment) is a reduction over its last axis. The padding's
columns load zeros and are masked out (KP / K more product work: 4/3 at K = 3, 8/5 at K = 10).

- forward: a program owns a block of x rows and folds every column tile into a running max and
  sum (online log-sum-exp over the classes other than the row's own);
- backward, one kernel launched twice (OWN_IS_X): for grad_x a program owns a block of x rows (and
  a slice of D), recomputes each tile, turns it into dL/ds and multiplies it onto the tile's weight
  rows; for grad_w a program owns a column tile's weight rows (and a slice of D) and walks the x
  row blocks, adding dL/ds^T x.
Every output has one writer and a fixed order of additions: no atomics, deterministic."""
import torch
import triton
import triton.language as tl

from ..engine_spec import stats_dtype
from .pair_engine import _launch_config, _split
from .tile_math import _load_rows, _param, _sim_tile

REDUCE_MAX = tl.constexpr(0)  # ops.grouped_class_op.REDUCE_MAX
MAX_GROUP = 64  # larger K: GroupedBlock's torch ops (a column tile holds at least one class's KP rows)


@triton.jit
def _class_tile(X, W, LAB, rows, rows_ok, c0, n_cls, class0, D, s_xn, s_xd, s_wn, s_wd, s_lab, inv_gamma,
                REDUCE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """The tile of x rows `rows` and the block's classes c0 .. c0 + BLOCK_C - 1: (s, v, aux, keep,
    cols, cols_ok) with s the (BLOCK_M, BLOCK_C, KP) cosines, v the (BLOCK_M, BLOCK_C) class values,
    aux the max's first hit (REDUCE 0) or the soft assignment's q (REDUCE 1), both (BLOCK_M,
    BLOCK_C, KP), keep the classes that count (in the block, not the row's own), and the tile's
    weight rows (cols, cols_ok: BLOCK_C * KP, in the order of s's last two axes)."""
    BLOCK_R: tl.constexpr = BLOCK_C * KP
    j = tl.arange(0, BLOCK_R)
    cols = (c0 + j // KP).to(tl.int64) * K + j % KP
    cols_ok = (c0 + j // KP < n_cls) & (j % KP < K)
    s = _sim_tile(X, W, rows, cols, rows_ok, cols_ok, D, s_xn, s_xd, s_wn, s_wd,
                  BLOCK_M, BLOCK_R, BLOCK_K, UPCAST, ACC_DTYPE, INPUT_PRECISION)
    s = tl.reshape(s, [BLOCK_M, BLOCK_C, KP])
    k = tl.arange(0, KP)[None, None, :]
    k_ok = k < K
    if REDUCE == REDUCE_MAX:  # torch.maximum over k: NaN if any is; the gradient to the first k attaining it
        v = tl.max(tl.where(k_ok, s, float("-inf")), axis=2)
        has_nan = tl.max(tl.where(k_ok & (s != s), 1, 0), axis=2) > 0
        v = tl.where(has_nan, float("nan"), v)
        first = tl.min(tl.where(k_ok & (s == v[:, :, None]), k, KP), axis=2)
        aux = k == first[:, :, None]
    else:  # q = softmax_k(s_k / gamma), v = sum_k q_k s_k (the padding: q = 0, s = 0)
        z = tl.where(k_ok, s * inv_gamma, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=2)[:, :, None])
        aux = e / tl.sum(e, axis=2)[:, :, None]
        v = tl.sum(aux * s, axis=2)
    lab = tl.load(LAB + rows * s_lab, mask=rows_ok, other=-1)
    cls = c0 + tl.arange(0, BLOCK_C)
    keep = (cls < n_cls)[None, :] & ((class0 + cls)[None, :] != lab[:, None])
    return s, v, aux, keep, cols, cols_ok


@triton.jit
def _grouped_fwd_kernel(X, W, LAB, LSE, N, n_cls, class0, D, s_xn, s_xd, s_wn, s_wd, s_lab,
                        scale_h, scale_m, scale_l, ig_h, ig_m, ig_l, REDUCE: tl.constexpr, K: tl.constexpr,
                        KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """LSE[i] = log sum over the block's classes q other than LAB[i] - class0 of exp(scale v_iq).
    scale and inv_gamma arrive as three fp32 pieces each (pair_engine._split: exact in fp64)."""
    scale = _param(scale_h, scale_m, scale_l, ACC_DTYPE)
    inv_gamma = _param(ig_h, ig_m, ig_l, ACC_DTYPE)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < N
    run_max = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    run_sum = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for c0 in range(0, n_cls, BLOCK_C):
        _, v, _, keep, _, _ = _class_tile(X, W, LAB, rows, rows_ok, c0, n_cls, class0, D, s_xn, s_xd, s_wn, s_wd,
                                          s_lab, inv_gamma, REDUCE, K, KP, BLOCK_M, BLOCK_C, BLOCK_K, UPCAST,
                                          ACC_DTYPE, INPUT_PRECISION)
        t = tl.where(keep, v * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(t, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no class yet: keep the sum at 0, not NaN
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(t - shift[:, None]), axis=1)
        run_max = new_max
    lse = tl.where(run_sum == 0.0, float("-inf"), run_max + tl.log(run_sum))
    tl.store(LSE + rows, lse, mask=rows_ok)


@triton.jit
def _grouped_grad_tile(X, W, LAB, LSE, GRAD, rows, rows_ok, c0, n_cls, class0, D, s_xn, s_xd, s_wn, s_wd, s_lab,
                       scale, inv_gamma, REDUCE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(dL/ds as (BLOCK_M, BLOCK_C * KP), cols, cols_ok) of a tile: dL/ds_ick = GRAD_i scale
    exp(scale v_iq - LSE_i) dv_iq/ds_ick, 0 at the own class and outside the block (as the torch
    twin's where(-inf logit, 0, ...)); NaN propagates."""
    s, v, aux, keep, cols, cols_ok = _class_tile(X, W, LAB, rows, rows_ok, c0, n_cls, class0, D, s_xn, s_xd, s_wn,
                                                 s_wd, s_lab, inv_gamma, REDUCE, K, KP, BLOCK_M, BLOCK_C, BLOCK_K,
                                                 UPCAST, ACC_DTYPE, INPUT_PRECISION)
    lse = tl.load(LSE + rows, mask=rows_ok, other=0.0).to(ACC_DTYPE)
    g_row = tl.load(GRAD + rows, mask=rows_ok, other=0.0).to(ACC_DTYPE) * scale
    p = tl.where(keep, tl.exp(v * scale - lse[:, None]), 0.0) * g_row[:, None]
    if REDUCE == REDUCE_MAX:
        g = tl.where(aux, p[:, :, None], 0.0)
    else:  # dv/ds_k = q_k (1 + (s_k - v) / gamma)
        g = aux * ((s - v[:, :, None]) * inv_gamma + 1.0) * p[:, :, None]
    return tl.reshape(g, [BLOCK_M, BLOCK_C * KP]), cols, cols_ok


@triton.jit
def _grouped_bwd_kernel(X, W, LAB, LSE, GRAD, GOUT, N, n_cls, class0, D, s_xn, s_xd, s_wn, s_wd, s_lab, s_gn, s_gd,
                        scale_h, scale_m, scale_l, ig_h, ig_m, ig_l, OWN_IS_X: tl.constexpr, REDUCE: tl.constexpr,
                        K: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr, UPCAST: tl.constexpr,
                        ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """OWN_IS_X: GOUT = grad_x, a program owns a block of x rows and walks the column tiles,
    GOUT[rows, dout slice] = sum of dL/ds W[cols, dout slice]. Else GOUT = grad_w, a program owns a
    column tile's weight rows and walks the x row blocks, GOUT[cols, dout slice] = sum of
    dL/ds^T X[rows, dout slice]."""
    scale = _param(scale_h, scale_m, scale_l, ACC_DTYPE)
    inv_gamma = _param(ig_h, ig_m, ig_l, ACC_DTYPE)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_DOUT
    if OWN_IS_X:
        own = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        own_ok = own < N
        acc = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=ACC_DTYPE)
        steps, step = n_cls, BLOCK_C
    else:
        j = tl.arange(0, BLOCK_C * KP)
        own_c0 = tl.program_id(0) * BLOCK_C
        own = (own_c0 + j // KP).to(tl.int64) * K + j % KP
        own_ok = (own_c0 + j // KP < n_cls) & (j % KP < K)
        acc = tl.zeros([BLOCK_C * KP, BLOCK_DOUT], dtype=ACC_DTYPE)
        steps, step = N, BLOCK_M
    for t0 in range(0, steps, step):
        if OWN_IS_X:
            rows, rows_ok, c0 = own, own_ok, t0
        else:
            rows = t0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rows_ok, c0 = rows < N, own_c0
        g, cols, cols_ok = _grouped_grad_tile(X, W, LAB, LSE, GRAD, rows, rows_ok, c0, n_cls, class0, D, s_xn, s_xd,
                                              s_wn, s_wd, s_lab, scale, inv_gamma, REDUCE, K, KP, BLOCK_M, BLOCK_C,
                                              BLOCK_K, UPCAST, ACC_DTYPE, INPUT_PRECISION)
        if OWN_IS_X:
            other = _load_rows(W, cols, cols_ok, d0, D, s_wn, s_wd, BLOCK_DOUT, UPCAST, ACC_DTYPE)
        else:
            other = _load_rows(X, rows, rows_ok, d0, D, s_xn, s_xd, BLOCK_DOUT, UPCAST, ACC_DTYPE)
            g = tl.trans(g)
        if not UPCAST:
            g = g.to(other.dtype)  # half-precision inputs: tensor-core product, fp32 accumulate
        acc += tl.dot(g, other, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    douts = d0 + tl.arange(0, BLOCK_DOUT)
    tl.store(GOUT + own[:, None] * s_gn + douts[None, :] * s_gd, acc.to(GOUT.dtype.element_ty),
             mask=own_ok[:, None] & (douts < D)[None, :])


def _tiles(x, group):
    """The launch constants: row block, classes per column tile (BLOCK_C * KP weight rows), the K
    slice and the backward's output slice of D, with the warps: fp32 64 x 32 tiles over 8 warps,
    fp16 / bf16 64 x 64 over 8 warps, fp64 32 x 32 over 4 warps. In the sm_90 builds at D = 128
    (`scripts/triton_compile_check.py --only grp`, K = 3 and 10) they spill at most 16 bytes per
    thread. Not yet timed on a GPU."""
    d = x.shape[1]
    kp = triton.next_power_of_2(group)
    half = x.element_size() == 2
    block_m, columns, warps = (32, 32, 4) if x.dtype == torch.float64 else (64, 64 if half else 32, 8)
    block_k = max(16, min(64 if half else 32, triton.next_power_of_2(d)))
    return dict(K=group, KP=kp, BLOCK_M=block_m, BLOCK_C=max(1, columns // kp), BLOCK_K=block_k,
                BLOCK_DOUT=max(16, min(128 if half else 64, triton.next_power_of_2(d)))), dict(num_warps=warps)


def supports(x, group):
    """Whether the Triton kernel takes rows like x in classes of `group` rows."""
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and 1 <= group <= MAX_GROUP


def _check(x, w, labels, group):
    """The C++ op's argument checks (csrc/ops.cpp), so both backends reject the same inputs."""
    if x.dim() != 2 or w.dim() != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"x (N, D) and w (R, D) must be 2-D with the same D, got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"w must have x's dtype and device, got {w.dtype} on {w.device} and {x.dtype} on {x.device}")
    if not 1 <= group <= MAX_GROUP or w.shape[0] % group:
        raise ValueError(f"group must be in 1..{MAX_GROUP} and divide w's {w.shape[0]} rows, got {group}")
    if labels.shape != (x.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({x.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")


def _common(x, w, labels, class0, group, reduce, scale, inv_gamma):
    _check(x, w, labels, group)
    n, d = x.shape
    n_cls = w.shape[0] // group
    tiles, options = _tiles(x, group)
    args = (n, n_cls, int(class0), d, x.stride(0), x.stride(1), w.stride(0), w.stride(1), labels.stride(0))
    return tiles, options, args, dict(REDUCE=int(reduce), **_launch_config(x)), (*_split(scale), *_split(inv_gamma))


def grouped_class_lse(x, w, labels, class0, group, reduce, scale, inv_gamma=1.0, wrap=lambda k: k):
    """ops.grouped_class_op.grouped_class_lse on the Triton backend (same arguments and result);
    wrap: torch.library.wrap_triton when called inside the registered op."""
    lse = torch.full((x.shape[0],), float("-inf"), dtype=stats_dtype(x.dtype), device=x.device)
    if x.shape[0] == 0 or w.shape[0] == 0:
        _check(x, w, labels, group)
        return lse
    tiles, options, args, flags, consts = _common(x, w, labels, class0, group, reduce, scale, inv_gamma)
    tiles.pop("BLOCK_DOUT")
    grid = (triton.cdiv(x.shape[0], tiles["BLOCK_M"]),)
    wrap(_grouped_fwd_kernel)[grid](x, w, labels, lse, *args, *consts, **tiles, **flags, **options)
    return lse


def grouped_class_lse_backward(x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse, wrap=lambda k: k):
    """ops.grouped_class_op.grouped_class_lse_backward on the Triton backend: (grad_x, grad_w) in
    x's and w's dtypes, grad_w contiguous (R, D)."""
    n, d = x.shape
    empty = n == 0 or w.shape[0] == 0 or d == 0  # else the kernels write every element
    grad_x = (torch.zeros if empty else torch.empty)(x.shape, dtype=x.dtype, device=x.device)
    grad_w = (torch.zeros if empty else torch.empty)(w.shape, dtype=w.dtype, device=w.device)
    if empty:
        _check(x, w, labels, group)
        return grad_x, grad_w
    tiles, options, args, flags, consts = _common(x, w, labels, class0, group, reduce, scale, inv_gamma)
    grad, lse = grad.to(lse.dtype).contiguous(), lse.contiguous()
    d_slices = triton.cdiv(d, tiles["BLOCK_DOUT"])
    for own_is_x, out, blocks in ((True, grad_x, triton.cdiv(n, tiles["BLOCK_M"])),
                                  (False, grad_w, triton.cdiv(args[1], tiles["BLOCK_C"]))):
        wrap(_grouped_bwd_kernel)[(blocks, d_slices)](x, w, labels, lse, grad, out, *args, out.stride(0),
                                                      out.stride(1), *consts, OWN_IS_X=own_is_x, **tiles, **flags,
                                                      **options)
    return grad_x, grad_w
