"""ContrastiveLoss on a PairMarginMiner's pairs with each row block in the CUDA C++ kernel
(dmlkern::pair_margin_rows: csrc/cuda/pair_margin_rows_cuda.cu, the C++ backend on a GPU; its
per-thread bodies csrc/pair_margin_rows.h). Its CPU implementation runs those bodies in loops, so
without a GPU these tests check the CUDA kernel's maths: the loss through it against PML 2.9.0
(tests/_pair_margin_kernel_cases.py, as the Triton kernel's tests), the op's argument checks,
empty blocks and opcheck, bits across thread counts. On a GPU the same cases run the CUDA kernel."""
import pytest
import torch

import _pair_margin_kernel_cases as cases
from dmlkern.fused import pair_margin_contrastive as fused_pmc
from _kernel_cases import HAS_CUDA
from test_pair_margin_contrastive import _batch, _run

pytestmark = pytest.mark.skipif(not fused_pmc._CPP_ROWS, reason="needs the dmlkern._C extension")

DEVICES = [pytest.param("cpu", id="cpu-twin"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                                  pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])]


@pytest.fixture
def kernel_calls(monkeypatch):
    """The C++ backend for every loss of the test, the kernel's forward on the CPU too; the
    kernel's forward and backward calls."""
    monkeypatch.setenv("DMLKERN_BACKEND", "cpp")
    monkeypatch.setattr(fused_pmc, "CPP_ROWS_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(fused_pmc, "_CPU_LIVE", False)  # (the CPU's own forward, pair_margin_live, lists pairs)
    calls = []
    for name in ("block_totals", "block_grads"):
        real = getattr(fused_pmc._CppRows, name)
        monkeypatch.setattr(fused_pmc._CppRows, name,
                            staticmethod(lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args)))
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_kind,miner_kind", [("euclidean", "euclidean"), ("cosine", "cosine"),
                                                  ("euclidean", "cosine"), ("cosine", "euclidean")])
def test_matches_pml(dtype, loss_kind, miner_kind, device, kernel_calls):
    cases.check_matches_pml(device, dtype, loss_kind, miner_kind, kernel_calls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ref_labels_given", [True, False])
def test_ref_emb_matches_pml(ref_labels_given, device, kernel_calls):
    cases.check_ref_emb(device, ref_labels_given, kernel_calls)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_spanning_several_blocks_and_chunks(device, monkeypatch, kernel_calls):
    cases.check_several_blocks(device, 1100, kernel_calls, monkeypatch)  # chunks of 1024 and 76 columns


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["one_class", "all_distinct", "nothing_kept"])
def test_degenerate_batches(case, device, kernel_calls):
    cases.check_degenerate_batch(device, case, kernel_calls)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64_and_bits_on_repeat(device, kernel_calls):
    cases.check_gradcheck_fp64_and_bits(device, kernel_calls)


def test_bits_across_thread_counts(kernel_calls):
    x, labels = _batch(7, 1500, 9, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            value, grads, _, _ = _run("dmlkern", x, labels)
            results.append((value, grads[0]))
    finally:
        torch.set_num_threads(before)
    assert kernel_calls
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])


def _op_args(device, with_coef=False):
    g = torch.Generator().manual_seed(8)
    s = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    s = (s @ s.T).to(device)
    labels = torch.tensor([0, 1, 0, 1, 1], device=device)
    coef = torch.tensor([0.5, -2.0], dtype=torch.float64, device=device) if with_coef else None
    return [s, labels, labels, 0, True, [0.3, 1.3, 0.9, 1.35], [1, 1], coef]


@pytest.mark.parametrize("device", DEVICES)
def test_op_checks_its_arguments_and_empty_blocks(device):
    op = torch.ops.dmlkern.pair_margin_rows
    good = _op_args(device, with_coef=True)
    op(*good)
    for at, bad, message in ((0, good[0].half(), "s must be float32 or float64"),
                             (0, good[0][0], "s must be 2-D"),
                             (1, good[1][:3], "row_labels must be int64 of shape \\(5\\)"),
                             (2, good[2].float(), "col_labels must be int64"),
                             (3, -1, "row0 must be >= 0"),
                             (5, [0.3, 1.3], "params must be"),
                             (6, [1], "flags must be"),
                             (7, good[7].float(), "coef must be a \\(2,\\) tensor of s's dtype")):
        args = list(good)
        args[at] = bad
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    for rows, cols in ((0, 4), (3, 0)):
        s = torch.zeros(rows, cols, dtype=torch.float64, device=device)
        rl = torch.zeros(rows, dtype=torch.long, device=device)
        cl = torch.zeros(cols, dtype=torch.long, device=device)
        sums, counts, _ = op(s, rl, cl, 0, False, [0.3, 1.3, 0.9, 1.35], [1, 1], None)
        assert sums.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0, 0, 0]
        grad = op(s, rl, cl, 0, False, [0.3, 1.3, 0.9, 1.35], [1, 1], good[7])[2]
        assert grad.shape == (rows, cols)


def test_opcheck():
    for with_coef in (False, True):
        torch.library.opcheck(torch.ops.dmlkern.pair_margin_rows.default, tuple(_op_args("cpu", with_coef)))


def test_live_pairs_are_the_kernels_pairs_with_a_gradient():
    """dmlkern::pair_margin_live (the CPU forward): the kernel's totals, and as live pairs exactly
    the pairs whose dL/ds the kernel makes non-zero, in row order, each with its side; for both
    distances, thresholds that pass every pair or cut at the cosine, and without the list."""
    g = torch.Generator().manual_seed(9)
    for loss_e, miner_e, params in ((1, 1, [0.3, 1.3, 0.9, 1.35]), (0, 0, [0.7, 0.1, 0.4, -0.05]),
                                    (1, 0, [0.3, 1.3, 0.4, -0.05]), (0, 1, [0.7, 0.1, 0.9, 1.35])):
        x = torch.nn.functional.normalize(torch.randn(70, 5, generator=g, dtype=torch.float64), dim=1)
        labels = torch.randint(0, 4, (70,), generator=g)
        s, rl = x[10:40] @ x.T, labels[10:40]
        rule = fused_pmc.MarginPairRule(bool(loss_e), params[0], params[1], bool(miner_e), params[2], params[3])
        args = (s, rl, labels, 10, True, params, [loss_e, miner_e])
        sums, counts, _ = torch.ops.dmlkern.pair_margin_rows(*args, None)
        g_pos = torch.ops.dmlkern.pair_margin_rows(*args, torch.tensor([1.0, 0.0], dtype=torch.float64))[2]
        g_neg = torch.ops.dmlkern.pair_margin_rows(*args, torch.tensor([0.0, 1.0], dtype=torch.float64))[2]
        for thresholds in ([float("inf"), -float("inf")], list(fused_pmc._cosine_thresholds(rule))):
            live_sums, live_counts, pairs, sides = torch.ops.dmlkern.pair_margin_live(*args, thresholds, True)
            torch.testing.assert_close(live_sums, sums, rtol=1e-12, atol=1e-12)
            assert torch.equal(live_counts, counts)
            for side, grad in ((0, g_pos), (1, g_neg)):
                want = torch.nonzero(grad != 0)  # row-major: row order
                assert torch.equal(pairs[sides == side], want), (loss_e, miner_e, side)
            assert not torch.ops.dmlkern.pair_margin_live(*args, thresholds, False)[2].numel()


def test_live_opcheck():
    args = _op_args("cpu")[:7]
    for list_live in (True, False):
        torch.library.opcheck(torch.ops.dmlkern.pair_margin_live.default, (*args, [0.9, 0.5], list_live))
