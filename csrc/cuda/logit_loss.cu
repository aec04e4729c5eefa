// Logit-regression loss (Ba & Caruana 2014) and its gradient in one pass over the logits:
//   r = s - t  (zero_mean: r -= rowmean(s - t)),  dy = 2 r / (rows cols) [mean] or 2 r,
//   loss = Σ r² / (rows cols) [mean] | Σ r² [sum] | r² elementwise [none].
// Limits: reads s and t once (zero_mean: twice per row, the second time from L1/L2) and writes dy
// once, in float32 whatever the logits' dtype (backward then rounds once, as PyTorch does; 2 bytes
// per element more than a bf16 dy). The scalar loss is reduced deterministically in two stages
// (fixed per-block partials, then one block), never with atomics. Student and teacher dtypes are
// independent (a bf16 student with an fp16 teacher reads each in its own dtype). No torch headers.
#include "common.cuh"

namespace mimic_fast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 1024;

// zero_mean = false: the loss is elementwise, so the rows do not matter and the whole (rows, cols)
// array is one flat vector (aligned 16-byte accesses even when cols = 183).
template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads)
    mse_flat_kernel(const TS* __restrict__ s, const TT* __restrict__ t, int64_t n, float dscale,
                    bool vec, float* __restrict__ dy, TS* __restrict__ loss_elem,
                    float* __restrict__ partials) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = vec ? n / kVec : 0;
  float acc = 0.f;
  for (int64_t v = tid; v < nvec; v += stride) {
    const int64_t i = v * kVec;
    float a[kVec], b[kVec], d[kVec];
    load8(s + i, a);
    load8(t + i, b);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float r = a[e] - b[e];
      d[e] = dscale * r;
      b[e] = r * r;
      acc += b[e];
    }
    store8(dy + i, d);
    if (loss_elem != nullptr) store8(loss_elem + i, b);
  }
  for (int64_t i = nvec * kVec + tid; i < n; i += stride) {  // the ragged tail, or everything
    const float r = to_f32<TS>(s[i]) - to_f32<TT>(t[i]);
    dy[i] = dscale * r;
    if (loss_elem != nullptr) loss_elem[i] = from_f32<TS>(r * r);
    acc += r * r;
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0 && partials != nullptr) partials[blockIdx.x] = total;
}

// zero_mean = true: one warp per row; pass 1 sums s - t over the row, pass 2 re-reads the row
// (now in cache) to write r and dy.
template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads)
    mse_rows_kernel(const TS* __restrict__ s, const TT* __restrict__ t, int64_t rows, int64_t cols,
                    float dscale, bool vec, float* __restrict__ dy, TS* __restrict__ loss_elem,
                    float* __restrict__ partials) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const float inv_cols = __fdiv_rn(1.f, static_cast<float>(cols));
  float acc = 0.f;
  for (int64_t row = warp; row < rows; row += nwarps) {
    const TS* sr = s + row * cols;
    const TT* tr = t + row * cols;
    float* dr = dy + row * cols;
    TS* lr = loss_elem != nullptr ? loss_elem + row * cols : nullptr;
    float sd = 0.f;
    if (vec) {
      for (int64_t c = lane * kVec; c < cols; c += 32 * kVec) {
        float a[kVec], b[kVec];
        load8(sr + c, a);
        load8(tr + c, b);
#pragma unroll
        for (int e = 0; e < kVec; ++e) sd += a[e] - b[e];
      }
    } else {
      for (int64_t c = lane; c < cols; c += 32) sd += to_f32<TS>(sr[c]) - to_f32<TT>(tr[c]);
    }
    const float mean = warp_sum(sd) * inv_cols;
    if (vec) {
      for (int64_t c = lane * kVec; c < cols; c += 32 * kVec) {
        float a[kVec], b[kVec], d[kVec];
        load8(sr + c, a);
        load8(tr + c, b);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float r = (a[e] - b[e]) - mean;
          d[e] = dscale * r;
          b[e] = r * r;
          acc += b[e];
        }
        store8(dr + c, d);
        if (lr != nullptr) store8(lr + c, b);
      }
    } else {
      for (int64_t c = lane; c < cols; c += 32) {
        const float r = (to_f32<TS>(sr[c]) - to_f32<TT>(tr[c])) - mean;
        dr[c] = dscale * r;
        if (lr != nullptr) lr[c] = from_f32<TS>(r * r);
        acc += r * r;
      }
    }
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0 && partials != nullptr) partials[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kReduceThreads)
    sum_partials_kernel(const float* __restrict__ partials, int64_t n, double scale,
                        float* __restrict__ out) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  const float total = block_sum(acc);
  if (threadIdx.x == 0) out[0] = static_cast<float>(static_cast<double>(total) * scale);
}

template <typename TS, typename TT>
void launch_mse(const void* s, const void* t, int64_t rows, int64_t cols, bool zero_mean, float dscale,
                void* dy, void* loss_elem, float* partials, int64_t blocks, cudaStream_t stream) {
  const TS* ps = static_cast<const TS*>(s);
  const TT* pt = static_cast<const TT*>(t);
  float* pd = static_cast<float*>(dy);
  TS* pl = static_cast<TS*>(loss_elem);
  const bool aligned = aligned16(s) && aligned16(t) && aligned16(dy) &&
                       (loss_elem == nullptr || aligned16(loss_elem));
  if (zero_mean) {
    const bool vec = aligned && cols % kVec == 0;
    mse_rows_kernel<TS, TT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        ps, pt, rows, cols, dscale, vec, pd, pl, partials);
  } else {
    mse_flat_kernel<TS, TT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        ps, pt, rows * cols, dscale, aligned, pd, pl, partials);
  }
}

}  // namespace

cudaError_t sum_partials(const float* partials, int64_t n, double scale, float* out, cudaStream_t stream) {
  sum_partials_kernel<<<1, kReduceThreads, 0, stream>>>(partials, n, scale, out);
  return cudaGetLastError();
}

cudaError_t logit_mse(DType s_dt, const void* s, DType t_dt, const void* t, int64_t rows, int64_t cols,
                      int reduction, bool zero_mean, void* dy, void* loss_elem, float* partials,
                      float* loss_out, int num_sms, cudaStream_t stream) {
  const int64_t n = rows * cols;
  const bool reduce = reduction != kNone;
  // F.mse_loss's mean of an empty input is NaN: 0 partials times 1/0.
  const double scale = reduction == kMean ? 1.0 / static_cast<double>(n) : 1.0;
  const float dscale = static_cast<float>(2.0 * scale);
  int64_t blocks = 0;
  if (n > 0) {
    const int64_t per_block = zero_mean ? kThreads / 32 : static_cast<int64_t>(kThreads) * kVec;
    blocks = ceil_div(zero_mean ? rows : n, per_block);
    const int64_t cap = loss_max_blocks(num_sms);
    blocks = blocks < cap ? blocks : cap;
    void* elem = reduce ? nullptr : loss_elem;
    float* part = reduce ? partials : nullptr;
    dispatch_dtype(s_dt, [&](auto s_tag) {
      using TS = decltype(s_tag);
      dispatch_dtype(t_dt, [&](auto t_tag) {
        using TT = decltype(t_tag);
        launch_mse<TS, TT>(s, t, rows, cols, zero_mean, dscale, dy, elem, part, blocks, stream);
      });
    });
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (!reduce) return cudaSuccess;
  return sum_partials(partials, blocks, scale, loss_out, stream);
}

}  // namespace mimic_fast_cuda
