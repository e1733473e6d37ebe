"""TripletMarginLoss's row sweep in Triton (dmlkern/triton/triplet_rows.py) against its torch twin,
`fused.triplet._block_pass`'s torch ops, on fresh random blocks: sums, counts and dL/ds in fp32 /
fp64, every miner window, relu and softplus terms, both distances, odd sizes (columns not a multiple
of the tile), rows without positives or negatives, a block of one class, offset blocks of the batch
against itself, NaN, `swap` on blocks of whole classes with a tie; then the loss on the Triton
backend against PML 2.9.0 (swap too), its fp64 gradcheck and its bits on repeat. Runs under
TRITON_INTERPRET=1 on CPU tensors, or on a GPU."""
import functools

import pytest
import torch

import dmlkern.fused.triplet as fused_triplet
from dmlkern import losses
from _triplet_blocks import assert_loss_matches_pml, random_block, swap_block, triplet_loss
from _triton_device import compile_for_sm90, gpu_marks, triton_device

DEVICE = triton_device()

pytestmark = gpu_marks(DEVICE)
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
WINDOWS = [("every", 0.0), ("all", 0.2), ("hard", 0.2), ("semihard", 0.2), ("easy", 0.1)]


def _twin(s, labels_b, ref_labels, row0, rule, exclude_diag, monkeypatch):
    """The torch ops' result (the C++ kernel off)."""
    with monkeypatch.context() as m:
        m.setattr(fused_triplet, "_CPU_KERNEL", False)
        return fused_triplet._block_pass(s, labels_b, ref_labels, row0, rule._replace(triton=False), exclude_diag,
                                         True)


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the Triton kernel ran (a list that grows by one per call)."""
    calls, real = [], fused_triplet.triton_rows.triplet_rows

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fused_triplet.triton_rows, "triplet_rows", spy)
    return calls


def _kernel(s, labels_b, ref_labels, row0, rule, exclude_diag, with_grad=True):
    return fused_triplet._block_pass(s, labels_b, ref_labels, row0, rule._replace(triton=True), exclude_diag,
                                     with_grad)


def _assert_same(got, want, dtype):
    for name, a, b in zip(("sums", "nonzero", "kept", "dL/ds"), got, want):
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, equal_nan=True, **TOL[dtype], msg=lambda m: f"{name}: {m}")


_block = functools.partial(random_block, device=DEVICE)


# (the interpreter runs a program's loops in Python: a few terms per case keep these seconds)
# every window with two rules that differ in each of dtype, distance and term; the other two
# rules with every triplet
RULES = {"fp64-euclidean-relu": (torch.float64, True, False), "fp32-cosine-softplus": (torch.float32, False, True),
         "fp64-cosine-softplus": (torch.float64, False, True), "fp32-euclidean-relu": (torch.float32, True, False)}
TWIN_CASES = ([(RULES[k], w) for k in list(RULES)[:2] for w in WINDOWS]
              + [(RULES[k], WINDOWS[0]) for k in list(RULES)[2:]])


@pytest.mark.parametrize("dtype,euclidean,smooth,window,window_margin", [(*r, *w) for r, w in TWIN_CASES])
def test_kernel_matches_the_torch_twin(euclidean, smooth, window, window_margin, dtype, monkeypatch, kernel_calls):
    rule = fused_triplet.TripletRule(0.15, smooth, euclidean, window, window_margin)
    # (rows, columns, classes, the batch against itself, first row): two column tiles and a tail;
    # an offset block of the batch against itself; rows without positives; one class
    for seed, (rows, cols, classes, self_block, row0) in enumerate(
            [(3, 261, 4, False, 0), (9, 37, 3, True, 20), (4, 30, 30, False, 0), (5, 11, 1, True, 4)]):
        s, labels_b, ref_labels = _block(rows, cols, classes, dtype, seed, self_block, row0)
        want = _twin(s, labels_b, ref_labels, row0, rule, self_block, monkeypatch)
        calls = len(kernel_calls)
        _assert_same(_kernel(s, labels_b, ref_labels, row0, rule, self_block), want, dtype)
        assert len(kernel_calls) == calls + 1, "the Triton kernel did not run"
        if cols > 256:  # rows split over programs: two chunks of 256 columns, the second a tail
            with monkeypatch.context() as m:
                m.setattr(fused_triplet.triton_rows, "CHUNK_COLUMNS", 64)
                _assert_same(_kernel(s, labels_b, ref_labels, row0, rule, self_block), want, dtype)


# (dtype, euclidean, smooth, window, window_margin): each window once, both dtypes, distances, terms
SWAP_RULES = [(torch.float64, True, False, "every", 0.0), (torch.float32, False, True, "semihard", 0.2),
              (torch.float64, False, True, "hard", 0.1), (torch.float32, True, False, "easy", 0.05)]


@pytest.mark.parametrize("dtype,euclidean,smooth,window,window_margin", SWAP_RULES)
def test_swap_kernel_matches_the_torch_twin(dtype, euclidean, smooth, window, window_margin, monkeypatch,
                                            kernel_calls):
    """swap: blocks of whole classes of the batch against itself (sorted by label) with a tie of
    min(e_an, e_pn); two classes in the middle of the batch, one of 14 over 100 columns (two
    chunks of 64), a batch of one class (no negatives)."""
    rule = fused_triplet.TripletRule(0.15, smooth, euclidean, window, window_margin, swap=True)
    for seed, (cols, classes, block_classes, chunk) in enumerate(
            [(50, 6, (2, 4), None), (100, 14, (6, 7), 64), (12, 1, (0, 1), None)]):
        s, labels_b, ref_labels, row0 = swap_block(cols, classes, block_classes, dtype, seed, DEVICE)
        want = _twin(s, labels_b, ref_labels, row0, rule, True, monkeypatch)
        calls = len(kernel_calls)
        with monkeypatch.context() as m:
            if chunk:
                m.setattr(fused_triplet.triton_rows, "CHUNK_COLUMNS", chunk)
            _assert_same(_kernel(s, labels_b, ref_labels, row0, rule, True), want, dtype)
        assert len(kernel_calls) == calls + 1, "the Triton kernel did not run"


def test_kernel_without_grad_and_with_nan(monkeypatch, kernel_calls):
    rule = fused_triplet.TripletRule(0.1, False, True, "every")
    s, labels_b, ref_labels = _block(9, 130, 4, torch.float64, 3)
    s[2, 17] = float("nan")
    s[4, :] = float("nan")
    sums, nonzero, kept, g = _kernel(s, labels_b, ref_labels, 0, rule, False, with_grad=False)
    assert g is None and kernel_calls
    want = _twin(s, labels_b, ref_labels, 0, rule, False, monkeypatch)
    _assert_same((sums, nonzero, kept), want[:3], torch.float64)
    assert torch.isnan(sums[4])  # a NaN row's terms are NaN, as torch.relu's


@pytest.mark.parametrize("kind", [None, "semihard", "hard", "easy"])
@pytest.mark.parametrize("kw", [{}, {"margin": 0.3, "smooth_loss": True}], ids=["relu", "smooth"])
def test_loss_on_the_triton_backend_matches_pml(kw, kind, kernel_calls):
    assert_loss_matches_pml(kw, kind, DEVICE, "triton")
    assert kernel_calls, "the Triton kernel did not run"


def test_loss_gradcheck_fp64_and_bits_on_repeat(kernel_calls):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 3, (9,), generator=g).to(DEVICE)
    loss_fn = losses.TripletMarginLoss(margin=0.4, smooth_loss=True)
    loss_fn.backend = "triton"
    assert torch.autograd.gradcheck(lambda t: loss_fn(t, labels), (x,))
    assert kernel_calls, "the Triton kernel did not run"
    first = torch.autograd.grad(loss_fn(x, labels), x)[0]
    assert torch.equal(first, torch.autograd.grad(loss_fn(x, labels), x)[0])


def test_rows_with_many_positives_sort_on_the_triton_backend(monkeypatch, kernel_calls):
    """The rows of a large class (>= SORTED_MIN_POSITIVES positives) take the torch sorted rows,
    the block's other rows the kernel; together PML's loss."""
    monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", 10)
    sorted_calls, real = [], fused_triplet._sorted_rows
    monkeypatch.setattr(fused_triplet, "_sorted_rows", lambda *args: sorted_calls.append(1) or real(*args))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 6, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.zeros(15, dtype=torch.long), torch.randint(1, 6, (22,), generator=g)])
    ours, our_grads, loss_fn = triplet_loss("dmlkern", {}, "semihard", x.to(DEVICE), labels.to(DEVICE),
                                            backend="triton")
    want, want_grads, _ = triplet_loss("pml", {}, "semihard", x, labels)
    assert kernel_calls and sorted_calls
    torch.testing.assert_close(ours.cpu(), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(our_grads[0].cpu(), want_grads[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", [None, "semihard"])
def test_swap_loss_on_the_triton_backend_matches_pml(kind, kernel_calls):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    x[7] = x[3]  # (a tie of min(e_an, e_pn): rows 3 and 7 are one class)
    labels = torch.arange(30) % 4
    ours, our_grads, loss_fn = triplet_loss("dmlkern", {"swap": True}, kind, x.to(DEVICE), labels.to(DEVICE),
                                            backend="triton")
    want, want_grads, _ = triplet_loss("pml", {"swap": True}, kind, x, labels)
    assert loss_fn.last_backend == "blocked" and kernel_calls, "the Triton kernel did not run"
    torch.testing.assert_close(ours.cpu(), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(our_grads[0].cpu(), want_grads[0], rtol=1e-9, atol=1e-12)


def test_kernel_compiles_for_sm90():
    value = {False: "*fp32", True: "*fp64"}
    for fp64 in (False, True):
        types = {"S": value[fp64], "SUMS": value[fp64], "G": value[fp64], "PSUM": value[fp64], "LAB": "*i64",
                 "REF": "*i64", "SLOTS": "*i64", "COUNTS": "*i64",
                 **{f"{p}_{k}": "fp32" for p in ("m", "wm") for k in "hml"}}
        configs = [dict(SMOOTH=smooth, EUCLIDEAN=euclidean, WINDOW=window, WITH_GRAD=True, SWAP=swap, FP64=fp64,
                        BLOCK_N=256)
                   for smooth, euclidean, window, swap in ((False, True, 0, False), (True, False, 3, False),
                                                           (True, True, 4, True), (False, True, 2, True))]
        compile_for_sm90("dmlkern.triton.triplet_rows", "_triplet_rows_kernel", types, configs)
