"""Scratch: dmlkern.triton.pair_engine against the materialising reference (interpreter)."""
import itertools
import os

import pytest
import torch

from dmlkern import reference as R

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="interpreter only")

from dmlkern.triton.pair_engine import engine_backward, engine_forward  # noqa: E402

# (N, M or None (self, exclude_diag), D, labels)
SHAPES = [(1, None, 19, 1), (37, None, 19, 5), (70, None, 70, 4), (37, 130, 19, 3), (70, 130, 70, 6),
          (1, 130, 70, 2), (37, None, 19, 1)]  # last: one label -> no negatives at all
COMBOS = [(0, 0), (0, 1), (1, 0)]  # (transform, mining)
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12), torch.float16: (2e-2, 2e-2)}


def _params(transform, mining):
    if transform == 1:
        return [1.0, -0.3, -1.0, 1.1, 0.0]
    return [-2.0, 1.0, 10.0, -5.0, 0.1 if mining else 0.0]


def _inputs(n, m, d, k, dtype, seed, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    xl = torch.randint(0, k, (n,), generator=g)
    if m is None:
        y, yl = x, xl
    else:
        y = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
        yl = torch.randint(0, k + 1, (m,), generator=g)  # a label only y has
    x, y = x.to(dtype), (x.to(dtype) if m is None else y.to(dtype))
    if noncontig:
        x = x.t().contiguous().t()
        xl = torch.stack([xl, xl], 1)[:, 0]
        if m is None:
            y, yl = x, xl
        else:
            y = torch.stack([y, y], 2)[:, :, 0]
            yl = torch.stack([yl, yl], 1)[:, 1]
    return x, y, xl, yl


def _row_in(x, y, xl, yl, excl, transform, params, dtype_stats):
    """Realistic row_in: the reference extrema (mining thresholds) and L = lse_neg."""
    n = x.shape[0]
    ri = torch.zeros(n, 3, dtype=dtype_stats)
    ext = R.engine_forward(x, y, xl, yl, ri, 0, transform, 0, params, excl)
    ri[:, :2] = ext
    lse = R.engine_forward(x, y, xl, yl, ri, 1, transform, 0, params, excl)
    ri[:, 2] = lse[:, 1]
    return ri


def _close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    assert a.dtype == b.dtype and a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda msg: f"{what}: {msg}")
    # identical inf pattern
    assert torch.equal(torch.isinf(a), torch.isinf(b)), what


def _coef(ri_lse, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a_p = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    a_n = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    b_p = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    for t in (a_p, a_n, b_p):
        t[torch.rand(n, generator=g) < 0.25] = 0.0
    c = torch.stack([a_p, ri_lse[:, 0].double(), a_n, ri_lse[:, 1].double(), b_p], 1)
    return c.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_backward(shape, dtype):
    n, m, d, k = shape
    excl = m is None
    stats = dtype
    for (transform, mining), noncontig in itertools.product(COMBOS, (False, True)):
        if noncontig and shape not in SHAPES[2:4]:
            continue
        x, y, xl, yl = _inputs(n, m, d, k, dtype, seed=n * 7 + d, noncontig=noncontig)
        params = _params(transform, mining)
        ri = _row_in(x, y, xl, yl, excl, transform, params, stats)
        tag = f"{shape} {dtype} t{transform} m{mining} nc{noncontig}"
        for pk in (0, 1, 2):
            got = engine_forward(x, y, xl, yl, ri, pk, transform, mining, params, excl)
            want = R.engine_forward(x, y, xl, yl, ri, pk, transform, mining, params, excl)
            _close(got, want, dtype, f"fwd p{pk} {tag}")
        lse = R.engine_forward(x, y, xl, yl, ri, 1, transform, mining, params, excl)
        coef = _coef(lse, n, stats, seed=n + d)
        gx, gy = engine_backward(x, y, xl, yl, ri, coef, transform, mining, params, excl)
        rx, ry = R.engine_backward(x, y, xl, yl, ri, coef, transform, mining, params, excl)
        scale_x = rx.abs().max().clamp_min(1e-3)
        scale_y = ry.abs().max().clamp_min(1e-3)
        _close(gx / scale_x, rx / scale_x, dtype, f"grad_x {tag}")
        _close(gy / scale_y, ry / scale_y, dtype, f"grad_y {tag}")
        assert not torch.isnan(gx).any() and not torch.isnan(gy).any(), tag


def test_forward_matches_own_lse():
    """lse from this engine's own forward as LSE (the realistic chain)."""
    x, y, xl, yl = _inputs(37, None, 19, 4, torch.float32, seed=3)
    params = [1 / 0.07, 0.0, 1 / 0.07, 0.0, 0.0]
    ri = torch.zeros(37, 3)
    out = engine_forward(x, x, xl, xl, ri, 1, 0, 0, params, True)
    ri[:, 2] = out[:, 1]
    sp = engine_forward(x, x, xl, xl, ri, 2, 0, 0, params, True)
    _close(sp, R.engine_forward(x, x, xl, xl, ri, 2, 0, 0, params, True), torch.float32, "sp")
    coef = torch.stack([torch.ones(37), out[:, 0], torch.ones(37) * 0.5, out[:, 1], torch.ones(37)], 1)
    gx, gy = engine_backward(x, x, xl, xl, ri, coef, 0, 0, params, True)
    rx, ry = R.engine_backward(x, x, xl, xl, ri, coef, 0, 0, params, True)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gy, ry, rtol=1e-4, atol=1e-4)


def test_fp16_loose():
    for m in (None, 130):
        x, y, xl, yl = _inputs(37, m, 19, 4, torch.float16, seed=5)
        excl = m is None
        for transform, mining in COMBOS:
            params = _params(transform, mining)
            ri = _row_in(x.float(), y.float(), xl, yl, excl, transform, params, torch.float32)
            for pk in (0, 1, 2):
                got = engine_forward(x, y, xl, yl, ri, pk, transform, mining, params, excl)
                want = R.engine_forward(x, y, xl, yl, ri, pk, transform, mining, params, excl)
                assert got.dtype == torch.float32
                _close(got, want, torch.float16, f"fp16 p{pk} t{transform} m{mining}")
            lse = R.engine_forward(x, y, xl, yl, ri, 1, transform, mining, params, excl)
            coef = _coef(lse, 37, torch.float32, seed=1)
            gx, gy = engine_backward(x, y, xl, yl, ri, coef, transform, mining, params, excl)
            rx, ry = R.engine_backward(x, y, xl, yl, ri, coef, transform, mining, params, excl)
            assert gx.dtype == torch.float16 and gy.dtype == torch.float16
            s = rx.abs().max().float().clamp_min(1e-3)
            torch.testing.assert_close(gx.float() / s, rx.float() / s, rtol=2e-2, atol=2e-2)
            s = ry.abs().max().float().clamp_min(1e-3)
            torch.testing.assert_close(gy.float() / s, ry.float() / s, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [None, 130])
def test_nan_row(dtype, m):
    x, y, xl, yl = _inputs(37, m, 19, 4, dtype, seed=11)
    x = x.clone()
    x[3] = float("nan")
    excl = m is None
    if excl:
        y = x
    for transform, mining in COMBOS:
        params = _params(transform, mining)
        ri = _row_in(x, y, xl, yl, excl, transform, params, dtype)
        for pk in (0, 1, 2):
            got = engine_forward(x, y, xl, yl, ri, pk, transform, mining, params, excl)
            want = R.engine_forward(x, y, xl, yl, ri, pk, transform, mining, params, excl)
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (pk, transform, mining, got, want)
            _close(got, want, dtype, f"nan fwd p{pk} t{transform} m{mining}")
        lse = R.engine_forward(x, y, xl, yl, ri, 1, transform, mining, params, excl)
        coef = _coef(lse, 37, dtype, seed=2)
        gx, gy = engine_backward(x, y, xl, yl, ri, coef, transform, mining, params, excl)
        rx, ry = R.engine_backward(x, y, xl, yl, ri, coef, transform, mining, params, excl)
        assert torch.equal(torch.isnan(gx), torch.isnan(rx)), (transform, mining)
        assert torch.equal(torch.isnan(gy), torch.isnan(ry)), (transform, mining)
        fin = ~torch.isnan(rx)
        torch.testing.assert_close(gx[fin], rx[fin], rtol=1e-4, atol=1e-4)


def test_empty_and_degenerate():
    # all labels distinct, self: no positives anywhere; M = 0; N = 0
    x, _, _, _ = _inputs(20, None, 16, 2, torch.float32, seed=1)
    lab = torch.arange(20)
    ri = torch.zeros(20, 3)
    params = [1.0, 0.0, 1.0, 0.0, 0.0]
    for pk in (0, 1, 2):
        _close(engine_forward(x, x, lab, lab, ri, pk, 0, 0, params, True),
               R.engine_forward(x, x, lab, lab, ri, pk, 0, 0, params, True), torch.float32, f"distinct p{pk}")
    y0 = x[:0]
    for pk in (0, 1, 2):
        got = engine_forward(x, y0, lab, lab[:0], ri, pk, 0, 0, params, False)
        want = R.engine_forward(x, y0, lab, lab[:0], ri, pk, 0, 0, params, False)
        _close(got, want, torch.float32, f"M=0 p{pk}")
    gx, gy = engine_backward(x, y0, lab, lab[:0], ri, torch.zeros(20, 5), 0, 0, params, False)
    assert gx.shape == x.shape and gy.shape == (0, 16) and not gx.any()
    assert engine_forward(x[:0], x, lab[:0], lab, ri[:0], 1, 0, 0, params, False).shape == (0, 2)
    # L = -inf / +inf rows for pos_softplus; -inf LSE with nonzero A in backward
    x, y, xl, yl = _inputs(37, 130, 19, 3, torch.float64, seed=9)
    ri = torch.zeros(37, 3, dtype=torch.float64)
    ri[::3, 2] = float("-inf")
    ri[1::3, 2] = float("inf")
    ri[2::3, 2] = 50.0  # softplus above its threshold of 20
    params = [-2.0, 1.0, 10.0, -5.0, 0.0]
    _close(engine_forward(x, y, xl, yl, ri, 2, 0, 0, params, False),
           R.engine_forward(x, y, xl, yl, ri, 2, 0, 0, params, False), torch.float64, "L inf")
    coef = torch.ones(37, 5, dtype=torch.float64)
    coef[:, 1] = float("-inf")
    coef[::2, 3] = float("-inf")
    ri[:, 2] = 0.5
    gx, gy = engine_backward(x, y, xl, yl, ri, coef, 0, 0, params, False)
    rx, ry = R.engine_backward(x, y, xl, yl, ri, coef, 0, 0, params, False)
    _close(gx, rx, torch.float64, "gx -inf lse")
    _close(gy, ry, torch.float64, "gy -inf lse")


def test_inf_value_lse():
    # an inf entry makes s = +-inf / NaN; the lse of a row holding +inf must be +inf like torch.logsumexp
    x, y, xl, yl = _inputs(5, 9, 4, 2, torch.float64, seed=4)
    y = y.clone()
    y[2] = torch.tensor([float("inf"), 0, 0, 0], dtype=torch.float64)
    x = x.abs()
    ri = torch.zeros(5, 3, dtype=torch.float64)
    for pk in (0, 1, 2):
        got = engine_forward(x, y, xl, yl, ri, pk, 0, 0, [1.0, 0.0, 1.0, 0.0, 0.0], False)
        want = R.engine_forward(x, y, xl, yl, ri, pk, 0, 0, [1.0, 0.0, 1.0, 0.0, 0.0], False)
        torch.testing.assert_close(got, want, equal_nan=True)
