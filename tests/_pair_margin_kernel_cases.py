"""The cases that tests/test_pair_margin_triton.py (the Triton kernel) and
tests/test_pair_margin_cpp.py (the CUDA C++ kernel, or its CPU twin) run through their kernel:
ContrastiveLoss on a PairMarginMiner's pairs against PML 2.9.0 itself, values and gradients for
both distances of the loss and of the miner, every reducer, ref_emb, rows spanning several blocks
and column chunks, degenerate batches, fp64 gradcheck, bits on repeat. `calls` is the list the
test's fixture appends "block_totals" / "block_grads" to at each kernel call."""
import torch

from dmlkern import losses, miners
from dmlkern.fused import _common
from test_pair_margin_contrastive import REDUCERS, _assert_like_pml, _batch, _run


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def check_matches_pml(device, dtype, loss_kind, miner_kind, calls):
    x, labels = _on(device, *_batch(0, 97, 7, dtype=dtype))  # (not a tile multiple)
    for reducer in REDUCERS[:2] if dtype == torch.float64 else REDUCERS[2:]:
        del calls[:]
        _assert_like_pml(dtype, x=x, labels=labels, loss_kind=loss_kind, miner_kind=miner_kind, reducer=reducer)
        assert calls == ["block_totals", "block_grads"], calls


def check_ref_emb(device, ref_labels_given, calls):
    x, labels = _on(device, *_batch(1, 61, 5))
    ref, ref_labels = _on(device, *_batch(2, 83 if ref_labels_given else 61, 5))
    _assert_like_pml(x=x, labels=labels, ref=ref, ref_labels=ref_labels if ref_labels_given else None,
                     reducer="MeanReducer")
    assert calls


def check_several_blocks(device, n, calls, monkeypatch):
    """n rows in blocks of 16 (the caller makes n span several column chunks)."""
    monkeypatch.setattr(_common, "ROW_BLOCK_VALUES", 16 * n)
    x, labels = _on(device, *_batch(3, n, 6))
    _assert_like_pml(x=x, labels=labels)
    assert calls.count("block_totals") > 1


def check_degenerate_batch(device, case, calls):
    x, labels = _batch(5, 9, 3)
    miner_kw = None
    if case == "one_class":
        labels = torch.zeros_like(labels)
    elif case == "all_distinct":
        labels = torch.arange(len(labels))
    else:
        miner_kw = {"pos_margin": 5.0, "neg_margin": -1.0}
    x, labels = _on(device, x, labels)
    got, got_grads, loss_fn, _ = _run("dmlkern", x, labels, miner_kw=miner_kw)
    want, want_grads, _, want_mined = _run("pml", x.cpu(), labels.cpu(), miner_kw=miner_kw)
    torch.testing.assert_close(got.cpu(), want)
    torch.testing.assert_close(got_grads[0].cpu(), want_grads[0])
    degenerate = all(len(t) <= 1 for t in want_mined)
    assert loss_fn.last_backend == ("zero" if degenerate else "blocked"), (case, loss_fn.last_fallback)
    assert "block_totals" in calls


def check_gradcheck_fp64_and_bits(device, calls):
    x, labels = _on(device, *_batch(6, 8, 2, d=3))
    x.requires_grad_(True)
    loss_fn = losses.ContrastiveLoss(pos_margin=0.2, neg_margin=1.4)
    miner = miners.PairMarginMiner(pos_margin=0.5, neg_margin=1.5)

    def loss(t):
        return loss_fn(t, labels, miner(t, labels))

    assert torch.autograd.gradcheck(loss, (x,))
    assert "block_grads" in calls
    assert torch.equal(torch.autograd.grad(loss(x), x)[0], torch.autograd.grad(loss(x), x)[0])
