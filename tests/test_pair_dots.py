"""The ops dmlkern::pair_dots and pair_row_sums (csrc/cpu/pair_dots_cpu.cpp): the dot products
of listed row pairs, and each row's sum over its pairs, against fp64 torch on fresh random rows
(widths that are not multiples of the 16 lanes or 256-entry chunks, pair counts around the 64-pair
blocks, runs of pairs sharing a row, rows without pairs, strided rows), the same bits at any
thread count and however the pairs are batched, and their errors; and AngularLoss, whose blocked
path takes its pairs' sums through them on the CPU, against the group products they replaced."""
import pytest
import torch

from dmlkern import losses
from dmlkern.fused import angular
from dmlkern.ops import pair_dots_op

pytestmark = pytest.mark.skipif(not pair_dots_op._OP_READY, reason="needs the built extension (dmlkern._C)")

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float64: dict(atol=1e-13, rtol=1e-13)}


def _case(r, q, k, pairs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, k, generator=g, dtype=dtype)
    b = torch.randn(q, k, generator=g, dtype=dtype)
    # runs of pairs that share their row i (a row's pairs listed together), of random lengths
    i = torch.randint(0, r, (pairs,), generator=g).sort().values
    j = torch.randint(0, q, (pairs,), generator=g)
    return a, b, i, j


def _want(a, b, i, j):
    return (a.double()[i] * b.double()[j]).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("r, q, k, pairs", [(1, 1, 1, 1), (5, 3, 15, 7), (9, 11, 17, 65), (40, 33, 300, 200),
                                            (64, 64, 1037, 130), (3, 4, 0, 5), (3, 4, 8, 0)])
def test_pair_dots_match_fp64(dtype, r, q, k, pairs):
    a, b, i, j = _case(r, q, k, pairs, dtype, seed=r * 1000 + k + pairs)
    out = pair_dots_op.pair_dots(a, b, i, j)
    assert out.shape == (pairs,) and out.dtype == dtype
    scale = (a.double()[i].abs() * b.double()[j].abs()).sum(1)  # the sum of |terms| bounds the rounding
    err = (out.double() - _want(a, b, i, j)).abs()
    assert (err <= TOL[dtype]["atol"] + TOL[dtype]["rtol"] * scale).all(), err.max()


def test_strided_rows_and_nan():
    a, b, i, j = _case(20, 30, 100, 90, torch.float32, seed=5)
    wide = torch.randn(100, 20)
    wide.t()[:] = a  # a column-major view of the same values
    strided = wide.t()
    assert strided.stride(1) != 1
    assert torch.equal(pair_dots_op.pair_dots(strided, b, i, j), pair_dots_op.pair_dots(a, b, i, j))
    b = b.clone()
    b[j[3], 50] = float("nan")
    out = pair_dots_op.pair_dots(a, b, i, j)
    assert torch.isnan(out[j == j[3]]).all() and not torch.isnan(out[j != j[3]]).any()


def test_bits_do_not_depend_on_threads_or_batching():
    """Past the parallel grain and the 64-pair blocks: the same bits at 1, 2 and 3 threads, on
    repeat, and for each pair computed alone (no run shares its row then) or in another order."""
    a, b, i, j = _case(300, 250, 2000, 3001, torch.float32, seed=11)
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 2):
            torch.set_num_threads(threads)
            results.append(pair_dots_op.pair_dots(a, b, i, j))
    finally:
        torch.set_num_threads(prev)
    for other in results[1:]:
        assert torch.equal(other, results[0])
    alone = torch.cat([pair_dots_op.pair_dots(a, b, i[p:p + 1], j[p:p + 1]) for p in range(0, 3001, 97)])
    assert torch.equal(alone, results[0][::97])
    perm = torch.randperm(3001, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pair_dots_op.pair_dots(a, b, i[perm], j[perm]), results[0][perm])


def test_pair_dots_rejects_bad_arguments():
    a, b, i, j = _case(4, 5, 6, 7, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match=r"i\[.*\] = 4 is not a row of a"):
        pair_dots_op.pair_dots(a, b, torch.full_like(i, 4), j)
    with pytest.raises(RuntimeError, match=r"j\[0\] = -1 is not a row of b"):
        pair_dots_op.pair_dots(a, b, i, torch.full_like(j, -1))
    with pytest.raises(RuntimeError, match="i and j must have the same length"):
        pair_dots_op.pair_dots(a, b, i, j[:3])
    with pytest.raises(RuntimeError, match="1-D int64"):
        pair_dots_op.pair_dots(a, b, i.int(), j)
    with pytest.raises(RuntimeError, match="same width K"):
        pair_dots_op.pair_dots(a, b[:, :5], i, j)
    with pytest.raises(RuntimeError, match="same dtype"):
        pair_dots_op.pair_dots(a, b.double(), i, j)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        pair_dots_op.pair_dots(a.half(), b.half(), i, j)


def test_pair_dots_opcheck():
    a, b, i, j = _case(6, 7, 19, 9, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.dmlkern.pair_dots.default, (a, b, i, j))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("r, q, k, pairs", [(1, 1, 1, 1), (5, 3, 15, 7), (40, 33, 300, 200), (64, 9, 1037, 130),
                                            (3, 4, 0, 5), (6, 4, 8, 0)])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_pair_row_sums_match_fp64(dtype, r, q, k, pairs, scaled):
    """Against the dense product W @ b in fp64 (W holding each pair's weight, repeated pairs
    added), times scale; rows without pairs are 0 (the pairs in random order, not by row)."""
    a, b, i, j = _case(r, q, k, pairs, dtype, seed=r * 100 + k + pairs + scaled)
    g = torch.Generator().manual_seed(pairs)
    perm = torch.randperm(pairs, generator=g)
    i, j = i[perm], j[perm]
    w = torch.randn(pairs, generator=g, dtype=dtype)
    scale = torch.randn(r, k, generator=g, dtype=dtype) if scaled else None
    out = torch.full((r, k), float("nan"), dtype=dtype)  # every entry is written
    assert pair_dots_op.pair_row_sums(b, i, j, w, scale, out) is out
    dense = torch.zeros(r, q, dtype=torch.float64).index_put_((i, j), w.double(), accumulate=True)
    want = dense @ b.double()
    bound = torch.zeros(r, q, dtype=torch.float64).index_put_((i, j), w.double().abs(), accumulate=True) @ b.double().abs()
    if scaled:
        want, bound = want * scale.double(), bound * scale.double().abs()
    assert ((out.double() - want).abs() <= TOL[dtype]["atol"] + TOL[dtype]["rtol"] * 4 * bound).all()


def test_pair_row_sums_bits_nan_and_errors():
    a, b, i, j = _case(300, 250, 2000, 3001, torch.float32, seed=13)
    w = torch.randn(3001, generator=torch.Generator().manual_seed(1))
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(pair_dots_op.pair_row_sums(b, i, j, w, a, torch.empty(300, 2000)))
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(other, results[0]) for other in results[1:])
    b = b.clone()
    b[j[0], 7] = float("nan")
    out = pair_dots_op.pair_row_sums(b, i, j, w, None, torch.empty(300, 2000))
    hit = torch.zeros(300, dtype=torch.bool)
    hit[i[j == j[0]]] = True
    assert torch.isnan(out[hit, 7]).all() and not torch.isnan(out[~hit]).any()
    small = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="must not share memory with b or scale"):
        pair_dots_op.pair_row_sums(small, i[:2] % 4, j[:2] % 4, w[:2], None, small)
    with pytest.raises(RuntimeError, match="must not share memory with b or scale"):
        out = torch.empty(4, 6)
        pair_dots_op.pair_row_sums(small, i[:2] % 4, j[:2] % 4, w[:2], out, out)
    with pytest.raises(RuntimeError, match=r"i\[0\] = 9 is not a row of out"):
        pair_dots_op.pair_row_sums(small, torch.tensor([9]), torch.tensor([0]), w[:1], None, torch.empty(4, 6))
    with pytest.raises(RuntimeError, match="one entry per pair"):
        pair_dots_op.pair_row_sums(small, i[:2] % 4, j[:2] % 4, w[:3], None, torch.empty(4, 6))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        pair_dots_op.pair_row_sums(small, i[:2] % 4, j[:2] % 4, w[:2], None, torch.empty(6, 4).t())
    with pytest.raises(RuntimeError, match="scale must have out's shape"):
        pair_dots_op.pair_row_sums(small, i[:2] % 4, j[:2] % 4, w[:2], torch.empty(3, 6), torch.empty(4, 6))
    torch.library.opcheck(torch.ops.dmlkern.pair_row_sums.default,
                          (small, i[:5] % 4, j[:5] % 4, w[:5], torch.randn(4, 6), torch.empty(4, 6)))


def test_runs_kernel_only_without_a_graph():
    a = torch.randn(3, 4)
    assert pair_dots_op.runs_kernel(a, a)
    assert not pair_dots_op.runs_kernel(a.half(), a.half())
    assert not pair_dots_op.runs_kernel(a, a.double())
    leaf = a.clone().requires_grad_()
    assert not pair_dots_op.runs_kernel(leaf, a)
    with torch.no_grad():
        assert pair_dots_op.runs_kernel(leaf, a)


@pytest.mark.parametrize("reducer", ["mean", "avg_nonzero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_angular_through_the_op_matches_the_group_products(monkeypatch, reducer, dtype):
    """AngularLoss's blocked path (classes of 1 to 40 rows: groups of several classes and classes
    cut into tiles) with its pairs' sums from the op, against the same path with the group products
    (the op switched off), values and gradients; and the op is what runs."""
    from dmlkern import reducers
    g = torch.Generator().manual_seed(17)
    sizes = [1, 2, 3, 8, 40, 5, 17, 1, 9]
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])[torch.randperm(sum(sizes), generator=g)]
    x = torch.randn(len(labels), 24, generator=g, dtype=dtype)
    kw = {} if reducer == "mean" else {"reducer": reducers.AvgNonZeroReducer()}
    monkeypatch.setattr(angular, "_BLOCK_VALUES", 16 * len(labels))  # 16-row blocks: the 40-row class is cut

    def run():
        loss = losses.AngularLoss(**kw)
        leaf = x.clone().requires_grad_()
        value = loss(leaf, labels)
        value.backward()
        assert loss.last_backend == angular.BACKEND
        return value.detach(), leaf.grad

    calls = []
    for name in ("pair_dots", "pair_row_sums"):
        real = getattr(pair_dots_op, name)
        monkeypatch.setattr(pair_dots_op, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    with_op = run()
    assert set(calls) == {"pair_dots", "pair_row_sums"}, calls
    monkeypatch.setattr(pair_dots_op, "runs_kernel", lambda a, b: False)
    without = run()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(with_op[0], without[0], **tol)
    torch.testing.assert_close(with_op[1], without[1], **tol)
