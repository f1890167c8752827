// Python module shell of dmil_fast._C. The ops themselves are registered with
// TORCH_LIBRARY in their own folders; importing this module runs those registrations.
#include <torch/extension.h>

namespace {

bool built_with_cuda() {
#ifdef DMIL_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dmil_fast C++/CUDA kernels (ops are registered under torch.ops.dmil_fast)";
  m.def("built_with_cuda", &built_with_cuda,
        "True when the CUDA kernels were compiled into this extension");
  m.attr("torch_version") = TORCH_VERSION;
}
