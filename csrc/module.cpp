// The Python module beitfast._C. Importing it loads the library, whose static initialisers register
// every op of csrc/ with the PyTorch dispatcher; the module itself only says how it was built.
//
// Conventions for the sources of csrc/ (see DEVELOPERS.md):
// - The build takes every csrc/*.cpp, and every csrc/*.cu when it builds CUDA: adding a file is
//   enough, nothing to list. `BEITFAST_WITH_CUDA` is defined in CUDA builds.
// - One op per file: `<op>.cpp` holds the schema and the CPU kernel, `<op>_cuda.cu` the CUDA kernel
//   (a CUDA-only op may define its schema in the .cu file).
// - Ops live in the `beitfast` namespace and are exposed as torch.ops.beitfast.<name>:
//     TORCH_LIBRARY_FRAGMENT(beitfast, m) {       // never TORCH_LIBRARY: several files add ops
//       m.set_python_module("beitfast.ops.x");    // the Python module holding its register_fake
//       m.def("name(Tensor a, ...) -> Tensor");
//     }
//     TORCH_LIBRARY_IMPL(beitfast, CPU, m) { m.impl("name", &name_cpu); }    // in <op>.cpp
//     TORCH_LIBRARY_IMPL(beitfast, CUDA, m) { m.impl("name", &name_cuda); }  // in <op>_cuda.cu
// - No pybind11 bindings: Python calls torch.ops.beitfast.<name>, which torch.compile keeps as one
//   node once the fake (meta) implementation is registered in Python.
// - CUDA kernels launch on at::cuda::getCurrentCUDAStream() under a CUDAGuard of the output's
//   device, check the launch with C10_CUDA_KERNEL_LAUNCH_CHECK(), and never synchronise the host.
#include <Python.h>

namespace {

PyModuleDef beitfast_c_module = {
    PyModuleDef_HEAD_INIT,
    "beitfast._C",
    "Native ops of beitfast, registered as torch.ops.beitfast.*",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&beitfast_c_module);
  if (module == nullptr) return nullptr;
#ifdef BEITFAST_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddObject(module, "with_cuda", PyBool_FromLong(with_cuda)) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
