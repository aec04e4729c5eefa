// Hinton knowledge distillation per row, forward and gradient, two passes over each row:
//   pass 1 (online softmax, one read): m_s, Z_s of v = s/T; m_t, Z_t of u = t/T; A = Σ e^{u-m_t}(u-v)
//          KL_row = A/Z_t + (m_s - m_t) + log Z_s - log Z_t       (= Σ p (log p - log q))
//   pass 2 (re-read, in cache):  dy = T/rows · (e^{v-m_s}/Z_s - e^{u-m_t}/Z_t)
//   loss = T²/rows · Σ KL_row, reduced deterministically (per-block partials, then one block).
// Limits: logits must be finite (a -inf logit makes the online statistics NaN); a warp per row up
// to 1024 columns, a 256-thread block per row above (C up to 32k and beyond, no shared-memory row
// cache, so pass 2 relies on L2). The teacher's gradient is not computed here (see ops/cuda.py).
#include "common.cuh"

#include <cmath>

namespace mimic_fast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kWarpRowMaxCols = 1024;

struct Stats {
  float ms, zs;      // running max and Σ e^{v - ms} of the student's scaled logits
  float mt, zt, at;  // the same for the teacher, and Σ e^{u - mt} (u - v)
};

__device__ __forceinline__ Stats stats_init() {
  return Stats{-INFINITY, 0.f, -INFINITY, 0.f, 0.f};
}

__device__ __forceinline__ void stats_add(Stats& st, float v, float u) {
  if (v > st.ms) {
    st.zs = st.zs * expf(st.ms - v) + 1.f;
    st.ms = v;
  } else {
    st.zs += expf(v - st.ms);
  }
  if (u > st.mt) {
    const float f = expf(st.mt - u);
    st.zt = st.zt * f + 1.f;
    st.at = st.at * f + (u - v);
    st.mt = u;
  } else {
    const float e = expf(u - st.mt);
    st.zt += e;
    st.at += e * (u - v);
  }
}

// Symmetric merge: merge(a, b) and merge(b, a) round identically (no FMA contraction), so every lane
// of a butterfly ends with bitwise the same statistics.
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : expf(m_old - m_new);
}

__device__ __forceinline__ Stats stats_merge(const Stats& a, const Stats& b) {
  Stats r;
  r.ms = fmaxf(a.ms, b.ms);
  const float fa = rescale(a.ms, r.ms), fb = rescale(b.ms, r.ms);
  r.zs = __fadd_rn(__fmul_rn(a.zs, fa), __fmul_rn(b.zs, fb));
  r.mt = fmaxf(a.mt, b.mt);
  const float ga = rescale(a.mt, r.mt), gb = rescale(b.mt, r.mt);
  r.zt = __fadd_rn(__fmul_rn(a.zt, ga), __fmul_rn(b.zt, gb));
  r.at = __fadd_rn(__fmul_rn(a.at, ga), __fmul_rn(b.at, gb));
  return r;
}

__device__ __forceinline__ Stats stats_shfl_xor(const Stats& st, int o) {
  return Stats{__shfl_xor_sync(0xffffffffu, st.ms, o), __shfl_xor_sync(0xffffffffu, st.zs, o),
               __shfl_xor_sync(0xffffffffu, st.mt, o), __shfl_xor_sync(0xffffffffu, st.zt, o),
               __shfl_xor_sync(0xffffffffu, st.at, o)};
}

// G threads per row: 32 (a warp, G rows per block = 8) or kThreads (the whole block).
template <typename TS, typename TT, int G>
__global__ void __launch_bounds__(kThreads)
    kd_kernel(const TS* __restrict__ s, const TT* __restrict__ t, int64_t rows, int64_t cols,
              float inv_t, float coef, bool vec, float* __restrict__ dy, float* __restrict__ partials) {
  static_assert(G == 32 || G == kThreads, "a row is handled by a warp or by the whole block");
  __shared__ Stats warp_stats[kThreads / 32];
  const int j = threadIdx.x % G;  // index within the row's group
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const int64_t ngroups = (static_cast<int64_t>(gridDim.x) * blockDim.x) / G;
  // Block-per-row: every thread runs the same number of iterations (the __syncthreads are uniform).
  float acc = 0.f;
  for (int64_t row = group; row < rows; row += ngroups) {
    const TS* sr = s + row * cols;
    const TT* tr = t + row * cols;
    float* dr = dy + row * cols;
    Stats st = stats_init();
    if (vec) {
      for (int64_t c = static_cast<int64_t>(j) * kVec; c < cols; c += G * kVec) {
        float a[kVec], b[kVec];
        load8(sr + c, a);
        load8(tr + c, b);
#pragma unroll
        for (int e = 0; e < kVec; ++e) stats_add(st, a[e] * inv_t, b[e] * inv_t);
      }
    } else {
      for (int64_t c = j; c < cols; c += G) {
        stats_add(st, to_f32<TS>(sr[c]) * inv_t, to_f32<TT>(tr[c]) * inv_t);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) st = stats_merge(st, stats_shfl_xor(st, o));
    if constexpr (G > 32) {
      if ((threadIdx.x & 31) == 0) warp_stats[threadIdx.x >> 5] = st;
      __syncthreads();
      st = warp_stats[0];
      for (int w = 1; w < G / 32; ++w) st = stats_merge(st, warp_stats[w]);
      __syncthreads();  // warp_stats is rewritten for the next row
    }
    if (j == 0) {
      acc += __fdiv_rn(st.at, st.zt) + (st.ms - st.mt) + (logf(st.zs) - logf(st.zt));
    }
    const float ps = __fdiv_rn(coef, st.zs), pt = __fdiv_rn(coef, st.zt);
    if (vec) {
      for (int64_t c = static_cast<int64_t>(j) * kVec; c < cols; c += G * kVec) {
        float a[kVec], b[kVec];
        load8(sr + c, a);
        load8(tr + c, b);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          a[e] = ps * expf(a[e] * inv_t - st.ms) - pt * expf(b[e] * inv_t - st.mt);
        }
        store8(dr + c, a);
      }
    } else {
      for (int64_t c = j; c < cols; c += G) {
        const float v = to_f32<TS>(sr[c]) * inv_t, u = to_f32<TT>(tr[c]) * inv_t;
        dr[c] = ps * expf(v - st.ms) - pt * expf(u - st.mt);
      }
    }
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

}  // namespace

cudaError_t kd_loss(DType s_dt, const void* s, DType t_dt, const void* t, int64_t rows, int64_t cols,
                    float temperature, void* dy, float* partials, float* loss_out, int num_sms,
                    cudaStream_t stream) {
  const double T = static_cast<double>(temperature);
  // batchmean of an empty batch is NaN, as in F.kl_div: 0 partials times T²/0.
  const double scale = T * T / static_cast<double>(rows);
  int64_t blocks = 0;
  if (rows > 0 && cols > 0) {
    const bool warp_rows = cols <= kWarpRowMaxCols;
    blocks = warp_rows ? ceil_div(rows, kThreads / 32) : rows;
    const int64_t cap = loss_max_blocks(num_sms);
    blocks = blocks < cap ? blocks : cap;
    const bool vec = cols % kVec == 0 && aligned16(s) && aligned16(t) && aligned16(dy);
    const float inv_t = static_cast<float>(1.0 / T);
    const float coef = static_cast<float>(T / static_cast<double>(rows));
    const unsigned grid = static_cast<unsigned>(blocks);
    dispatch_dtype(s_dt, [&](auto s_tag) {
      using TS = decltype(s_tag);
      dispatch_dtype(t_dt, [&](auto t_tag) {
        using TT = decltype(t_tag);
        const TS* ps = static_cast<const TS*>(s);
        const TT* pt = static_cast<const TT*>(t);
        float* pd = static_cast<float*>(dy);
        if (warp_rows) {
          kd_kernel<TS, TT, 32><<<grid, kThreads, 0, stream>>>(ps, pt, rows, cols, inv_t, coef, vec,
                                                                pd, partials);
        } else {
          kd_kernel<TS, TT, kThreads><<<grid, kThreads, 0, stream>>>(ps, pt, rows, cols, inv_t, coef,
                                                                      vec, pd, partials);
        }
      });
    });
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return sum_partials(partials, blocks, scale, loss_out, stream);
}

}  // namespace mimic_fast_cuda
