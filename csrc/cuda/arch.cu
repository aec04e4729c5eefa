// The GPU architectures this extension was compiled for, for mf.info() and for the cuda backend's
// "can this device run it" check. nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every pass.
#include "kernels.h"

namespace mimic_fast_cuda {

int compiled_archs(int* out, int cap) {
#ifdef __CUDA_ARCH_LIST__
  static const int kArchs[] = {__CUDA_ARCH_LIST__};
  const int n = static_cast<int>(sizeof(kArchs) / sizeof(kArchs[0]));
  for (int i = 0; i < n && i < cap; ++i) out[i] = kArchs[i];
  return n;
#else
  (void)out;
  (void)cap;
  return 0;
#endif
}

}  // namespace mimic_fast_cuda
