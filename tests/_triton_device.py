"""What the Triton kernel test modules share: `triton_device()` skips the module (saying why)
without triton or a place to run its kernels, else gives that place, "cuda" or "cpu" (the
interpreter, TRITON_INTERPRET=1); `gpu_marks(device)` marks a module's tests `gpu` on a GPU
(benchmarks/gpu_check.sh runs `-m gpu`); `compile_for_sm90` compiles a kernel for an H100 / H200
without a GPU (the interpreter runs a kernel's Python, never its compilation)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dmlkern.triton import interpret_mode, triton_available


def env_without_interpreter(**extra):
    """os.environ for a subprocess without TRITON_INTERPRET, plus `extra`: one that runs CPU paths
    only (its `import dmlkern` then registers no Triton op and skips torch._dynamo and
    torch._inductor, ~1-2 s), or one that compiles or traces Triton kernels rather than
    interpreting them."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **extra}


def triton_device():
    if not triton_available():
        pytest.skip("needs triton", allow_module_level=True)
    if not (torch.cuda.is_available() or interpret_mode()):
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
import importlib

module, name, types, configs = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), name)
for consts in configs:
    signature = {arg: "constexpr" if arg in consts else types.get(arg, "i32") for arg in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert name in kernel.asm["ptx"] and len(kernel.asm["cubin"]) > 0, consts
print("compiled", len(configs))
"""


def compile_for_sm90(module, name, types, configs):
    """Compile kernel `name` of `module` for sm_90 (PTX, and a cubin from Triton's ptxas) in each
    constexpr configuration of `configs`, in a process without TRITON_INTERPRET; `types` gives
    each non-constexpr argument's Triton type (default i32). Raises with the compiler's message."""
    env = env_without_interpreter()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps([module, name, types, configs])], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"compiled {len(configs)}" in done.stdout, done.stderr[-3000:]
