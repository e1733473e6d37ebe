// The Python extension module dmlkern._C: loading it registers the ops
// (ops.cpp and the backends); it also reports what was compiled. Only pybind11: torch/extension.h
// would add ~20 s of compile time for nothing used here.
#include <pybind11/pybind11.h>

#include <string>

#ifndef DMLKERN_CUDA_ARCH_LIST
#define DMLKERN_CUDA_ARCH_LIST ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_info", [] {
    pybind11::dict info;
    info["cpu"] = true;
#ifdef DMLKERN_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_arch_list"] = std::string(DMLKERN_CUDA_ARCH_LIST);
    return info;
  });
}
