"""Triton masked log-sum-exp over the pairs of X and Y, tile by tile.

Forward: one program per block of BLOCK_M rows streams column tiles of Y,
computes the similarity tile with tl.dot (looping over D in BLOCK_K slices),
masks it by labels and folds it into an online (max, sum) per row. Only the
per-row LSE is written.
Backward (FlashAttention-style): the LSE is saved, the tiles are recomputed.
One program owns a block of rows of X (for dX) or of Y (for dY) and is their
only writer, so there are no atomics and results are deterministic.
"""
import torch
import triton
import triton.language as tl

from . import interpret_mode


@triton.jit
def _pair_keep(x_lab, y_lab, i_idx, j_idx, i_ok, j_ok, MASK_MODE: tl.constexpr,
               EXCLUDE_DIAG: tl.constexpr):
    # x_lab / i_idx / i_ok are [BM, 1]-shaped, the y side [1, BN]-shaped (or transposed).
    keep = i_ok & j_ok
    if MASK_MODE == 1:
        keep = keep & (x_lab == y_lab)
    if MASK_MODE == 2:
        keep = keep & (x_lab != y_lab)
    if EXCLUDE_DIAG:
        keep = keep & (i_idx != j_idx)
    return keep


@triton.jit
def _sim_tile(A, B, a_idx, b_idx, a_ok, b_ok, D, s_an, s_ad, s_bn, s_bd,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """<A[a], B[b]> for a tile of rows a and b, accumulated in ACC_DTYPE."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(A + a_idx[:, None] * s_an + ks[None, :] * s_ad, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + b_idx[:, None] * s_bn + ks[None, :] * s_bd, mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong: compute in fp32 there
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc += tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _masked_lse_fwd_kernel(X, Y, XL, YL, LSE, N, M, D,
                           s_xn, s_xd, s_yn, s_yd, scale,
                           MASK_MODE: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: N * D may exceed 2**31
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    x_lab = tl.load(XL + rows, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    s_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        sim = _sim_tile(X, Y, rows, cols, row_ok, col_ok, D, s_xn, s_xd, s_yn, s_yd,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ACC_DTYPE, INPUT_PRECISION)
        y_lab = tl.load(YL + cols, mask=col_ok, other=0)
        keep = _pair_keep(x_lab[:, None], y_lab[None, :], rows[:, None], cols[None, :],
                          row_ok[:, None], col_ok[None, :], MASK_MODE, EXCLUDE_DIAG)
        v = tl.where(keep, sim * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(v, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps exp(-inf - -inf) out
        s_i = s_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(v - m_ref[:, None]), axis=1)
        m_i = m_new
    empty = s_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, s_i)))
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _masked_lse_grad_kernel(OWN, OTHER, XL, YL, G, LSE, GRAD, N_OWN, N_OTHER, D,
                            s_on, s_od, s_tn, s_td, s_gn, s_gd, scale,
                            OWN_IS_X: tl.constexpr, MASK_MODE: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_DOUT: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr):
    """GRAD[a, dout] = sum_b w(a, b) OTHER[b, dout] for this program's block of `own` rows a.

    w(i, j) = g_i * scale * exp(scale * s_ij - lse_i) on kept pairs, where (i, j) = (a, b)
    for dX (OWN_IS_X) and (b, a) for dY. A second grid axis splits D into BLOCK_DOUT slices.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    own = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    own_ok = own < N_OWN
    douts = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT).to(tl.int64)
    dout_ok = douts < D
    if OWN_IS_X:
        own_lab = tl.load(XL + own, mask=own_ok, other=0)
        own_g = tl.load(G + own, mask=own_ok, other=0.0)
        own_lse = tl.load(LSE + own, mask=own_ok, other=float("-inf"))
    else:
        own_lab = tl.load(YL + own, mask=own_ok, other=0)
    grad = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=ACC_DTYPE)
    for c0 in range(0, N_OTHER, BLOCK_N):
        oth = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        oth_ok = oth < N_OTHER
        sim = _sim_tile(OWN, OTHER, own, oth, own_ok, oth_ok, D, s_on, s_od, s_tn, s_td,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ACC_DTYPE, INPUT_PRECISION)
        if OWN_IS_X:
            oth_lab = tl.load(YL + oth, mask=oth_ok, other=0)
            keep = _pair_keep(own_lab[:, None], oth_lab[None, :], own[:, None], oth[None, :],
                              own_ok[:, None], oth_ok[None, :], MASK_MODE, EXCLUDE_DIAG)
            g = own_g[:, None]
            lse = own_lse[:, None]
        else:
            oth_lab = tl.load(XL + oth, mask=oth_ok, other=0)
            keep = _pair_keep(oth_lab[None, :], own_lab[:, None], oth[None, :], own[:, None],
                              oth_ok[None, :], own_ok[:, None], MASK_MODE, EXCLUDE_DIAG)
            g = tl.load(G + oth, mask=oth_ok, other=0.0)[None, :]
            lse = tl.load(LSE + oth, mask=oth_ok, other=float("-inf"))[None, :]
        keep = keep & (lse != float("-inf"))
        lse_ref = tl.where(keep, lse, 0.0)
        w = tl.where(keep, g * scale * tl.exp(sim * scale - lse_ref), 0.0)
        other_d = tl.load(OTHER + oth[:, None] * s_tn + douts[None, :] * s_td,
                          mask=oth_ok[:, None] & dout_ok[None, :], other=0.0)
        if UPCAST:
            other_d = other_d.to(ACC_DTYPE)
        else:
            w = w.to(other_d.dtype)  # half-precision inputs: tensor-core product, fp32 accumulate
        grad += tl.dot(w, other_d, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(GRAD + own[:, None] * s_gn + douts[None, :] * s_gd, grad,
             mask=own_ok[:, None] & dout_ok[None, :])


def _launch_config(x):
    """Tile sizes, accumulator dtype and dot precision for inputs like x."""
    interp = interpret_mode()
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.dtype == torch.float32:
        # Follow torch's matmul precision setting: IEEE unless the user allowed TF32.
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        precision = "ieee"
    # The interpreter computes in numpy; fp64/fp16/bf16 dots go through fp32/fp64 there.
    upcast = interp or x.dtype == torch.float64
    return dict(UPCAST=upcast, ACC_DTYPE=acc, INPUT_PRECISION=precision)


def _block_k(d):
    return max(16, min(64, triton.next_power_of_2(d)))


def masked_lse_fwd(x, y, x_labels, y_labels, scale, mask_mode, exclude_diag, wrap=lambda k: k):
    n, d = x.shape
    m = y.shape[0]
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lse = torch.empty(n, device=x.device, dtype=stats_dtype)
    if n == 0:
        return lse
    block_m, block_n = 64, 64
    grid = (triton.cdiv(n, block_m),)
    wrap(_masked_lse_fwd_kernel)[grid](
        x, y, x_labels, y_labels, lse, n, m, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), float(scale),
        MASK_MODE=mask_mode, EXCLUDE_DIAG=exclude_diag,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(d), **_launch_config(x))
    return lse


def masked_lse_bwd(grad_lse, x, y, x_labels, y_labels, lse, scale, mask_mode, exclude_diag,
                   wrap=lambda k: k):
    n, d = x.shape
    m = y.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = torch.zeros(n, d, device=x.device, dtype=acc_dtype)
    grad_y = torch.zeros(m, d, device=y.device, dtype=acc_dtype)
    if n > 0 and m > 0:
        g = grad_lse.to(acc_dtype).contiguous()
        lse = lse.to(acc_dtype).contiguous()
        block_m, block_n = 64, 64
        block_dout = max(16, min(128, triton.next_power_of_2(d)))
        cfg = _launch_config(x)
        for own, other, grad, own_is_x in ((x, y, grad_x, True), (y, x, grad_y, False)):
            grid = (triton.cdiv(own.shape[0], block_m), triton.cdiv(d, block_dout))
            wrap(_masked_lse_grad_kernel)[grid](
                own, other, x_labels, y_labels, g, lse, grad,
                own.shape[0], other.shape[0], d,
                own.stride(0), own.stride(1), other.stride(0), other.stride(1),
                grad.stride(0), grad.stride(1), float(scale),
                OWN_IS_X=own_is_x, MASK_MODE=mask_mode, EXCLUDE_DIAG=exclude_diag,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(d), BLOCK_DOUT=block_dout, **cfg)
    return grad_x.to(x.dtype), grad_y.to(y.dtype)
