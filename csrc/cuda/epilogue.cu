// Elementwise epilogues of the chunked bottleneck MLP, run on each (B, chunk) tile between the
// cuBLAS GEMMs while the tile is still in L2:
//   forward   h = act(a + b1)                        (in place over the GEMM output a = z V_jᵀ)
//   backward  h = act(a + b1), da = dh ⊙ act'(a + b1)  (in place over a and over dh = dy W_j)
// Limits: memory-bound by design (one read and one write per element, fp32 math); 16-byte vector
// accesses only when the tile width and its leading dimension are multiples of 8 and every pointer is
// 16-byte aligned (a ragged last chunk of H takes the scalar path). No torch headers: see kernels.h.
#include "common.cuh"

namespace mimic_fast_cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, bool VEC>
__device__ __forceinline__ void load_cols(const T* __restrict__ p, int64_t c0, int64_t cols,
                                          float (&v)[kVec]) {
  if (VEC) {
    load8(p + c0, v);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = c0 + i < cols ? to_f32<T>(p[c0 + i]) : 0.f;
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_cols(T* __restrict__ p, int64_t c0, int64_t cols,
                                           const float (&v)[kVec]) {
  if (VEC) {
    store8(p + c0, v);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (c0 + i < cols) p[c0 + i] = from_f32<T>(v[i]);
    }
  }
}

// The bias of a thread's 8 columns; zeros when the layer has none.
template <typename T, bool VEC>
__device__ __forceinline__ void load_bias(const T* __restrict__ bias, int64_t c0, int64_t cols,
                                          float (&b)[kVec]) {
  if (bias != nullptr) {
    load_cols<T, VEC>(bias, c0, cols, b);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) b[i] = 0.f;
  }
}

// A thread owns 8 consecutive columns and walks the rows with stride gridDim.y, so it reads its
// bias values once. Offsets are int64: a tile may pass 2^31 elements.
template <typename T, int ACT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    bias_act_fwd_kernel(T* __restrict__ a, const T* __restrict__ bias, int64_t rows, int64_t cols,
                        int64_t ld) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (c0 >= cols) return;
  float b[kVec];
  load_bias<T, VEC>(bias, c0, cols, b);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    T* row = a + r * ld;
    float v[kVec];
    load_cols<T, VEC>(row, c0, cols, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = act_fwd<ACT>(v[i] + b[i]);
    store_cols<T, VEC>(row, c0, cols, v);
  }
}

template <typename T, int ACT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    bias_act_bwd_kernel(T* __restrict__ a_to_h, T* __restrict__ dh_to_da, const T* __restrict__ bias,
                        int64_t rows, int64_t cols, int64_t ld) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (c0 >= cols) return;
  float b[kVec];
  load_bias<T, VEC>(bias, c0, cols, b);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    T* arow = a_to_h + r * ld;
    T* grow = dh_to_da + r * ld;
    float a[kVec], g[kVec];
    load_cols<T, VEC>(arow, c0, cols, a);
    load_cols<T, VEC>(grow, c0, cols, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float h, d;
      act_fwd_grad<ACT>(a[i] + b[i], h, d);
      a[i] = h;
      g[i] *= d;
    }
    store_cols<T, VEC>(arow, c0, cols, a);
    store_cols<T, VEC>(grow, c0, cols, g);
  }
}

// Enough blocks to fill the GPU (~16 resident 128-thread blocks per SM), each thread then loops
// over rows / gridDim.y rows.
dim3 epilogue_grid(int64_t rows, int64_t cols, int num_sms) {
  const int64_t gx = ceil_div(cols, static_cast<int64_t>(kThreads) * kVec);
  const int64_t target = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 16;
  int64_t gy = ceil_div(target, gx);
  gy = gy < rows ? gy : rows;
  gy = gy < 65535 ? gy : 65535;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy > 0 ? gy : 1));
}

}  // namespace

cudaError_t bias_act_fwd(DType dt, void* a, const void* bias, int64_t rows, int64_t cols, int64_t ld,
                         int act, int num_sms, cudaStream_t stream) {
  if (ld < cols) return cudaErrorInvalidValue;
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const bool vec = cols % kVec == 0 && ld % kVec == 0 && aligned16(a) && (bias == nullptr || aligned16(bias));
  const dim3 grid = epilogue_grid(rows, cols, num_sms);
  bool known = true;
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    known = dispatch_activation(act, [&](auto act_tag) {
      constexpr int ACT = decltype(act_tag)::value;
      T* pa = static_cast<T*>(a);
      const T* pb = static_cast<const T*>(bias);
      if (vec) {
        bias_act_fwd_kernel<T, ACT, true><<<grid, kThreads, 0, stream>>>(pa, pb, rows, cols, ld);
      } else {
        bias_act_fwd_kernel<T, ACT, false><<<grid, kThreads, 0, stream>>>(pa, pb, rows, cols, ld);
      }
    });
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t bias_act_bwd(DType dt, void* a_in_to_h, void* dh_to_da, const void* bias, int64_t rows,
                         int64_t cols, int64_t ld, int act, int num_sms, cudaStream_t stream) {
  if (ld < cols) return cudaErrorInvalidValue;
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const bool vec = cols % kVec == 0 && ld % kVec == 0 && aligned16(a_in_to_h) && aligned16(dh_to_da) &&
                   (bias == nullptr || aligned16(bias));
  const dim3 grid = epilogue_grid(rows, cols, num_sms);
  bool known = true;
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    known = dispatch_activation(act, [&](auto act_tag) {
      constexpr int ACT = decltype(act_tag)::value;
      T* pa = static_cast<T*>(a_in_to_h);
      T* pg = static_cast<T*>(dh_to_da);
      const T* pb = static_cast<const T*>(bias);
      if (vec) {
        bias_act_bwd_kernel<T, ACT, true><<<grid, kThreads, 0, stream>>>(pa, pg, pb, rows, cols, ld);
      } else {
        bias_act_bwd_kernel<T, ACT, false><<<grid, kThreads, 0, stream>>>(pa, pg, pb, rows, cols, ld);
      }
    });
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace mimic_fast_cuda
