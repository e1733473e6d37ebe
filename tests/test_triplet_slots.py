"""TripletMarginLoss's CUDA C++ row sweep (dmlkern::triplet_slot_rows: csrc/cuda/triplet_slots_cuda.cu,
its per-thread bodies csrc/triplet_slots.h). Its CPU implementation runs those bodies in loops, so
without a GPU these tests check the CUDA kernels' maths: against the torch twin
(`fused.triplet._block_pass`'s torch ops) on fresh random blocks (fp32 / fp64, every miner window,
relu and softplus, both distances, several chunks of columns, rows without positives, one class,
offset blocks of the batch against itself, NaN, `swap` on blocks of whole classes with a tie), the
op's argument checks and opcheck, and the loss run through it against PML 2.9.0 (gradcheck in
fp64, bits on repeat and across thread counts). On a GPU the same cases run the CUDA kernels
themselves."""
import pytest
import torch

import dmlkern.fused.triplet as fused_triplet
from dmlkern.fused._common import block_masks
from dmlkern.reference.indices import positive_slots
from dmlkern import losses
from _kernel_cases import HAS_CUDA
from _triplet_blocks import assert_loss_matches_pml, random_block, swap_block, triplet_loss

pytestmark = pytest.mark.skipif(not fused_triplet._SLOT_KERNEL, reason="needs the dmlkern._C extension")

DEVICES = [pytest.param("cpu", id="cpu-twin"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                                  pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
WINDOWS = [("every", 0.0), ("all", 0.2), ("hard", 0.2), ("semihard", 0.2), ("easy", 0.1)]


@pytest.fixture
def slot_calls(monkeypatch):
    """Routes the C++ backend's blocks through the op on the CPU too; lists its calls."""
    calls, real = [], fused_triplet._slot_rows

    def spy(*args):
        calls.append(args[0].device.type)
        return real(*args)

    monkeypatch.setattr(fused_triplet, "SLOT_KERNEL_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(fused_triplet, "_slot_rows", spy)
    return calls


def _twin(s, labels_b, ref_labels, row0, rule, exclude_diag):
    """The torch ops' result (neither the C++ CPU op nor the slot op)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fused_triplet, "_CPU_KERNEL", False)
        m.setattr(fused_triplet, "SLOT_KERNEL_DEVICES", ())
        return fused_triplet._block_pass(s, labels_b, ref_labels, row0, rule, exclude_diag, True)


def _assert_same(got, want, dtype):
    for name, a, b in zip(("sums", "nonzero", "kept", "dL/ds"), got, want):
        a = a.cpu()
        if a.dtype == torch.long:
            assert torch.equal(a, b.cpu()), name
        else:
            torch.testing.assert_close(a, b.cpu(), equal_nan=True, **TOL[dtype], msg=lambda m: f"{name}: {m}")


# (rows, columns, classes, the batch against itself, first row): three chunks of 1024 columns, the
# last a tail; an offset block of the batch against itself; rows without positives; one class
BLOCKS = [(5, 2300, 6, False, 0), (9, 37, 3, True, 20), (4, 30, 30, False, 0), (5, 11, 1, True, 4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("euclidean,smooth", [(True, False), (False, True), (True, True), (False, False)],
                         ids=["euclidean-relu", "cosine-softplus", "euclidean-softplus", "cosine-relu"])
@pytest.mark.parametrize("window,window_margin", WINDOWS, ids=[w for w, _ in WINDOWS])
def test_op_matches_the_torch_twin(window, window_margin, euclidean, smooth, dtype, device, slot_calls):
    rule = fused_triplet.TripletRule(0.15, smooth, euclidean, window, window_margin)
    for seed, (rows, cols, classes, self_block, row0) in enumerate(BLOCKS):
        s, labels_b, ref_labels = random_block(rows, cols, classes, dtype, seed, self_block, row0, device)
        want = _twin(s.cpu(), labels_b.cpu(), ref_labels.cpu(), row0, rule, self_block)
        calls = len(slot_calls)
        _assert_same(fused_triplet._block_pass(s, labels_b, ref_labels, row0, rule, self_block, True), want, dtype)
        assert len(slot_calls) == calls + 1, "the slot op did not run"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("euclidean,smooth", [(True, False), (False, True)], ids=["euclidean-relu", "cosine-softplus"])
@pytest.mark.parametrize("window,window_margin", WINDOWS, ids=[w for w, _ in WINDOWS])
def test_swap_op_matches_the_torch_twin(window, window_margin, euclidean, smooth, dtype, device, slot_calls):
    """swap: blocks of whole classes of the batch against itself (sorted by label) with a tie of
    min(e_an, e_pn): two classes in the middle of the batch, one of 90 over 2300 columns (three
    chunks), a batch of one class (no negatives)."""
    rule = fused_triplet.TripletRule(0.15, smooth, euclidean, window, window_margin, swap=True)
    for seed, (cols, classes, block_classes) in enumerate([(60, 6, (2, 4)), (2300, 90, (40, 41)), (12, 1, (0, 1))]):
        s, labels_b, ref_labels, row0 = swap_block(cols, classes, block_classes, dtype, seed, device)
        want = _twin(s.cpu(), labels_b.cpu(), ref_labels.cpu(), row0, rule, True)
        calls = len(slot_calls)
        _assert_same(fused_triplet._block_pass(s, labels_b, ref_labels, row0, rule, True, True), want, dtype)
        assert len(slot_calls) == calls + 1, "the slot op did not run"


@pytest.mark.parametrize("device", DEVICES)
def test_op_without_grad_with_nan_and_empty_blocks(device, slot_calls):
    rule = fused_triplet.TripletRule(0.1, False, True, "every")
    s, labels_b, ref_labels = random_block(9, 130, 4, torch.float64, 3, device=device)
    s[2, 17] = float("nan")
    s[4, :] = float("nan")
    sums, nonzero, kept, g = fused_triplet._block_pass(s, labels_b, ref_labels, 0, rule, False, False)
    assert g is None and slot_calls
    want = _twin(s.cpu(), labels_b.cpu(), ref_labels.cpu(), 0, rule, False)
    _assert_same((sums, nonzero, kept), want[:3], torch.float64)
    assert torch.isnan(sums[4])  # a NaN row's terms are NaN, as torch.relu's
    _assert_same(fused_triplet._block_pass(s, labels_b, ref_labels, 0, rule, False, True), want, torch.float64)
    # no rows, no columns, no positive slots
    op = torch.ops.dmlkern.triplet_slot_rows
    for rows, cols, slots in ((0, 5, 2), (3, 0, 0), (3, 4, 0)):
        out = op(torch.zeros(rows, cols, dtype=torch.float64, device=device),
                 torch.full((rows, slots), -1, dtype=torch.long, device=device),
                 torch.zeros(rows, dtype=torch.long, device=device), torch.ones(cols, dtype=torch.long, device=device),
                 [0.1, 0.0], [0, 1, 0, 0, 0], True)
        assert [tuple(t.shape) for t in out] == [(rows,), (rows, 2), (rows, cols), (rows, slots)]
        assert not out[0].any() and not out[1].any() and not out[2].any()


@pytest.mark.parametrize("device", DEVICES)
def test_op_checks_its_arguments(device):
    op = torch.ops.dmlkern.triplet_slot_rows
    s = torch.rand(4, 6, device=device)
    slots = torch.tensor([[0, 1], [2, -1], [-1, -1], [5, 3]], device=device)
    rl, cl = torch.zeros(4, dtype=torch.long, device=device), torch.arange(6, device=device) % 2
    good = (s, slots, rl, cl, [0.1, 0.0], [0, 1, 0, 0, 0], True)
    op(*good)
    for at, bad, message in ((0, s.half(), "s must be float32 or float64"),
                             (0, s[0], "s must be 2-D"),
                             (1, slots.int(), "slots must be int64"),
                             (1, slots[:3], "slots must be int64 of shape \\(4, P\\)"),
                             (2, rl[:3], "row_labels must be int64 of shape \\(4\\)"),
                             (3, cl.float(), "col_labels must be int64"),
                             (4, [0.1], "params must be"),
                             (5, [0, 1, 7, 0, 0], "window must be in \\[0, 4\\]"),
                             (5, [0, 1, 0], "flags must be"),
                             (5, [0, 1, 0, 1, 3], "with swap, row0 \\+ rows must be within the columns")):
        args = list(good)
        args[at] = bad
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    # a slot outside the row counts as none (no read past the row)
    far = slots.clone()
    far[1, 1] = 99
    torch.testing.assert_close(op(s, far, rl, cl, [0.1, 0.0], [0, 1, 0, 0, 0], True)[0], op(*good)[0])


def test_opcheck():
    s, labels_b, ref_labels = random_block(6, 40, 3, torch.float64, 5)
    slots, valid = positive_slots(labels_b[:, None] == ref_labels[None, :])
    for with_grad in (False, True):
        torch.library.opcheck(torch.ops.dmlkern.triplet_slot_rows.default,
                              (s, slots.masked_fill(~valid, -1), labels_b, ref_labels, [0.2, 0.1],
                               [1, 1, 3, 0, 0], with_grad))
    s, labels_b, ref_labels, row0 = swap_block(40, 4, (1, 3), torch.float64, 5)
    slots, valid = positive_slots(block_masks(labels_b, ref_labels, row0, True)[0])
    torch.library.opcheck(torch.ops.dmlkern.triplet_slot_rows.default,
                          (s, slots.masked_fill(~valid, -1), labels_b, ref_labels, [0.2, 0.1], [0, 1, 2, 1, row0],
                           True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", [None, "all", "semihard", "hard", "easy"])
@pytest.mark.parametrize("kw", [{}, {"margin": 0.3, "smooth_loss": True}], ids=["relu", "smooth"])
def test_loss_through_the_op_matches_pml(kw, kind, device, slot_calls):
    assert_loss_matches_pml(kw, kind, device, "cpp")
    assert slot_calls, "the slot op did not run"


@pytest.mark.parametrize("device", DEVICES)
def test_loss_fp32_rows_with_many_positives_and_swap(device, monkeypatch, slot_calls):
    """fp32 against PML; a large class's rows take the sorted rows beside the op; swap (which
    never sorts) through the op, every row (fp64, with a tie of min(e_an, e_pn))."""
    monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", 10)
    sorted_calls, real = [], fused_triplet._sorted_rows
    monkeypatch.setattr(fused_triplet, "_sorted_rows", lambda *args: sorted_calls.append(1) or real(*args))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 6, generator=g)
    labels = torch.cat([torch.zeros(15, dtype=torch.long), torch.randint(1, 6, (22,), generator=g)])
    ours, our_grads, _ = triplet_loss("dmlkern", {}, "semihard", x.to(device), labels.to(device), backend="cpp")
    want, want_grads, _ = triplet_loss("pml", {}, "semihard", x, labels)
    assert slot_calls and sorted_calls
    torch.testing.assert_close(ours.cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grads[0].cpu(), want_grads[0], rtol=1e-4, atol=1e-6)
    calls, sorted_before = len(slot_calls), len(sorted_calls)
    x = x.double()
    x[20], labels[20] = x[16], labels[16]  # a duplicate row in one class: a tie of min(e_an, e_pn)
    ours, our_grads, loss_fn = triplet_loss("dmlkern", {"swap": True}, None, x.to(device), labels.to(device),
                                            backend="cpp")
    want, want_grads, _ = triplet_loss("pml", {"swap": True}, None, x, labels)
    assert len(slot_calls) > calls and len(sorted_calls) == sorted_before and loss_fn.last_backend == "blocked"
    torch.testing.assert_close(ours.cpu(), want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(our_grads[0].cpu(), want_grads[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_gradcheck_fp64_and_bits(device, slot_calls):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.randint(0, 3, (9,), generator=g).to(device)
    loss_fn = losses.TripletMarginLoss(margin=0.4, smooth_loss=True)
    loss_fn.backend = "cpp"
    assert torch.autograd.gradcheck(lambda t: loss_fn(t, labels), (x,))
    assert slot_calls, "the slot op did not run"
    x = torch.randn(300, 16, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, 9, (300,), generator=g).to(device)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            value = loss_fn(x, labels)
            results.append((value.detach(), torch.autograd.grad(value, x)[0]))
    finally:
        torch.set_num_threads(before)
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])
