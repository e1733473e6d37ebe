"""The grouped class kernel in Triton (dmlkern/triton/grouped_class.py) against its torch twin,
GroupedBlock's torch ops (fused/class_softmax.py), on fresh random inputs: the block's lse and both
gradients in every dtype, K in {1, 3, 5, 10} (padded to 1, 4, 8, 16 rows), both reductions, odd
sizes (N not a multiple of the row block, the class count not a multiple of the column tile), ties
in the max, a block holding only the rows' own class, labels outside the block, a NaN row, one row,
transposed weight rows (PML's W (D, C K)), the bits on repeat and the argument checks. Runs under
TRITON_INTERPRET=1 on CPU tensors, or on a GPU. The losses' PML parity and fp64 gradcheck on the
Triton backend, through this kernel: test_class_losses_fused.py (KERNEL_BACKENDS)."""
import pytest
import torch

from dmlkern import losses
from dmlkern.fused.class_softmax import unit
from dmlkern.fused.grouped_classes import MaxOverGroup
from dmlkern.ops import grouped_class_op as gc
from _triton_device import gpu_marks, triton_device
from test_grouped_class_kernel import REDUCES, SCALE, _torch
from test_grouped_class_kernel import _kernel as kernel_case

DEVICE = triton_device()

from dmlkern.triton import grouped_class as tg  # noqa: E402

pytestmark = gpu_marks(DEVICE)
# (rtol, atol) against the torch ops, whose products round the same inputs: fp64 rounding only;
# fp32 the logits' rounding (scale 16) through exp; fp16 / bf16: the products' operands are the
# same, the kernel's sums are fp32 and the torch ops' in the input dtype
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 2e-5),
              torch.float16: (2e-2, 5e-3), torch.bfloat16: (5e-2, 3e-2)}


def _kernel(*args):
    return kernel_case(*args, ops=tg)


def _case(n, classes, group, dtype, c0=5, seed=0, label_range=None, d=24):
    g = torch.Generator().manual_seed(seed)
    x = unit(torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    w = unit(torch.randn(classes * group, d, generator=g, dtype=torch.float64)).to(dtype)
    lo, hi = label_range or (0, c0 + classes + 5)  # some labels outside the block
    labels = torch.randint(lo, hi, (n,), generator=g)
    grad = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    shift = torch.rand(n, generator=g, dtype=torch.float64)
    return tuple(t.to(DEVICE) for t in (x, w, labels, grad, shift))


def _assert_close(got, want, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    for name, a, b in zip(("lse", "grad x", "grad w"), got, want):
        assert a.shape == b.shape and a.device == b.device, (what, name, a.shape, b.shape)
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol, msg=lambda s: f"{what} {name}: {s}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduce", list(REDUCES))
@pytest.mark.parametrize("group", [1, 3, 5, 10])
def test_kernel_matches_torch_ops(dtype, reduce, group):
    """70 rows (two row blocks, the second short; one row), classes over several column tiles with
    the last one short, a class offset with labels outside the block, and D = 150 over three K
    slices and two output slices of the backward."""
    classes = {1: 70, 3: 37, 5: 19, 10: 9}[group]
    red = REDUCES[reduce]()
    for n, seed, d in ((70, 0, 24), (1, 1, 24), (33, 2, 150)):
        x, w, labels, grad, shift = _case(n, classes, group, dtype, seed=seed, d=d)
        args = (x, w, labels, red, group, 5, grad, shift.to(dtype))
        _assert_close(_kernel(*args), _torch(*args), dtype, f"{dtype} {reduce} K={group} N={n} D={d}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduce", list(REDUCES))
def test_half_inputs(dtype, reduce):
    """fp16 / bf16 rows: fp32 statistics (lse), gradients in the input dtype."""
    x, w, labels, grad, shift = _case(45, 11, 3, dtype)
    args = (x, w, labels, REDUCES[reduce](), 3, 5, grad, shift.float())
    got = _kernel(*args)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    want = _torch(*(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in args))
    _assert_close(got, want, dtype, f"{dtype} {reduce}")


@pytest.mark.parametrize("group", [3, 10])
def test_ties_in_the_max_go_to_the_first(group):
    """Duplicated sub-centre rows tie exactly (values whose products are exact): the max's gradient
    goes to the first row of each tie, as torch.max, and none to the copies."""
    g = torch.Generator().manual_seed(7)
    n, classes, d = 40, 11, 16
    x = torch.randint(-2, 3, (n, d), generator=g).double() / 4
    w = torch.randint(-2, 3, (classes, group, d), generator=g).double() / 8
    w[:, 1] = w[:, 0]  # every class's second row copies its first,
    w[::2, group - 1] = w[::2, 0]  # every other class's last row too
    w = w.reshape(classes * group, d)
    labels = torch.randint(0, classes, (n,), generator=g)
    grad = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    x, w, labels, grad, shift = (t.to(DEVICE) for t in (x, w, labels, grad, torch.zeros(n, dtype=torch.float64)))
    got = _kernel(x, w, labels, MaxOverGroup, group, 0, grad, shift)
    _assert_close(got, _torch(x, w, labels, MaxOverGroup, group, 0, grad, shift), torch.float64, f"ties K={group}")
    gw = got[2].view(classes, group, d)
    assert torch.all(gw[:, 1] == 0), "a copy of the first row got gradient"
    assert torch.all(gw[::2, group - 1] == 0), "a copy of the first row got gradient"
    assert gw[:, 0].abs().sum() > 0


@pytest.mark.parametrize("reduce", list(REDUCES))
def test_block_of_the_own_class_only(reduce):
    """Every row's label is the block's one class: lse = -inf and zero gradients, as the torch ops."""
    x, w, _, grad, shift = _case(9, 1, 3, torch.float64)
    labels = torch.full((9,), 4, dtype=torch.int64, device=DEVICE)
    got = _kernel(x, w, labels, REDUCES[reduce](), 3, 4, grad, shift)
    assert torch.isneginf(got[0]).all()
    assert got[1].abs().max() == 0 and got[2].abs().max() == 0
    _assert_close(got, _torch(x, w, labels, REDUCES[reduce](), 3, 4, grad, shift), torch.float64, "own class")


@pytest.mark.parametrize("reduce", list(REDUCES))
def test_nan_row_propagates_as_the_torch_ops(reduce):
    x, w, labels, grad, shift = _case(20, 9, 3, torch.float64)
    x[3] = float("nan")
    got = _kernel(x, w, labels, REDUCES[reduce](), 3, 5, grad, shift)
    want = _torch(x, w, labels, REDUCES[reduce](), 3, 5, grad, shift)
    assert torch.isnan(got[0][3]) and torch.isnan(got[2]).any()
    for a, b in zip(got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reduce", list(REDUCES))
def test_transposed_weight_rows_and_repeat(reduce):
    """A block of PML's W (D, C K) as rows is a transposed view: read in place, the same answer
    as contiguous rows, and the same bits on a repeat."""
    x, w, labels, grad, shift = _case(50, 13, 3, torch.float32)
    w_t = w.t().contiguous().t()
    assert not w_t.is_contiguous()
    got = _kernel(x, w_t, labels, REDUCES[reduce](), 3, 5, grad, shift.float())
    again = _kernel(x, w_t, labels, REDUCES[reduce](), 3, 5, grad, shift.float())
    for a, b in zip(got, again):
        assert torch.equal(a, b), "not bit-identical on repeat"
    _assert_close(got, _kernel(x, w, labels, REDUCES[reduce](), 3, 5, grad, shift.float()), torch.float32, "layout")


@pytest.mark.parametrize("reduce", list(REDUCES))
def test_registered_ops_match_the_direct_launch(reduce):
    """The torch.library ops (what torch.compile and fake tensors see) launch the same kernels: the
    same bits as the direct call an eager loss makes."""
    x, w, labels, grad, shift = _case(30, 7, 3, torch.float32)
    red = REDUCES[reduce]()
    args = (x, w, labels, 5, 3, red.kind, SCALE, red.inv_gamma)
    lse = torch.ops.dmlkern.grouped_class_lse_triton(*args)
    assert torch.equal(lse, tg.grouped_class_lse(*args))
    full = lse + shift.float()
    got = torch.ops.dmlkern.grouped_class_lse_backward_triton(*args, grad.float(), full)
    for a, b in zip(got, tg.grouped_class_lse_backward(*args, grad.float(), full)):
        assert torch.equal(a, b)


def test_empty_inputs():
    x, w, labels, grad, shift = _case(0, 4, 3, torch.float32)
    lse, gx, gw = _kernel(x, w, labels, MaxOverGroup, 3, 0, grad, shift.float())
    assert lse.shape == (0,) and gx.shape == (0, 24) and gw.shape == (12, 24) and gw.abs().max() == 0


@pytest.mark.parametrize("override,message", [
    (dict(w=torch.zeros(10, 24)), "divide"),
    (dict(w=torch.zeros(12, 23)), "same D"),
    (dict(w=torch.zeros(12, 24, dtype=torch.float64)), "dtype"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), "labels"),
    (dict(labels=torch.zeros(8, dtype=torch.int32)), "labels"),
    (dict(group=100), "group"),
])
def test_invalid_inputs_name_the_argument(override, message):
    args = dict(x=torch.zeros(8, 24), w=torch.zeros(12, 24), labels=torch.zeros(8, dtype=torch.int64), group=3)
    args.update(override)
    args = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        tg.grouped_class_lse(args["x"], args["w"], args["labels"], 0, args["group"], 0, SCALE)


@pytest.mark.parametrize("name,kwargs", [("SubCenterArcFaceLoss", dict(sub_centers=3)),
                                         ("SoftTripleLoss", dict(centers_per_class=10))])
def test_losses_route_triton_blocks_to_the_kernel(monkeypatch, name, kwargs):
    """On the Triton backend the grouped losses run this kernel (not the torch ops' (N, rows)
    logits), report it, and agree with the reference path."""
    calls = []
    for fn in ("grouped_class_lse", "grouped_class_lse_backward"):
        orig = getattr(gc.TRITON, fn)
        monkeypatch.setattr(gc.TRITON, fn, lambda *a, _orig=orig, _fn=fn: calls.append(_fn) or _orig(*a))
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(40, 16, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 7, (40,), generator=g).to(DEVICE)
    ours = getattr(losses, name)(num_classes=7, embedding_size=16, **kwargs).to(DEVICE)
    ref = getattr(losses, name)(num_classes=7, embedding_size=16, **kwargs).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    monkeypatch.setenv("DMLKERN_BACKEND", "triton")  # ours: backend "auto"
    ref.backend = "reference"
    loss = ours(emb, labels)
    assert ours.last_backend == "triton", ours.last_fallback
    assert calls == ["grouped_class_lse"]
    (g_emb,) = torch.autograd.grad(loss, emb)
    assert calls == ["grouped_class_lse", "grouped_class_lse_backward"]
    emb_ref = emb.detach().clone().requires_grad_()
    loss_ref = ref(emb_ref, labels)
    (g_ref,) = torch.autograd.grad(loss_ref, emb_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_emb, g_ref, rtol=1e-4, atol=1e-5)
