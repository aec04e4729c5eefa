// Device helpers shared by the kernels: dtype conversion, 8-element vector loads/stores, warp and
// block reductions in a fixed order (deterministic), and the activations with their derivatives.
//
// Built without --use_fast_math (setup.py NVCC_FLAGS): these kernels are memory-bound, and the flag
// would make expf/logf approximate (__expf's error grows with |x|: KD's softmax, sigmoid, GELU') and
// flush denormals. tanh and sigmoid are still written with expm1f / expf and __fdiv_rn, so that
// a build that adds the flag keeps tanh off tanh.approx.f32 (relative error ~2^-11).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace mimic_fast_cuda {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Every vectorised kernel moves 8 elements per step: one 16-byte access for 2-byte types, two
// for float32. Callers guarantee 16-byte alignment of p (base pointer aligned, index % 8 == 0).
constexpr int kVec = 8;

template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float (&v)[kVec]) {
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int q = 0; q < kVec / kPer; ++q) {
    uint4 raw = *reinterpret_cast<const uint4*>(p + q * kPer);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[q * kPer + i] = to_f32<T>(e[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const float (&v)[kVec]) {
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int q = 0; q < kVec / kPer; ++q) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) e[i] = from_f32<T>(v[q * kPer + i]);
    *reinterpret_cast<uint4*>(p + q * kPer) = raw;
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Butterfly sum: every lane ends with the same value, summed in the same order on every run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_totals[w];
  }
  return total;
}

// ---- activations (codes of mimic_fast/activations.py) -----------------------------------------
constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

__device__ __forceinline__ float sigmoid_f(float a) {
  // exp of a non-positive argument only: no overflow, and the division is exact-rounded.
  const float e = expf(-fabsf(a));
  const float s = __fdiv_rn(1.f, 1.f + e);
  return a >= 0.f ? s : e * s;  // not 1 - s: that cancels to 0 for a << 0
}

__device__ __forceinline__ float tanh_f(float a) {
  // tanh|a| = expm1(2|a|) / (expm1(2|a|) + 2): accurate near 0, and |a| > 10 rounds to 1 in float32.
  const float m = expm1f(2.f * fminf(fabsf(a), 10.f));
  return copysignf(__fdiv_rn(m, m + 2.f), a);
}

template <int ACT>
__device__ __forceinline__ float act_fwd(float a) {
  if constexpr (ACT == kRelu) {
    return a > 0.f ? a : 0.f;
  } else if constexpr (ACT == kSigmoid) {
    return sigmoid_f(a);
  } else if constexpr (ACT == kTanh) {
    return tanh_f(a);
  } else {  // exact erf GELU, nn.GELU(approximate="none")
    return 0.5f * a * (1.f + erff(a * kInvSqrt2));
  }
}

// h = act(a) and g = act'(a) (relu'(0) = 0, as autograd does).
template <int ACT>
__device__ __forceinline__ void act_fwd_grad(float a, float& h, float& g) {
  if constexpr (ACT == kRelu) {
    h = a > 0.f ? a : 0.f;
    g = a > 0.f ? 1.f : 0.f;
  } else if constexpr (ACT == kSigmoid) {
    h = sigmoid_f(a);
    g = h * (1.f - h);
  } else if constexpr (ACT == kTanh) {
    h = tanh_f(a);
    g = 1.f - h * h;
  } else {
    const float cdf = 0.5f * (1.f + erff(a * kInvSqrt2));
    h = a * cdf;
    g = cdf + a * expf(-0.5f * a * a) * kInvSqrt2Pi;
  }
}

// Calls f.template operator()<T>() with T the storage type of dt.
template <typename F>
__host__ inline void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kF32: f(float{}); break;
    case DType::kF16: f(__half{}); break;
    case DType::kBF16: f(__nv_bfloat16{}); break;
  }
}

// Calls f(std::integral_constant<int, ACT>{}); false (nothing called) for an unknown code, which the
// launchers report as cudaErrorInvalidValue instead of silently running some other activation.
template <typename F>
__host__ inline bool dispatch_activation(int act, F&& f) {
  switch (act) {
    case kRelu: f(std::integral_constant<int, kRelu>{}); return true;
    case kSigmoid: f(std::integral_constant<int, kSigmoid>{}); return true;
    case kTanh: f(std::integral_constant<int, kTanh>{}); return true;
    case kGelu: f(std::integral_constant<int, kGelu>{}); return true;
    default: return false;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mimic_fast_cuda
