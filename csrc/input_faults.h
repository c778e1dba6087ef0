// A SIGBUS handler for the merge command: inputs are read through file maps, and a file truncated
// while it is mapped faults on the next touch of a page past its new end. The handler names the
// file from /proc/self/maps and ends the process with the command's error status instead of a bare
// "Bus error"; nothing is published (the output directory appears only after a finished merge).
#pragma once

#include <Python.h>

namespace mk {

// mergekernels._C.install_input_fault_handler(prefix: str) -> None
PyObject* install_input_fault_handler(PyObject* self, PyObject* args);

}  // namespace mk
