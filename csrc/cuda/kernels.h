// Host-side interface of the hand-written CUDA kernels of mimic_fast (csrc/cuda/*.cu).
//
// Plain C++ over raw device pointers and a cudaStream_t, so that the .cu files compile without
// torch's headers (`nvcc -c` in CI) and the torch binding (cuda_ops.cpp) is the only file that
// knows about at::Tensor. Every launcher is asynchronous on `stream`, allocates nothing and never
// synchronises the host, so all of them can be captured in a CUDA graph. They return
// cudaGetLastError() after the launch (cudaSuccess for empty inputs, where nothing is launched).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mimic_fast_cuda {

// Storage dtypes of the kernels; all arithmetic is float32.
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Codes of mimic_fast/activations.py ACTIVATION_CODES.
enum Activation : int { kRelu = 0, kSigmoid = 1, kTanh = 2, kGelu = 3 };

// Reductions of logit_mse_loss (mimic_fast/ops/cuda.py REDUCTION_CODES).
enum Reduction : int { kMean = 0, kSum = 1, kNone = 2 };

inline int dtype_bytes(DType dt) { return dt == DType::kF32 ? 4 : 2; }

// Number of float32 partial sums the loss launchers may write (stage one of the deterministic
// two-stage reduction): size the `partials` workspace with it.
inline int64_t loss_max_blocks(int num_sms) { return static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 8; }

// ---- epilogue.cu -------------------------------------------------------------------------------
// h = act(a + bias[col]) in place over a (rows, cols) tile whose rows are `ld` elements apart (ld >= cols);
// bias may be null. An activation code other than those of Activation launches nothing and returns
// cudaErrorInvalidValue.
cudaError_t bias_act_fwd(DType dt, void* a, const void* bias, int64_t rows, int64_t cols, int64_t ld,
                         int act, int num_sms, cudaStream_t stream);

// With a = a_in + bias[col]: a_in <- act(a) (the hidden tile, for dW) and dh <- dh * act'(a) (da); both
// tiles have leading dimension ld.
cudaError_t bias_act_bwd(DType dt, void* a_in_to_h, void* dh_to_da, const void* bias, int64_t rows,
                         int64_t cols, int64_t ld, int act, int num_sms, cudaStream_t stream);

// ---- logit_loss.cu -----------------------------------------------------------------------------
// Logit regression, one pass: r = s - t (zero_mean: minus the row mean of s - t), dy = 2 r (times
// 1/(rows cols) for mean), loss_elem = r^2 (reduction none only; ignored otherwise), and for mean/sum
// *loss_out = Σ r^2 (/ rows cols) as float32, summed in a fixed order (per-block partials, then one
// block). s, t, dy, loss_elem are contiguous (rows, cols); dy is float32 (backward rounds once),
// loss_elem has s's dtype. partials holds loss_max_blocks(num_sms) floats.
cudaError_t logit_mse(DType s_dt, const void* s, DType t_dt, const void* t, int64_t rows, int64_t cols,
                      int reduction, bool zero_mean, void* dy, void* loss_elem, float* partials,
                      float* loss_out, int num_sms, cudaStream_t stream);

// *out = scale * Σ partials[0..n), one block, fixed summation order.
cudaError_t sum_partials(const float* partials, int64_t n, double scale, float* out, cudaStream_t stream);

// ---- kd_loss.cu --------------------------------------------------------------------------------
// Hinton KD per row at temperature T, two passes over each row (online softmax statistics, then the
// gradient): *loss_out = T^2/rows Σ_rows KL(softmax(t/T) || softmax(s/T)) (float32) and
// dy = T/rows (softmax(s/T) - softmax(t/T)) in float32. Any cols >= 1 (a warp per row up to 1024
// columns, a 256-thread block per row above). partials holds loss_max_blocks(num_sms) floats.
cudaError_t kd_loss(DType s_dt, const void* s, DType t_dt, const void* t, int64_t rows, int64_t cols,
                    float temperature, void* dy, float* partials, float* loss_out, int num_sms,
                    cudaStream_t stream);

// ---- arch.cu -----------------------------------------------------------------------------------
// The SASS/PTX architectures the kernels were compiled for (__CUDA_ARCH_LIST__, e.g. 800, 900):
// writes up to `cap` of them to `out` and returns how many there are.
int compiled_archs(int* out, int cap);

}  // namespace mimic_fast_cuda
