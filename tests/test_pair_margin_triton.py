"""ContrastiveLoss on a PairMarginMiner's pairs with each row block in the Triton kernel
(dmlkern/triton/pair_margin_rows.py, the Triton backend) against PML 2.9.0 itself: values and
gradients for both distances of the loss and of the miner, every reducer, ref_emb, rows spanning
several blocks and column chunks, degenerate batches, fp64 gradcheck, bits on repeat. Runs under
TRITON_INTERPRET=1 on CPU tensors, or on a GPU."""
import pytest
import torch

from dmlkern import losses, miners
from dmlkern.fused import _common
from dmlkern.fused import pair_margin_contrastive as fused_pmc
from _triton_device import compile_for_sm90, gpu_marks, triton_device
from test_pair_margin_contrastive import REDUCERS, _assert_like_pml, _batch, _run

DEVICE = triton_device()
pytestmark = gpu_marks(DEVICE)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The Triton backend for every loss of the test; the kernel's forward and backward calls."""
    monkeypatch.setenv("DMLKERN_BACKEND", "triton")
    calls = []
    for name in ("block_totals", "block_grads"):
        real = getattr(fused_pmc.triton_rows, name)
        monkeypatch.setattr(fused_pmc.triton_rows, name,
                            lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args))
    return calls


def _on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_kind,miner_kind", [("euclidean", "euclidean"), ("cosine", "cosine"),
                                                  ("euclidean", "cosine"), ("cosine", "euclidean")])
def test_matches_pml(dtype, loss_kind, miner_kind, kernel_calls):
    x, labels = _on_device(*_batch(0, 97, 7, dtype=dtype))  # (not a tile multiple)
    for reducer in REDUCERS[:2] if dtype == torch.float64 else REDUCERS[2:]:
        del kernel_calls[:]
        _assert_like_pml(dtype, x=x, labels=labels, loss_kind=loss_kind, miner_kind=miner_kind, reducer=reducer)
        assert kernel_calls == ["block_totals", "block_grads"], kernel_calls


@pytest.mark.parametrize("ref_labels_given", [True, False])
def test_ref_emb_matches_pml(ref_labels_given, kernel_calls):
    x, labels = _on_device(*_batch(1, 61, 5))
    ref, ref_labels = _on_device(*_batch(2, 83 if ref_labels_given else 61, 5))
    _assert_like_pml(x=x, labels=labels, ref=ref, ref_labels=ref_labels if ref_labels_given else None,
                     reducer="MeanReducer")
    assert kernel_calls


def test_rows_spanning_several_blocks_and_chunks(monkeypatch, kernel_calls):
    monkeypatch.setattr(_common, "ROW_BLOCK_VALUES", 16 * 150)
    monkeypatch.setattr(fused_pmc.triton_rows, "CHUNK_COLUMNS", 64)  # 150 columns: chunks of 64, 64, 22
    x, labels = _on_device(*_batch(3, 150, 6))
    _assert_like_pml(x=x, labels=labels)
    assert kernel_calls.count("block_totals") > 1


@pytest.mark.parametrize("case", ["one_class", "all_distinct", "nothing_kept"])
def test_degenerate_batches(case, kernel_calls):
    x, labels = _batch(5, 9, 3)
    miner_kw = None
    if case == "one_class":
        labels = torch.zeros_like(labels)
    elif case == "all_distinct":
        labels = torch.arange(len(labels))
    else:
        miner_kw = {"pos_margin": 5.0, "neg_margin": -1.0}
    x, labels = _on_device(x, labels)
    got, got_grads, loss_fn, _ = _run("dmlkern", x, labels, miner_kw=miner_kw)
    want, want_grads, _, want_mined = _run("pml", x.cpu(), labels.cpu(), miner_kw=miner_kw)
    torch.testing.assert_close(got.cpu(), want)
    torch.testing.assert_close(got_grads[0].cpu(), want_grads[0])
    degenerate = all(len(t) <= 1 for t in want_mined)
    assert loss_fn.last_backend == ("zero" if degenerate else "blocked"), (case, loss_fn.last_fallback)
    assert "block_totals" in kernel_calls


def test_gradcheck_fp64_and_bits_on_repeat(kernel_calls):
    x, labels = _on_device(*_batch(6, 8, 2, d=3))
    x.requires_grad_(True)
    loss_fn = losses.ContrastiveLoss(pos_margin=0.2, neg_margin=1.4)
    miner = miners.PairMarginMiner(pos_margin=0.5, neg_margin=1.5)

    def loss(t):
        return loss_fn(t, labels, miner(t, labels))

    assert torch.autograd.gradcheck(loss, (x,))
    assert "block_grads" in kernel_calls
    assert torch.equal(torch.autograd.grad(loss(x), x)[0], torch.autograd.grad(loss(x), x)[0])


def test_kernel_compiles_for_sm90():
    value = {False: "*fp32", True: "*fp64"}
    for fp64 in (False, True):
        types = {"S": value[fp64], "SUMS": value[fp64], "G": value[fp64], "COEF": value[fp64], "LAB": "*i64",
                 "REF": "*i64", "COUNTS": "*i64",
                 **{f"{p}_{k}": "fp32" for p in ("pm", "nm", "mp", "mn") for k in "hml"}}
        configs = [dict(LOSS_EUCLIDEAN=loss, MINER_EUCLIDEAN=miner, EXCLUDE_DIAG=True, WITH_GRAD=grad, FP64=fp64,
                        BLOCK_N=256) for loss, miner, grad in ((True, True, False), (False, True, True),
                                                               (True, False, True))]
        compile_for_sm90("dmlkern.triton.pair_margin_rows", "_pair_margin_kernel", types, configs)
