"""SupCon's row epilogue (fused/supcon.py): `_RowLosses`' closed-form backward against autograd's
graph of the same formula (`row_losses`), on every case of a row: no positive (finite and NaN
statistics), one positive (its term kept, or exactly 0 as PML's), several, and infinite gaps."""
import pytest
import torch

from dmlkern.fused.supcon import _apply_row_losses, row_losses

INF, NAN = float("inf"), float("nan")
INV_T = 1 / 0.07


def _rows(dtype):
    """(lse (N, 2), pos_sim_mean, count): one row per case, then random rows."""
    cases = [  # (lse_pos, lse_neg, pos_sim_mean, count)
        (-INF, 3.0, 0.0, 0),  # no positive
        (-INF, NAN, 0.0, 0),  # no positive, NaN in the row
        (2.0, 3.0, 0.14, 1),  # one positive
        (60.0, 3.0, 4.2, 1),  # one positive far above the negatives: PML's exact 0 in fp32 and fp64
        (5.0, 4.0, 0.3, 3),  # several
        (5.0, -INF, 0.3, 3),  # no negative
        (5.0, INF, 0.3, 2),  # an infinite negative term
        (NAN, 1.0, 0.2, 2),  # NaN among the positives
    ]
    g = torch.Generator().manual_seed(0)
    n = 37
    lse = torch.randn(n, 2, generator=g, dtype=torch.float64) * 4
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    count = torch.randint(0, 4, (n,), generator=g).to(torch.float64)
    lse[count == 0, 0] = -INF
    for i, (a, b, m, c) in enumerate(cases):
        lse[i, 0], lse[i, 1], mean[i], count[i] = a, b, m, c
    return lse.to(dtype), mean.to(dtype), count.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_equals_autograd_of_the_formula(dtype):
    lse, mean, count = _rows(dtype)
    upstream = torch.linspace(0.5, 2.0, len(count), dtype=dtype)
    results = []
    for fn in (_apply_row_losses, row_losses):
        a, b = lse.clone().requires_grad_(True), mean.clone().requires_grad_(True)
        value = fn(a, b, count, INV_T, dtype)[0]
        results.append((value.detach(), *torch.autograd.grad(value, (a, b), upstream)))
    (value, d_lse, d_mean), (want, want_lse, want_mean) = results
    assert torch.equal(value.isnan(), want.isnan()) and torch.equal(value.nan_to_num(), want.nan_to_num())
    torch.testing.assert_close(d_lse, want_lse, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(d_mean, want_mean, rtol=0, atol=0, equal_nan=True)
    # the cases are there: the NaN row's gradient, a row zeroed as PML's (no gradient), a kept one
    assert d_lse[1, 1].isnan() and value[3] == 0 and d_lse[3].abs().sum() == 0 and d_lse[2, 1] != 0


def test_double_backward_and_torch_func():
    """create_graph=True and torch.func.grad: autograd's gradient of the formula (with its graph)."""
    lse, mean, count = _rows(torch.float64)
    keep = count > 0  # finite rows (NaN and inf rows would make the comparison meaningless)
    keep[[1, 6, 7]] = False
    lse, mean, count = lse[keep], mean[keep], count[keep]
    lse[:, 0] = torch.where(count > 0, lse[:, 0], -INF)
    v = torch.randn_like(lse)
    hvps = []
    for fn in (_apply_row_losses, row_losses):
        a = lse.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(a, mean, count, INV_T, torch.float64)[0].sum(), a, create_graph=True)
        hvps.append(torch.autograd.grad((g.nan_to_num(0.0, 0.0, 0.0) * v).sum(), a)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-12, equal_nan=True)  # (NaN: softplus" at -inf)
    assert hvps[0].nan_to_num().abs().sum() > 0

    def total(fn):
        return lambda a, b: fn(a, b, count, INV_T, torch.float64)[0].sum()

    got = torch.func.grad(total(_apply_row_losses), argnums=(0, 1))(lse, mean)
    want = torch.func.grad(total(row_losses), argnums=(0, 1))(lse, mean)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
