"""ContrastiveLoss on a PairMarginMiner's pairs with each row block in the Triton kernel
(dmlkern/triton/pair_margin_rows.py, the Triton backend) against PML 2.9.0 itself: values and
gradients for both distances of the loss and of the miner, every reducer, ref_emb, rows spanning
several blocks and column chunks, degenerate batches, fp64 gradcheck, bits on repeat. Runs under
TRITON_INTERPRET=1 on CPU tensors, or on a GPU."""
import pytest
import torch

import _pair_margin_kernel_cases as cases
from dmlkern.fused import pair_margin_contrastive as fused_pmc
from _triton_device import compile_for_sm90, gpu_marks, triton_device

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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_kind,miner_kind", [("euclidean", "euclidean"), ("cosine", "cosine"),
                                                  ("euclidean", "cosine"), ("cosine", "euclidean")])
def test_matches_pml(dtype, loss_kind, miner_kind, kernel_calls):
    cases.check_matches_pml(DEVICE, dtype, loss_kind, miner_kind, kernel_calls)


@pytest.mark.parametrize("ref_labels_given", [True, False])
def test_ref_emb_matches_pml(ref_labels_given, kernel_calls):
    cases.check_ref_emb(DEVICE, ref_labels_given, kernel_calls)


def test_rows_spanning_several_blocks_and_chunks(monkeypatch, kernel_calls):
    monkeypatch.setattr(fused_pmc.triton_rows, "CHUNK_COLUMNS", 64)  # 150 columns: chunks of 64, 64, 22
    cases.check_several_blocks(DEVICE, 150, kernel_calls, monkeypatch)


@pytest.mark.parametrize("case", ["one_class", "all_distinct", "nothing_kept"])
def test_degenerate_batches(case, kernel_calls):
    cases.check_degenerate_batch(DEVICE, case, kernel_calls)


def test_gradcheck_fp64_and_bits_on_repeat(kernel_calls):
    cases.check_gradcheck_fp64_and_bits(DEVICE, kernel_calls)


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
