// The Python module object of mimic_fast._C_cuda. It exports nothing: importing it runs the static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL registrations of cuda_ops.cpp
// (torch.ops.mimic_fast.cuda_*). No pybind11, so this translation unit costs nothing to compile.
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_cuda",
      "mimic_fast CUDA ops, registered as torch.ops.mimic_fast.cuda_*", -1, nullptr};
  return PyModule_Create(&module_def);
}
