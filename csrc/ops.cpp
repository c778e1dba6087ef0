// The op library torch.ops.mergekernels, with the schemas of csrc/op_schemas.h. CPU and CUDA
// implementations register against them in csrc/cpu/*.cpp and csrc/cuda/bindings.cpp; the Python
// face (fake kernels, argument checks, wrappers) is mergekernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

// Importing mergekernels._C loads this shared object, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(mergekernels, m) { mk::define_ops(m); }
