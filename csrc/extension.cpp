// Python module shell of dmil_fast._C. The ops themselves are registered with
// TORCH_LIBRARY in their own folders; importing this module runs those registrations.
#include <torch/extension.h>

#include "interaction_scores/interaction_scores.h"

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
  m.def("cpu_kernel_isas", &dmil_fast::interaction::cpu_kernel_isas,
        "Instruction sets of the float CPU scoring kernels that this CPU runs, best first; the "
        "first is used unless the environment variable DMIL_FAST_CPU_ISA names another");
  m.def("cpu_kernel_isa", &dmil_fast::interaction::cpu_kernel_isa,
        "The instruction set a call of the float CPU scoring kernels uses now (RuntimeError when "
        "DMIL_FAST_CPU_ISA names one this CPU lacks)");
}
