"""Backend selection (dmlkern/ops/dispatch.py): "auto" per device, the DMLKERN_BACKEND override,
fallbacks when Triton or the extension is missing, and clear errors for impossible choices."""
import pytest
import torch

from dmlkern.ops import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def machine(monkeypatch):
    """Pretend which parts are present: triton, its interpreter, the C++ extension."""
    monkeypatch.delenv("DMLKERN_BACKEND", raising=False)

    def have(triton=True, interpret=False, extension=True):
        monkeypatch.setattr(dispatch, "triton_available", lambda: triton)
        monkeypatch.setattr(dispatch, "triton_ops_wanted", lambda: triton)
        monkeypatch.setattr(dispatch, "interpret_mode", lambda: interpret)
        monkeypatch.setattr(dispatch, "_EXTENSION_LOADED", extension)
    return have


def test_auto_picks_per_device(machine):
    machine()
    assert dispatch.resolve_backend("auto", CUDA) == "triton"
    assert dispatch.resolve_backend("auto", CPU) == "cpp"
    assert dispatch.resolve_backend(None, CPU) == "cpp"
    assert dispatch.resolve_backend("auto", torch.device("meta")) == "reference"


def test_auto_on_cuda_without_triton_uses_the_cuda_extension(machine):
    machine(triton=False)
    assert dispatch.resolve_backend("auto", CUDA) == "cpp"
    machine(triton=False, extension=False)
    assert dispatch.resolve_backend("auto", CUDA) == "reference"
    assert dispatch.resolve_backend("auto", CPU) == "reference"


def test_environment_overrides_auto_only(machine, monkeypatch):
    machine()
    monkeypatch.setenv("DMLKERN_BACKEND", "reference")
    assert dispatch.resolve_backend("auto", CPU) == "reference"
    assert dispatch.resolve_backend("cpp", CPU) == "cpp"  # an explicit choice wins
    monkeypatch.setenv("DMLKERN_BACKEND", "")
    assert dispatch.resolve_backend("auto", CPU) == "cpp"
    monkeypatch.setenv("DMLKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DMLKERN_BACKEND"):
        dispatch.resolve_backend("auto", CPU)


def test_impossible_choices_raise_clearly(machine):
    machine(triton=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("fused", CPU)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        dispatch.resolve_backend("triton", CUDA)
    machine(interpret=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.resolve_backend("triton", CPU)
    machine(interpret=True)
    assert dispatch.resolve_backend("triton", CPU) == "triton"
    machine(extension=False)
    with pytest.raises(RuntimeError, match="extension is not built"):
        dispatch.resolve_backend("cpp", CPU)


def test_triton_fp32_products_follow_matmul_precision():
    """fp32 dots are IEEE unless the user allows TF32 (torch.set_float32_matmul_precision);
    other dtypes never use TF32."""
    tk = pytest.importorskip("dmlkern.triton.pair_engine", reason="needs triton")
    saved = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert tk._launch_config(torch.zeros(1, dtype=torch.float32))["INPUT_PRECISION"] == want, setting
            for dtype in (torch.float64, torch.float16, torch.bfloat16):
                assert tk._launch_config(torch.zeros(1, dtype=dtype))["INPUT_PRECISION"] == "ieee", (setting, dtype)
    finally:
        torch.set_float32_matmul_precision(saved)


_IMPORT_PROBE = """
import json, sys
import dmlkern.losses
from dmlkern.ops import grouped_class_op, pair_engine
import torch
x, labels = torch.randn(64, 8, requires_grad=True), torch.arange(64) % 8
for loss_fn in (dmlkern.losses.FastAPLoss(), dmlkern.losses.PNPLoss()):  # backward by a vector-Jacobian product
    loss_fn(x, labels).backward()
    assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "inductor": "torch._inductor" in sys.modules,
                  "pair_engine_triton": pair_engine.pair_engine_forward_triton is not None,
                  "grouped_class_triton": grouped_class_op.TRITON is not None}))
"""


@pytest.mark.parametrize("triton_ops", ["", "1", "0"])
def test_import_registers_triton_ops_only_where_they_can_run(triton_ops):
    """Without a GPU driver or the interpreter, `import dmlkern` registers no Triton op, so it does
    not import torch._dynamo / torch._inductor (torch.library.triton_op does; ~1 s of every import),
    nor does a ranking loss's first backward (torch.func.vjp would); DMLKERN_TRITON_OPS=1 registers
    them anyway (tracing the GPU path on fake CUDA tensors), 0 never."""
    import json
    import os
    import subprocess
    import sys

    from _triton_device import env_without_interpreter
    from dmlkern.triton import _GPU_DRIVER_FILES, triton_available

    if not triton_available():
        pytest.skip("needs triton installed")
    if triton_ops == "" and any(os.path.exists(p) for p in _GPU_DRIVER_FILES):
        pytest.skip("needs a machine without a GPU driver (this one has one: the ops register)")
    env = env_without_interpreter()
    env.pop("DMLKERN_TRITON_OPS", None)
    if triton_ops:
        env["DMLKERN_TRITON_OPS"] = triton_ops
    run = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    registered = triton_ops == "1"
    assert seen == {"dynamo": registered, "inductor": registered, "pair_engine_triton": registered,
                    "grouped_class_triton": registered}, seen
