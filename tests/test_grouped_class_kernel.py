"""The grouped class kernel (ops dmlkern::grouped_class_lse / _backward, csrc/cpu/grouped_class_cpu.cpp)
against its torch twin, GroupedBlock's torch ops (fused/class_softmax.py: `torch_lse`,
`torch_grads`), on fresh random inputs: the block's lse and both gradients in fp64 and fp32, K in
{1, 2, 3, 10}, both reductions (max over the sub-centres, SoftTriple's soft assignment), odd sizes
(N not a multiple of the row block, R not a multiple of the column tile, several chunks), ties in
the max, a block holding only the rows' own class, labels outside the block, one row; the bits at
1 and 2 threads and on repeat; transposed weight rows (PML's W (D, C K)) read in place; the
argument checks; and that the losses route CPU blocks to it. The losses' PML parity, fp64
gradcheck and determinism through this kernel: test_class_losses_fused.py,
test_parity_classification_losses.py, test_determinism.py."""
import pytest
import torch

from dmlkern import losses
from dmlkern.fused.class_softmax import GroupedBlock, unit
from dmlkern.fused.grouped_classes import MaxOverGroup, SoftAssignment
from dmlkern.ops import grouped_class_op as gc

pytestmark = pytest.mark.skipif(not gc._OP_READY, reason="needs the dmlkern._C extension built for this torch")

# (rtol, atol) of the kernel against the torch ops: fp64 ~ rounding only; fp32 the logits' rounding
# (scale 16: |logit| <= 16) through exp
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 2e-5)}
SCALE = 16.0
REDUCES = {"max": lambda: MaxOverGroup, "soft": lambda: SoftAssignment(0.1)}


def _op_args(reduce, group, c0):
    return c0, group, reduce.kind, SCALE, reduce.inv_gamma


def _kernel(x, w, labels, reduce, group, c0, grad, lse_shift, ops=gc):
    """The block's (lse, grad_x, grad_w) from `ops` (this module's C++ ops; test_grouped_class_triton.py
    passes the Triton kernel's)."""
    lse = ops.grouped_class_lse(x, w, labels, *_op_args(reduce, group, c0))
    full = lse + lse_shift  # the lse over every block: at least this block's
    gx, gw = ops.grouped_class_lse_backward(x, w, labels, *_op_args(reduce, group, c0), grad, full)
    return lse, gx, gw


def _torch(x, w, labels, reduce, group, c0, grad, lse_shift):
    block = GroupedBlock(reduce, SCALE, group)  # no backend: torch ops
    c1 = c0 + w.shape[0] // group
    lse = block.torch_lse(x, w, labels, c0, c1)
    gx, gw = block.torch_grads(x, w, labels, c0, c1, grad, lse + lse_shift)
    return lse, gx, gw


def _case(n, classes, group, dtype, c0=5, seed=0, label_range=None):
    g = torch.Generator().manual_seed(seed)
    x = unit(torch.randn(n, 24, generator=g, dtype=torch.float64)).to(dtype)
    w = unit(torch.randn(classes * group, 24, generator=g, dtype=torch.float64)).to(dtype)
    lo, hi = label_range or (0, c0 + classes + 5)  # some labels outside the block
    labels = torch.randint(lo, hi, (n,), generator=g)
    grad = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    shift = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    return x, w, labels, grad, shift


def _assert_close(got, want, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    for name, a, b in zip(("lse", "grad x", "grad w"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, (what, name, a.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda s: f"{what} {name}: {s}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduce", list(REDUCES))
@pytest.mark.parametrize("group", [1, 2, 3, 10])
def test_kernel_matches_torch_ops(dtype, reduce, group):
    """137 rows (two row blocks, the second short); classes such that R = classes * K spans
    several column tiles, the last one short, and a class offset c0 with labels outside the block."""
    classes = {1: 1100, 2: 300, 3: 203, 10: 61}[group]
    red = REDUCES[reduce]()
    for n, seed in ((137, 0), (1, 1), (128, 2)):
        x, w, labels, grad, shift = _case(n, classes, group, dtype, seed=seed)
        args = (x, w, labels, red, group, 5, grad, shift)
        _assert_close(_kernel(*args), _torch(*args), dtype, f"{dtype} {reduce} K={group} N={n}")


@pytest.mark.parametrize("reduce", list(REDUCES))
def test_many_tiles_and_chunks(reduce):
    """R past 16 column tiles (chunks of several tiles) and N of 3 row blocks, fp64."""
    red = REDUCES[reduce]()
    x, w, labels, grad, shift = _case(300, 3000, 3, torch.float64, c0=100, seed=3, label_range=(0, 3200))
    args = (x, w, labels, red, 3, 100, grad, shift)
    _assert_close(_kernel(*args), _torch(*args), torch.float64, f"{reduce} R=9000")


def test_backward_in_row_groups():
    """Wide rows and 16 chunks: grad_x's partials (chunks x N x D) would pass the kernel's 64 MiB
    bound, so the backward sweeps the rows in groups (of 512 here); fp64."""
    g = torch.Generator().manual_seed(12)
    n, d, classes = 600, 1024, 2720  # R = 8160: 16 column tiles of 510 rows
    x = unit(torch.randn(n, d, generator=g, dtype=torch.float64))
    w = unit(torch.randn(classes * 3, d, generator=g, dtype=torch.float64))
    labels = torch.randint(0, classes, (n,), generator=g)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    args = (x, w, labels, MaxOverGroup, 3, 0, grad, torch.zeros(n, dtype=torch.float64))
    _assert_close(_kernel(*args), _torch(*args), torch.float64, "row groups")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("group", [3, 10])
def test_ties_in_the_max_go_to_the_first(dtype, group):
    """Duplicated sub-centre rows tie exactly (values whose products are exact): the whole
    gradient goes to the first row of each tie, as torch.max, and none to the copies."""
    g = torch.Generator().manual_seed(7)
    n, classes, d = 150, 70, 16
    x = torch.randint(-2, 3, (n, d), generator=g).to(dtype) / 4
    w = torch.randint(-2, 3, (classes, group, d), generator=g).to(dtype) / 8
    w[:, 1] = w[:, 0]  # every class's second row copies its first,
    w[::2, group - 1] = w[::2, 0]  # every other class's last row too
    w = w.reshape(classes * group, d)
    labels = torch.randint(0, classes, (n,), generator=g)
    grad = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) + 0.5
    shift = torch.zeros(n, dtype=dtype)
    got = _kernel(x, w, labels, MaxOverGroup, group, 0, grad, shift)
    _assert_close(got, _torch(x, w, labels, MaxOverGroup, group, 0, grad, shift), dtype, f"ties K={group}")
    gw = got[2].view(classes, group, d)
    assert torch.all(gw[:, 1] == 0), "a copy of the first row got gradient"
    assert torch.all(gw[::2, group - 1] == 0), "a copy of the first row got gradient"
    assert gw[:, 0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduce", list(REDUCES))
def test_block_of_the_own_class_only(dtype, reduce):
    """A block of one class, every row's own: lse -inf, zero gradients (also given a finite lse
    from other blocks), no NaN. Rows of another class in the same call get the finite value."""
    red = REDUCES[reduce]()
    x, w, _, grad, _ = _case(140, 1, 3, dtype, seed=4)
    labels = torch.full((140,), 9)
    lse, gx, gw = _kernel(x, w, labels, red, 3, 9, grad, torch.zeros(140, dtype=dtype))
    assert torch.all(lse == float("-inf"))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))
    gx, gw = gc.grouped_class_lse_backward(x, w, labels, *_op_args(red, 3, 9), grad, torch.ones(140, dtype=dtype))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))
    labels[::2] = 3  # outside the block
    args = (x, w, labels, red, 3, 9, grad, torch.zeros(140, dtype=dtype))
    got = _kernel(*args)
    _assert_close(got, _torch(*args), dtype, "own class only")
    assert torch.all(torch.isfinite(got[0][::2])) and torch.all(got[0][1::2] == float("-inf"))
    assert not any(t.isnan().any() for t in got)


def test_empty_inputs():
    x, w, labels, grad, shift = _case(4, 3, 2, torch.float64)
    lse = gc.grouped_class_lse(x[:0], w, labels[:0], *_op_args(MaxOverGroup, 2, 0))
    assert lse.shape == (0,)
    gx, gw = gc.grouped_class_lse_backward(x[:0], w, labels[:0], *_op_args(MaxOverGroup, 2, 0), grad[:0], lse)
    assert gx.shape == (0, 24) and torch.equal(gw, torch.zeros_like(w))
    lse = gc.grouped_class_lse(x, w[:0], labels, *_op_args(MaxOverGroup, 2, 0))
    assert torch.all(lse == float("-inf"))


@pytest.mark.parametrize("reduce", list(REDUCES))
def test_transposed_weight_rows_read_in_place(reduce):
    """Rows that are a transposed view (a block of PML's W (D, C K)): the numbers of contiguous
    rows (up to rounding: BLAS packs a transposed operand its own way), and grad_w comes back in
    the rows' layout (the fake's too)."""
    red = REDUCES[reduce]()
    x, w, labels, grad, shift = _case(130, 400, 3, torch.float64, seed=6)
    W = torch.zeros(24, 1500, dtype=torch.float64)
    W[:, 100:1300] = w.t()
    rows = W.t()[100:1300]
    assert rows.stride() == (1, 1500)
    got = _kernel(x, rows, labels, red, 3, 5, grad, shift)
    want = _kernel(x, w, labels, red, 3, 5, grad, shift)
    _assert_close(got, want, torch.float64, "transposed rows")
    assert got[2].stride() == (1, 1200) and want[2].stride() == (24, 1)
    assert gc.grad_w_like(rows).stride() == got[2].stride() and gc.grad_w_like(w).stride() == want[2].stride()


def _at_threads(threads, call):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return call()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduce", list(REDUCES))
def test_bits_independent_of_threads_and_repeat(dtype, reduce):
    """Values and gradients bit-identical at 1 and 2 threads and on repeat (several row blocks,
    column tiles and chunks)."""
    red = REDUCES[reduce]()
    x, w, labels, grad, shift = _case(300, 2000, 3, dtype, seed=8)
    runs = [_at_threads(t, lambda: _kernel(x, w, labels, red, 3, 5, grad, shift)) for t in (1, 1, 2, 2)]
    for run in runs[1:]:
        for name, a, b in zip(("lse", "grad x", "grad w"), run, runs[0]):
            assert torch.equal(a, b), f"{name} differs between runs / thread counts"


def _into_block(w, layout, dtype):
    """A NaN-filled gradient wider than w and the block of it shaped like w: by columns of a (D, R + 137)
    buffer (a block of PML's W's gradient, strides (1, R + 137)) or by rows of an (R + 137, D) one."""
    r, d = w.shape
    wide = torch.full((d, r + 137) if layout == "columns" else (r + 137, d), float("nan"), dtype=dtype)
    return wide, (wide.t()[100:100 + r] if layout == "columns" else wide[100:100 + r])


@pytest.mark.parametrize("w_layout", ["columns", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduce", list(REDUCES))
def test_backward_into_a_block_of_a_wider_gradient(reduce, dtype, w_layout):
    """grouped_class_lse_backward_into writes grad_w into the caller's buffer (a block of a wider
    gradient, by columns or by rows), for w of either layout: grad_x and grad_w have
    grouped_class_lse_backward's bits at 1 and 2 threads, and the buffer's other elements stay as
    they were."""
    red = REDUCES[reduce]()
    x, w, labels, grad, shift = _case(300, 2000, 3, dtype, seed=8)
    if w_layout == "columns":
        w = w.t().contiguous().t()
    args = (x, w, labels, *_op_args(red, 3, 5), grad, shift)
    want_gx, want_gw = gc.grouped_class_lse_backward(*args)
    for layout, threads in (("columns", 1), ("columns", 2), ("rows", 1), ("rows", 2)):
        wide, block = _into_block(w, layout, dtype)
        gx = _at_threads(threads, lambda: gc.grouped_class_lse_backward_into(block, *args))
        assert torch.equal(gx, want_gx) and torch.equal(block, want_gw), f"{layout}, {threads} threads: other bits"
        block.fill_(0)
        assert not wide.isnan().logical_not().logical_and(wide != 0).any(), "elements outside the block were written"


def test_backward_into_in_row_groups():
    """Past the partial budget (rows in groups, grad_w summed over the groups) the in-place grad_w
    has the fresh one's bits too."""
    g = torch.Generator().manual_seed(12)
    x = unit(torch.randn(600, 1024, generator=g, dtype=torch.float64))
    w = unit(torch.randn(2720 * 3, 1024, generator=g, dtype=torch.float64))
    labels = torch.randint(0, 2720, (600,), generator=g)
    args = (x, w, labels, 0, 3, MaxOverGroup.kind, SCALE, 1.0, torch.randn(600, generator=g, dtype=torch.float64),
            torch.zeros(600, dtype=torch.float64))
    want_gx, want_gw = gc.grouped_class_lse_backward(*args)
    _, block = _into_block(w, "columns", torch.float64)
    gx = gc.grouped_class_lse_backward_into(block, *args)
    assert torch.equal(gx, want_gx) and torch.equal(block, want_gw)


def test_backward_into_rejects_bad_buffers_and_opcheck():
    """The buffer must have w's shape and x's dtype and overlap nothing: each a clear error;
    torch.library.opcheck of the op (its fake, the declared mutation)."""
    x, w, labels, grad, shift = _case(6, 4, 2, torch.float64)
    args = (x, w, labels, 0, 2, 0, 2.0, 1.0, grad, shift)
    op = torch.ops.dmlkern.grouped_class_lse_backward_into
    for buf, match in ((torch.empty(24, 8, dtype=torch.float64), "grad_w must have w's shape"),
                       (torch.empty(8, 24), "grad_w must have x's dtype"),
                       (torch.empty(1, 24, dtype=torch.float64).expand(8, 24), "internal overlap|single memory location"),
                       (w, "unsupported operation|memory location")):
        with pytest.raises(RuntimeError, match=match):
            op(*args, buf)
    torch.library.opcheck(op.default, (*args, torch.empty(8, 24, dtype=torch.float64)))
    torch.library.opcheck(op.default, (*args, torch.empty(24, 8, dtype=torch.float64).t()))


def _call(op, **override):
    x, w, labels, grad, shift = _case(6, 4, 2, torch.float64)
    args = dict(x=x, w=w, labels=labels, class0=0, group=2, reduce=0, scale=2.0, inv_gamma=1.0)
    if op == "grouped_class_lse_backward":
        args.update(grad=grad, lse=shift)
    args.update(override)
    return getattr(torch.ops.dmlkern, op)(*args.values())


BAD = [
    (dict(x=torch.zeros(6)), "x must be 2-D"),
    (dict(w=torch.zeros(8)), "w must be 2-D"),
    (dict(w=torch.zeros(8, 5, dtype=torch.float64)), "same width D"),
    (dict(w=torch.zeros(8, 24, dtype=torch.float32)), "w must have x's dtype"),
    (dict(x=torch.zeros(6, 24, dtype=torch.float16), w=torch.zeros(8, 24, dtype=torch.float16)),
     "x must be float32 or float64"),
    (dict(labels=torch.zeros(6, dtype=torch.int32)), "labels must be int64"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), "labels must be 1-D of length N=6"),
    (dict(group=3), "group=3 must divide the number of weight rows R=8"),
    (dict(group=0), "group (weight rows per class) must be >= 1"),
    (dict(reduce=2), "reduce must be 0"),
]


@pytest.mark.parametrize("op", ["grouped_class_lse", "grouped_class_lse_backward"])
@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_invalid_inputs_name_the_argument(op, override, message):
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _call(op, **override)


@pytest.mark.parametrize("name,bad,message", [("grad", torch.zeros(5, dtype=torch.float64), "grad must be 1-D"),
                                              ("lse", torch.zeros(6, dtype=torch.int64), "lse must be floating")])
def test_invalid_backward_inputs_name_the_argument(name, bad, message):
    with pytest.raises(RuntimeError, match=message):
        _call("grouped_class_lse_backward", **{name: bad})


def test_fake_tensors_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(7, 5), torch.empty(5, 12).t()
        labels = torch.zeros(7, dtype=torch.long)
        lse = gc.grouped_class_lse(x, w, labels, 0, 3, 0, 2.0)
        gx, gw = gc.grouped_class_lse_backward(x, w, labels, 0, 3, 0, 2.0, 1.0, lse, lse)
    assert lse.shape == (7,) and gx.shape == (7, 5) and gw.shape == (12, 5) and gw.stride() == (1, 12)


@pytest.mark.parametrize("name,kwargs", [("SubCenterArcFaceLoss", dict(sub_centers=3)),
                                         ("SoftTripleLoss", dict(centers_per_class=4))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_losses_route_cpu_blocks_to_the_kernel(monkeypatch, name, kwargs, dtype):
    """On the C++ backend the grouped losses' CPU blocks run the op (blocks of BLOCK_BYTES weight
    rows, not capped by BLOCK_LOGITS), with the torch ops' values and gradients."""
    calls = []
    for fn in ("grouped_class_lse", "grouped_class_lse_backward", "grouped_class_lse_backward_into"):
        real = getattr(gc, fn)
        monkeypatch.setattr(gc, fn, lambda *a, _real=real, _fn=fn: calls.append(_fn) or _real(*a))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 12, generator=g, dtype=dtype)
    labels = torch.randint(0, 30, (40,), generator=g)
    torch.manual_seed(0)
    ours = getattr(losses, name)(num_classes=30, embedding_size=12, **kwargs).to(dtype)
    ours.backend = "cpp"
    attr = "W" if name == "SubCenterArcFaceLoss" else "fc"
    xx = x.clone().requires_grad_(True)
    got = [ours(xx, labels)]
    got += torch.autograd.grad(got[0], (xx, getattr(ours, attr)))
    # the backward writes the rows' gradient into the weights' gradient (grouped_class_lse_backward_into)
    assert ours.last_backend == "cpp" and calls == ["grouped_class_lse", "grouped_class_lse_backward_into"], calls
    block = GroupedBlock(MaxOverGroup, 1.0, 3, "cpp")
    assert block.runs_kernel(x) and block.max_rows(x) is None
    assert GroupedBlock(MaxOverGroup, 1.0, 3, "cpp").max_rows(x.bfloat16()) is not None  # bf16: the torch ops
    # the torch ops (the kernel's twin) through the same loss
    monkeypatch.setattr(gc, "runs_kernel", lambda x: False)
    xx = x.clone().requires_grad_(True)
    want = [ours(xx, labels)]
    want += torch.autograd.grad(want[0], (xx, getattr(ours, attr)))
    assert calls == ["grouped_class_lse", "grouped_class_lse_backward_into"]  # the torch ops called no kernel
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
