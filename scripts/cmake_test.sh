#!/usr/bin/env bash
# Configure, build and ctest the libtorch build (CMakeLists.txt) against the venv's torch.
# CPU kernels only: enough to prove the library builds and runs for C++ users. A Debug build
# without debug info (-O0, assertions on): it compiles ~2.5x faster than Release, whose -O3 code
# the Python extension (the same sources) already tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
TORCH_PREFIX=$($PY -c "import torch; print(torch.utils.cmake_prefix_path)")
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
EXTRA=()
NVRTC=$(ls "$SITE"/nvidia/cu13/lib/libnvrtc.so* 2>/dev/null | head -n 1 || true)
if [ -n "$NVRTC" ]; then  # a CUDA build of torch: its CMake config looks for the toolkit
  EXTRA+=(-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda -DCUDA_nvrtc_LIBRARY="$NVRTC")
fi
cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0 -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" "${EXTRA[@]}"
cmake --build build-cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build-cmake --output-on-failure
