// The Python module object of mimic_fast._C. It exports nothing: importing it runs the static
// TORCH_LIBRARY registrations in mimic_cpu.cpp (torch.ops.mimic_fast.cpu_*). No pybind11, so
// this translation unit costs nothing to compile.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "mimic_fast CPU ops, registered as torch.ops.mimic_fast.cpu_*", -1, nullptr};
  return PyModule_Create(&module_def);
}
