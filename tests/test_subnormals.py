"""The C++ CPU engine's tasks run with subnormal numbers flushed to zero (engine_cpu.h,
FlushSubnormalsGuard): a backward tile of raw logits spanning more than ~90 is mostly subnormal
weights, on which x86 cores slowed MKL's products ~7x. Checked here: the fused L-Softmax's
gradients against the reference's where those weights occur (every entry the reference gives a
normal value matches; its subnormal entries are 0 in the fused result), and the caller's
floating-point mode is left as it was (subnormals still survive torch ops on the calling thread)."""
import pytest
import torch

from dmlkern import losses
from dmlkern.ops.dispatch import extension_loaded

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="needs the built extension (dmlkern._C)")

TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32


def _grads(backend, x, labels, state):
    loss = losses.LargeMarginSoftmaxLoss(num_classes=40, embedding_size=x.shape[1])
    loss.load_state_dict(state)
    loss.backend = backend
    leaf = x.clone().requires_grad_()
    value = loss(leaf, labels)
    value.backward()
    assert loss.last_backend == ("cpp" if backend == "auto" else "reference"), loss.last_fallback
    return value.detach(), leaf.grad, loss.W.grad


@pytest.mark.parametrize("threads", [1, 2])
def test_subnormal_backward_weights_flush_to_zero_and_the_mode_is_restored(threads):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 16, generator=g) * 6  # logits |x| |w| cos(m theta) spanning a few hundred
    labels = torch.randint(0, 40, (37,), generator=g)
    state = losses.LargeMarginSoftmaxLoss(num_classes=40, embedding_size=16).state_dict()
    state["W"] = torch.randn(16, 40, generator=g) * 6
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = _grads("auto", x, labels, state)
        # the caller's thread keeps gradual underflow: a subnormal survives a torch op here
        assert torch.tensor([TINY / 64]).mul(1.0).item() > 0
        ref = _grads("reference", x, labels, state)
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-4, atol=1e-5)
    subnormal = (ref[2] != 0) & (ref[2].abs() < TINY)
    assert subnormal.any(), "the case should give the weights' gradient subnormal entries"
    assert (fused[2][subnormal] == 0).all()
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-4, atol=1e-5)
