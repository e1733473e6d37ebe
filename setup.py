"""Build dmlkern's C++ extension (dmlkern._C).

Always builds the CPU kernels (csrc/cpu, C++20, OpenMP). Also compiles the CUDA
kernels (csrc/cuda) when torch is a CUDA build and nvcc is found, or when
FORCE_CUDA=1 -- with no GPU visible too, so CI always compiles them.
DMLKERN_NO_CUDA=1 builds CPU only. Without a visible GPU and without
TORCH_CUDA_ARCH_LIST the arch list defaults to "8.0;9.0".
Always build with `pip install --no-build-isolation ...` so the extension is
compiled against the torch that will import it.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

# torch's cpp_extension derives CUDA_HOME from `which nvcc`, which misleads it where the nvcc on
# PATH is a wrapper outside the toolkit: without CUDA_HOME, use /usr/local/cuda when it exists.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_ARCH_LIST = "8.0;9.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _env_flag("DMLKERN_NO_CUDA"):
        return False, "DMLKERN_NO_CUDA=1"
    if _env_flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc")
    ):
        return False, "nvcc not found"
    return True, f"torch is a CUDA {torch.version.cuda} build and nvcc is at {CUDA_HOME}"


def _arch_list():
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"
        else:
            # cpp_extension crashes without an arch list when no GPU is visible.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return os.environ["TORCH_CUDA_ARCH_LIST"]


def _extension():
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -g0: Python's own CFLAGS carry -g, which makes the torch-header-heavy sources compile ~1.5x
    # slower and their objects ~10x larger; the extension ships without debug info, as torch does.
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp"]
    define_macros = []
    with_cuda, why = _want_cuda()
    if with_cuda:
        arch_list = _arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros += [("DMLKERN_WITH_CUDA", None), ("DMLKERN_CUDA_ARCH_LIST", f'"{arch_list}"')]
        print(f"dmlkern: building backends cpu + cuda (arch list {arch_list}; {why})")
        return CUDAExtension(
            "dmlkern._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    print(f"dmlkern: building backends cpu only ({why})")
    return CppExtension(
        "dmlkern._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


class IncrementalBuildExtension(BuildExtension):
    """Keeps object files in ./build/temp for every entry point (setup.py build_ext,
    pip install -e ., pip wheel .), so ninja rebuilds only what changed: pip's editable
    and wheel builds would otherwise compile everything again in a fresh temp dir."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(HERE, "build", "temp")


setup(
    name="dmlkern",
    version="0.1.0",
    description="Fused deep-metric-learning losses for PyTorch, drop-in for pytorch-metric-learning",
    packages=find_packages(include=["dmlkern", "dmlkern.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": IncrementalBuildExtension},
    python_requires=">=3.10",
)
