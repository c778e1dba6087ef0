// The op library torch.ops.mergekernels, with the schemas of csrc/op_schemas.h. CPU and CUDA
// implementations register against them in csrc/cpu/*.cpp and csrc/cuda/bindings.cpp; the Python
// face (fake kernels, argument checks, wrappers) is mergekernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "input_faults.h"
#include "op_schemas.h"

// Importing mergekernels._C loads this shared object, which runs the registrations below. The
// module's one function is the merge command's input fault handler (input_faults.h).
extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"install_input_fault_handler", mk::install_input_fault_handler, METH_VARARGS,
       "Name the input file and exit with status 2 when a mapped input is truncated (SIGBUS)."},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(mergekernels, m) { mk::define_ops(m); }
