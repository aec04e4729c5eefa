// CPU ops of mimic_fast: the bottleneck MLP  y = act((x Uᵀ) Vᵀ + b1) Wᵀ + b2  and the fused mimic
// loss, streamed over the hidden width H in chunks so that no (B, H) tensor is ever allocated.
//
// Design limits: the GEMMs are ATen's or (native bf16/fp16) MKL's and only the elementwise epilogues
// are ours; the hidden layer is recomputed in backward (z = x Uᵀ is saved), which costs one extra
// (B,k)x(k,H) GEMM, ~19% of the step's FLOPs at the paper's sizes.
//
// The plan is the caller's (mimic_fast/ops/cpu.py): every op takes the chunk width (columns of H per
// chunk), the loop order and, for bfloat16 / float16, the compute path:
//  - native: the GEMM operands (x, U, V, W, z, the hidden tile h, dy, da) stay in the input dtype and
//    every GEMM reads them in it and writes float32 (MKL: AMX / AVX512-BF16 where the CPU has them);
//    the bias/activation epilogue computes in float32 on the cache-resident tile and writes the
//    low-precision operand of the next GEMM; the sums across chunks (y, dz) and rows (db1, db2) and
//    the loss stay float32. Weights already stored in the input dtype are read as they are.
//  - float32: the operands are upcast chunk by chunk and everything is computed in float32 (for CPUs
//    without a native low-precision matmul, where bf16/fp16 GEMMs are emulated or widened).
// float32 and float64 are computed natively. Outputs are in the input dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <tuple>
#include <vector>

// MKL's mixed-precision CBLAS GEMMs (LP64: MKL_INT is int; CBLAS_LAYOUT / CBLAS_TRANSPOSE are
// int-sized enums), exported by torch's MKL-linked CPU builds; weak, so that the extension loads
// where torch has no MKL (then native_gemm_for() is false and the native path is refused).
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const void* a, int lda, const void* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const void* a, int lda, const void* b, int ldb, float beta, float* c,
                          int ldc) __attribute__((weak));
}

namespace mimic_fast_cpu {
namespace {

using at::Tensor;

// Codes of mimic_fast/activations.py ACTIVATION_CODES; reductions of the Python wrapper; loop orders
// of mimic_fast/ops/cpu.py LOOP_CODES.
enum Activation : int64_t { kRelu = 0, kSigmoid = 1, kTanh = 2, kGelu = 3 };
enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };
enum LoopCode : int64_t { kLoopAuto = 0, kLoopGemm = 1, kLoopChunks = 2 };

// Elements per at::parallel_for task: below this, thread wake-up costs more than the work.
constexpr int64_t kGrainElems = 16384;
// Cap on the per-group partials (G x B x k for dz): they are workspace like the tiles.
constexpr int64_t kPartialBytes = 4 << 20;

bool is_low(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

bool native_gemm_for(at::ScalarType t) {
  if (t == at::kBFloat16) return cblas_gemm_bf16bf16f32 != nullptr;
  if (t == at::kHalf) return cblas_gemm_f16f16f32 != nullptr;
  return false;
}

// Dtypes of one call: `op` of the GEMM operands and tiles, `acc` of the sums across chunks.
struct Dtypes {
  at::ScalarType op, acc;
};

Dtypes dtypes_of(at::ScalarType t, bool native) {
  if (is_low(t)) return {native ? t : at::kFloat, at::kFloat};
  return {t, t};
}

void check_activation(int64_t activation) {
  TORCH_CHECK(activation >= kRelu && activation <= kGelu,
              "activation code must be 0 (relu), 1 (sigmoid), 2 (tanh) or 3 (gelu), got ", activation);
}

void check_plan_args(const char* op, int64_t chunk_h, int64_t loop, bool native, at::ScalarType t) {
  TORCH_CHECK(chunk_h >= 1, op, ": chunk_h must be a positive number of columns, got ", chunk_h);
  TORCH_CHECK(loop >= kLoopAuto && loop <= kLoopChunks, op,
              ": loop code must be 0 (auto), 1 (gemm) or 2 (chunks), got ", loop);
  TORCH_CHECK(!native || is_low(t), op, ": native=True is for bfloat16 / float16 inputs, got ", t);
  TORCH_CHECK(!native || native_gemm_for(t), op, ": native=True needs MKL's ", t,
              " -> float32 GEMM, which this torch build does not have");
}

void check_cpu(const char* op, const char* name, const Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", dtype, ": expected ", dtype);
}

// Shapes and devices of (x, U, V, b1, W, b2); the Python layer validates first with better messages,
// these guard direct calls of torch.ops.mimic_fast.*.
void check_mlp(const char* op, const Tensor& x, const Tensor& U, const Tensor& V,
               const c10::optional<Tensor>& b1, const Tensor& W, const c10::optional<Tensor>& b2) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got device ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x has dtype ", dt, "; expected float32, float64, bfloat16 or float16");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && W.dim() == 2, op, ": U, V, W must be 2-D, got shapes ",
              U.sizes(), ", ", V.sizes(), ", ", W.sizes());
  check_cpu(op, "U", U, dt);
  check_cpu(op, "V", V, dt);
  check_cpu(op, "W", W, dt);
  const int64_t D = x.size(1), k = U.size(0), H = V.size(0), C = W.size(0);
  TORCH_CHECK(U.size(1) == D, op, ": U has shape ", U.sizes(), " but x has D=", D, ": expected (", k,
              ", ", D, ")");
  TORCH_CHECK(V.size(1) == k, op, ": V has shape ", V.sizes(), " but U implies k=", k, ": expected (",
              H, ", ", k, ")");
  TORCH_CHECK(W.size(1) == H, op, ": W has shape ", W.sizes(), " but V implies H=", H, ": expected (",
              C, ", ", H, ")");
  if (b1.has_value()) {
    check_cpu(op, "b1", *b1, dt);
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == H, op, ": b1 has shape ", b1->sizes(),
                " but V implies H=", H);
  }
  if (b2.has_value()) {
    check_cpu(op, "b2", *b2, dt);
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == C, op, ": b2 has shape ", b2->sizes(),
                " but W implies C=", C);
  }
}

// A contiguous (rows, cols) view on the front of a flat workspace, so the last (narrower) chunk is
// still a dense matrix for the GEMMs and the epilogue pointers.
Tensor tile(const Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// ---- fused epilogues (elementwise over one (B, n) tile; all tiles are contiguous) ---------------
// at::parallel_for runs on torch's intra-op pool: OpenMP in torch's CPU builds (see
// torch.__config__.parallel_info()), so it shares threads with the BLAS calls around it. It is a
// header template, parallel only when this file is compiled with -fopenmp (setup.py;
// parallel_threads() below tells). Inside the `chunks` loop order it runs inline on the calling
// thread.

template <typename T>
void add_bias(T* a, const T* bias, int64_t B, int64_t n) {
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = a + r * n;
      for (int64_t c = 0; c < n; ++c) row[c] += bias[c];
    }
  });
}

// Forward, a tile in its compute dtype T (float / double): a <- act(a + b1).
template <typename T>
void epilogue_fwd(Tensor& a, const T* pb, int64_t activation) {
  const int64_t B = a.size(0), n = a.size(1);
  T* pa = a.data_ptr<T>();
  if (activation == kRelu) {
    at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* row = pa + r * n;
        if (pb) {
          for (int64_t c = 0; c < n; ++c) {
            const T v = row[c] + pb[c];
            row[c] = v < T(0) ? T(0) : v;  // NaN passes through, as torch.relu
          }
        } else {
          for (int64_t c = 0; c < n; ++c) row[c] = row[c] < T(0) ? T(0) : row[c];
        }
      }
    });
    return;
  }
  // Transcendental activations go through ATen's in-place kernels on the cache-resident tile: they
  // are SIMD (Sleef) and dispatched by CPU capability at run time, which a -O3 loop over std::erf
  // here is not, and the extra pass over an L2-resident tile is cheap.
  if (pb) add_bias<T>(pa, pb, B, n);
  if (activation == kSigmoid) at::sigmoid_(a);
  else if (activation == kTanh) at::tanh_(a);
  else at::gelu_(a, "none");
}

// Backward, tiles in their compute dtype T: with a = z Vⱼᵀ (pre-bias) and d = dy Wⱼ = dh on entry,
// leave h = act(a + b1) in a, da = dh ⊙ act'(a + b1) in d, and (if db1) db1 = Σ_rows da. Split over
// columns so every column's sum runs over the rows in order: db1 is bitwise the same for any
// thread count.
template <typename T>
void epilogue_bwd(Tensor& a, Tensor& d, const T* pb, at::opmath_type<T>* db1, int64_t activation) {
  using acc_t = at::opmath_type<T>;
  const int64_t B = a.size(0), n = a.size(1);
  T* pa = a.data_ptr<T>();
  T* pd = d.data_ptr<T>();
  const int64_t col_grain = std::max<int64_t>(16, kGrainElems / std::max<int64_t>(B, 1));

  if (activation == kGelu) {
    if (pb) add_bias<T>(pa, pb, B, n);
    at::gelu_backward_outf(d, a, "none", d);  // da, elementwise so in place is safe
    at::gelu_(a, "none");
  } else if (activation != kRelu) {
    if (pb) add_bias<T>(pa, pb, B, n);
    if (activation == kSigmoid) at::sigmoid_(a);
    else at::tanh_(a);
  }

  at::parallel_for(0, n, col_grain, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<acc_t> sums(db1 ? w : 0, acc_t(0));
    for (int64_t r = 0; r < B; ++r) {
      T* ar = pa + r * n + c0;
      T* dr = pd + r * n + c0;
      if (activation == kRelu) {
        const T* br = pb ? pb + c0 : nullptr;
        for (int64_t c = 0; c < w; ++c) {
          const T v = br ? ar[c] + br[c] : ar[c];
          const bool on = v > T(0);
          ar[c] = v < T(0) ? T(0) : v;
          dr[c] = on ? dr[c] : T(0);
        }
      } else if (activation == kSigmoid) {
        for (int64_t c = 0; c < w; ++c) dr[c] = dr[c] * (ar[c] * (T(1) - ar[c]));
      } else if (activation == kTanh) {
        for (int64_t c = 0; c < w; ++c) dr[c] = dr[c] * (T(1) - ar[c] * ar[c]);
      }
      if (db1) {
        for (int64_t c = 0; c < w; ++c) sums[c] += static_cast<acc_t>(dr[c]);
      }
    }
    if (db1) {
      for (int64_t c = 0; c < w; ++c) db1[c0 + c] = sums[c];
    }
  });
}

// ---- the streamed passes -------------------------------------------------------------------------

// Two loop orders over the chunks (the caller's plan picks one; auto: the rule in make_plan):
//  gemm:   chunks in sequence, each GEMM and epilogue spread over all threads (a barrier per GEMM);
//  chunks: threads take groups of chunks dynamically (an atomic counter, so a thread that the OS
//          preempts on a shared machine holds up the others by one group at most) and run them with
//          single-threaded GEMMs (BLAS runs serially inside an OpenMP parallel region): one
//          parallel region per op instead of one per GEMM, which is what scales to many cores.
//          Chunks are taken in groups (at most 8 per thread, and kPartialBytes of partials); each
//          group has its own y / dz partial, summed in group order at the end: bitwise
//          deterministic for a given thread count, whatever the scheduling.
enum class Loop { kGemm, kChunks };

struct Plan {
  Loop loop;
  int64_t chunk, nchunks, groups, slots;
};

Plan make_plan(int64_t B, int64_t H, int64_t chunk_h, int64_t loop, int64_t partial_cols,
               int64_t acc_bytes) {
  Plan p;
  const int64_t T = at::get_num_threads();
  p.chunk = std::max<int64_t>(1, std::min(chunk_h, H));
  p.nchunks = (H + p.chunk - 1) / p.chunk;
  if (loop == kLoopAuto) {
    // Chunks order when there are enough chunks for every thread to take a few.
    p.loop = (T > 1 && p.nchunks >= 2 * T) ? Loop::kChunks : Loop::kGemm;
  } else {
    p.loop = loop == kLoopGemm ? Loop::kGemm : Loop::kChunks;
  }
  const int64_t by_memory =
      kPartialBytes / std::max<int64_t>(1, B * partial_cols * acc_bytes);
  p.groups = p.loop == Loop::kGemm
                 ? 1
                 : std::min({p.nchunks, 8 * T, std::max<int64_t>(T, by_memory)});
  // Workspace slots: one per thread that can run a group.
  p.slots = p.loop == Loop::kGemm ? 1 : std::min<int64_t>(p.groups, T);
  return p;
}

// body(h0, n, slot, group, first) for every chunk [h0, h0 + n): slot picks the running thread's
// workspace, group the partial sum the chunk accumulates into; the group's first chunk writes its
// partial (a GEMM with beta = 0) instead of adding to it, so the partials need no zeroing pass.
template <typename F>
void for_each_chunk(const Plan& p, int64_t H, const F& body) {
  auto run_group = [&](int64_t g, int64_t slot) {
    const int64_t c0 = g * p.nchunks / p.groups, c1 = (g + 1) * p.nchunks / p.groups;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t h0 = c * p.chunk;
      body(h0, std::min(p.chunk, H - h0), slot, g, c == c0);
    }
  };
  if (p.loop == Loop::kGemm) {
    run_group(0, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, p.slots, 1, [&](int64_t s0, int64_t s1) {
    // Pool threads do not inherit the caller's thread-local state: keep autograd out of the GEMMs
    // (they write into out= views, which autograd refuses when a weight requires grad).
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t slot = s0; slot < s1; ++slot) {
      for (int64_t g = next.fetch_add(1); g < p.groups; g = next.fetch_add(1)) run_group(g, slot);
    }
  });
}

// The per-group partial sums (G, ...): each group's first chunk writes its own, so they start
// uninitialised, except when there are no chunks at all (H = 0, direct op calls only).
Tensor group_partials(const Plan& p, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return p.nchunks > 0 ? at::empty(sizes, opts) : at::zeros(sizes, opts);
}

// Sum of the per-group partials in group order, in one parallel region (under co-tenant load each
// region costs a scheduler wake-up of every thread: one add_ per group cost more than the sums).
Tensor sum_groups(const Tensor& parts) {
  const int64_t G = parts.size(0), numel = parts[0].numel();
  Tensor out = at::empty(parts[0].sizes(), parts.options());
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "mimic_fast_cpu_sum_groups", [&] {
    const scalar_t* src = parts.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrainElems, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = src[i];
      for (int64_t g = 1; g < G; ++g) {
        const scalar_t* pg = src + g * numel;
        for (int64_t i = i0; i < i1; ++i) dst[i] += pg[i];
      }
    });
  });
  return out;
}

c10::optional<Tensor> bias_chunk(const c10::optional<Tensor>& b1, int64_t h0, int64_t n,
                                 at::ScalarType op) {
  if (!b1.has_value()) return c10::nullopt;
  return b1->narrow(0, h0, n).to(op).contiguous();
}

// ---- float32 / float64 (and the float32 path of bf16 / fp16: operands upcast per chunk) ----------

// y (without b2) and z = x Uᵀ, both in the compute dtype cd.
std::tuple<Tensor, Tensor> forward_wide(const Tensor& x, const Tensor& U, const Tensor& V,
                                        const c10::optional<Tensor>& b1, const Tensor& W,
                                        int64_t activation, int64_t chunk_h, int64_t loop) {
  const auto cd = dtypes_of(x.scalar_type(), false).op;
  const auto opts = x.options().dtype(cd);
  const int64_t B = x.size(0), H = V.size(0), C = W.size(0);
  Tensor z = at::mm(x.to(cd), U.to(cd).t());
  const Plan p = make_plan(B, H, chunk_h, loop, C, c10::elementSize(cd));
  // yᵀ (C, B) per group: Wⱼ hᵀ runs at 72 GFLOP/s here, h Wⱼᵀ at 62 (N = C = 183 wastes the
  // SGEMM kernel's column blocks; 1 thread, B=256, 256 columns).
  Tensor y_parts = group_partials(p, {p.groups, C, B}, opts);
  Tensor work = at::empty({p.slots, B * p.chunk}, opts);
  for_each_chunk(p, H, [&](int64_t h0, int64_t n, int64_t slot, int64_t group, bool first) {
    Tensor a = tile(work[slot], B, n);
    at::mm_out(a, z, V.narrow(0, h0, n).to(cd).t());
    const auto b1j = bias_chunk(b1, h0, n, cd);
    AT_DISPATCH_FLOATING_TYPES(cd, "mimic_fast_cpu_epilogue_fwd", [&] {
      epilogue_fwd<scalar_t>(a, b1j ? b1j->data_ptr<scalar_t>() : nullptr, activation);
    });
    Tensor yg = y_parts[group];
    const Tensor Wj = W.narrow(1, h0, n).to(cd);
    if (first) at::mm_out(yg, Wj, a.t());
    else yg.addmm_(Wj, a.t());
  });
  const Tensor yt = p.groups == 1 ? y_parts[0] : sum_groups(y_parts);
  return {yt.t().contiguous(), z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_wide(
    const Tensor& dy, const Tensor& x, const Tensor& z, const Tensor& U, const Tensor& V,
    const c10::optional<Tensor>& b1, const Tensor& W, int64_t activation, bool has_b2,
    bool need_dx, int64_t chunk_h, int64_t loop) {
  const auto t = x.scalar_type();
  const auto cd = dtypes_of(t, false).op;
  const int64_t B = x.size(0), k = U.size(0), H = V.size(0), C = W.size(0);
  const auto opts = x.options().dtype(cd);
  const bool native = cd == t;  // write gradients straight into the outputs
  const Tensor dyc = dy.to(cd).contiguous();
  const Tensor zc = z.contiguous();
  Tensor dV = at::empty({H, k}, x.options());
  Tensor dW = at::empty({C, H}, x.options());
  Tensor db1 = at::empty({b1.has_value() ? H : 0}, x.options());
  Tensor db1_cd = native ? db1 : at::empty({db1.numel()}, opts);  // H floats: negligible

  const Plan p = make_plan(B, H, chunk_h, loop, k, c10::elementSize(cd));
  // dzᵀ (k, B) per group, as yᵀ in forward: Vⱼᵀ daᵀ runs at 76 GFLOP/s here, da Vⱼ at 71; dU = dzᵀ x
  // reads it as it is.
  Tensor dz_parts = group_partials(p, {p.groups, k, B}, opts);
  Tensor work_a = at::empty({p.slots, B * p.chunk}, opts);
  Tensor work_d = at::empty({p.slots, B * p.chunk}, opts);
  for_each_chunk(p, H, [&](int64_t h0, int64_t n, int64_t slot, int64_t group, bool first) {
    Tensor a = tile(work_a[slot], B, n);
    Tensor d = tile(work_d[slot], B, n);
    const Tensor Vj = V.narrow(0, h0, n).to(cd);
    at::mm_out(a, zc, Vj.t());
    at::mm_out(d, dyc, W.narrow(1, h0, n).to(cd));
    const auto b1j = bias_chunk(b1, h0, n, cd);
    AT_DISPATCH_FLOATING_TYPES(cd, "mimic_fast_cpu_epilogue_bwd", [&] {
      scalar_t* pdb1 = b1.has_value() ? db1_cd.data_ptr<scalar_t>() + h0 : nullptr;
      epilogue_bwd<scalar_t>(a, d, b1j ? b1j->data_ptr<scalar_t>() : nullptr, pdb1, activation);
    });
    Tensor dWj = dW.narrow(1, h0, n);
    Tensor dVj = dV.narrow(0, h0, n);
    if (native) {
      at::mm_out(dWj, dyc.t(), a);
      at::mm_out(dVj, d.t(), zc);
    } else {
      dWj.copy_(at::mm(dyc.t(), a));
      dVj.copy_(at::mm(d.t(), zc));
    }
    Tensor dzg = dz_parts[group];
    if (first) at::mm_out(dzg, Vj.t(), d.t());
    else dzg.addmm_(Vj.t(), d.t());
  });
  const Tensor dzt = p.groups == 1 ? dz_parts[0] : sum_groups(dz_parts);
  if (!native && b1.has_value()) db1.copy_(db1_cd);
  Tensor dU = at::mm(dzt, x.to(cd)).to(t);
  Tensor dx = need_dx ? at::mm(dzt.t(), U.to(cd)).to(t) : at::empty({0}, x.options());
  Tensor db2 = has_b2 ? dyc.sum(0).to(t) : at::empty({0}, x.options());
  return {dx, dU, dV, db1, dW, db2};
}

// ---- bf16 / fp16 natively ----------------------------------------------------------------------
// Every GEMM takes its operands in L = BFloat16 / Half and writes, or accumulates into, float32:
// MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (AMX / AVX512-BF16 where the CPU has them;
// elsewhere MKL widens to SGEMM). ATen's bf16/fp16 GEMMs would round each product to L (ATen's mm
// has no float32-out variant on CPU in torch 2.13), and a sum over chunks of rounded partials loses
// the cancelling parts (dz at k = 1: 15x eager's error). Float32 out means no rounding between a GEMM
// and its epilogue, and the sums over chunks (y, dz) and rows (db1, db2) stay float32: each output
// is rounded once. The GEMMs are bound weakly (top of the file): where torch has no MKL,
// native_gemms() says so and ops/cpu.py keeps such CPUs on the float32 path.
// (data, transpose flag, leading dimension) of a 2-D view for a row-major CBLAS call.
struct Operand {
  const void* data;
  int trans, ld;
};

Operand operand(const Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, cols)) {
    return {t.data_ptr(), kNoTrans, static_cast<int>(t.stride(0))};
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, rows)) {
    return {t.data_ptr(), kTrans, static_cast<int>(t.stride(1))};
  }
  TORCH_INTERNAL_ASSERT(false, "mimic_fast cpu: GEMM operand with strides ", t.strides());
  return {};
}

// c (float32, row-major) = a @ b, or c += a @ b; a, b in bf16 / fp16, any row- or column-major view.
void mm_f32(const Tensor& a, const Tensor& b, Tensor& c, bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_INTERNAL_ASSERT(c.scalar_type() == at::kFloat && c.stride(1) == 1 && c.size(0) == M &&
                        c.size(1) == N && b.size(0) == K);
  TORCH_CHECK(M < INT32_MAX && N < INT32_MAX && K < INT32_MAX,
              "mimic_fast cpu: GEMM sizes must fit in 32 bits, got ", M, " x ", K, " x ", N);
  const Operand A = operand(a), Bm = operand(b);
  const float beta = accumulate ? 1.f : 0.f;
  auto* gemm = a.scalar_type() == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  gemm(kRowMajor, A.trans, Bm.trans, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
       1.f, A.data, A.ld, Bm.data, Bm.ld, beta, c.data_ptr<float>(), static_cast<int>(c.stride(0)));
}

// A copy of t with a GEMM-compatible layout when its strides are neither row- nor column-major.
Tensor gemm_ready(const Tensor& t) {
  const bool row = t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1));
  const bool col = t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0));
  return row || col ? t : t.contiguous();
}

// The epilogues are the float32 ones above, run on the GEMMs' float32 tiles, then ATen's copy_ writes
// the low-precision operands of the next GEMMs (its conversion kernels are SIMD, dispatched by CPU
// capability at run time; this extension is compiled for baseline x86-64: a scalar bf16 epilogue
// here cost 10% of the step). db1 sums the float32 da.
// y (B, C) without b2 in float32 and z (B, k) in L.
std::tuple<Tensor, Tensor> forward_low(const Tensor& x, const Tensor& U, const Tensor& V,
                                       const c10::optional<Tensor>& b1, const Tensor& W,
                                       int64_t activation, int64_t chunk_h, int64_t loop) {
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t B = x.size(0), k = U.size(0), H = V.size(0), C = W.size(0);
  Tensor z32 = at::empty({B, k}, f32);
  mm_f32(gemm_ready(x), gemm_ready(U).t(), z32, false);
  Tensor z = z32.to(x.scalar_type());
  const Tensor Vg = gemm_ready(V), Wg = gemm_ready(W);
  const Plan p = make_plan(B, H, chunk_h, loop, C, sizeof(float));
  Tensor y_parts = group_partials(p, {p.groups, B, C}, f32);
  Tensor work_a = at::empty({p.slots, B * p.chunk}, f32);
  Tensor work_h = at::empty({p.slots, B * p.chunk}, x.options());
  for_each_chunk(p, H, [&](int64_t h0, int64_t n, int64_t slot, int64_t group, bool first) {
    Tensor a = tile(work_a[slot], B, n);
    Tensor h = tile(work_h[slot], B, n);
    mm_f32(z, Vg.narrow(0, h0, n).t(), a, false);
    const auto b1j = bias_chunk(b1, h0, n, at::kFloat);
    epilogue_fwd<float>(a, b1j ? b1j->data_ptr<float>() : nullptr, activation);
    h.copy_(a);
    Tensor yg = y_parts[group];
    mm_f32(h, Wg.narrow(1, h0, n).t(), yg, !first);
  });
  return {p.groups == 1 ? y_parts[0] : sum_groups(y_parts), z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_low(
    const Tensor& dy, const Tensor& x, const Tensor& z, const Tensor& U, const Tensor& V,
    const c10::optional<Tensor>& b1, const Tensor& W, int64_t activation, bool has_b2,
    bool need_dx, int64_t chunk_h, int64_t loop) {
  const auto t = x.scalar_type();
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t B = x.size(0), D = x.size(1), k = U.size(0), H = V.size(0), C = W.size(0);
  const Tensor dy32 = dy.to(at::kFloat).contiguous();
  const Tensor dyL = dy32.to(t);
  const Tensor zg = gemm_ready(z), Vg = gemm_ready(V), Wg = gemm_ready(W);
  Tensor dV = at::empty({H, k}, x.options());
  Tensor dW = at::empty({C, H}, x.options());
  Tensor db1 = at::empty({b1.has_value() ? H : 0}, x.options());
  Tensor db1_32 = at::empty({db1.numel()}, f32);

  const Plan p = make_plan(B, H, chunk_h, loop, k, sizeof(float));
  Tensor dz_parts = group_partials(p, {p.groups, B, k}, f32);
  Tensor work_a = at::empty({p.slots, B * p.chunk}, f32);   // a, then h
  Tensor work_dh = at::empty({p.slots, B * p.chunk}, f32);  // dh, then da
  Tensor work_h = at::empty({p.slots, B * p.chunk}, x.options());
  Tensor work_da = at::empty({p.slots, B * p.chunk}, x.options());
  Tensor work_dw = at::empty({p.slots, std::max(C, k) * p.chunk}, f32);       // dWⱼ, then dVⱼ
  for_each_chunk(p, H, [&](int64_t h0, int64_t n, int64_t slot, int64_t group, bool first) {
    Tensor a = tile(work_a[slot], B, n);
    Tensor dh = tile(work_dh[slot], B, n);
    Tensor h = tile(work_h[slot], B, n);
    Tensor da = tile(work_da[slot], B, n);
    const Tensor Vj = Vg.narrow(0, h0, n);
    const Tensor Wj = Wg.narrow(1, h0, n);
    mm_f32(zg, Vj.t(), a, false);
    mm_f32(dyL, Wj, dh, false);
    const auto b1j = bias_chunk(b1, h0, n, at::kFloat);
    epilogue_bwd<float>(a, dh, b1j ? b1j->data_ptr<float>() : nullptr,
                        b1.has_value() ? db1_32.data_ptr<float>() + h0 : nullptr, activation);
    h.copy_(a);
    da.copy_(dh);
    Tensor dWj = tile(work_dw[slot], C, n);
    mm_f32(dyL.t(), h, dWj, false);
    dW.narrow(1, h0, n).copy_(dWj);
    Tensor dVj = tile(work_dw[slot], n, k);
    mm_f32(da.t(), zg, dVj, false);
    dV.narrow(0, h0, n).copy_(dVj);
    Tensor dzg = dz_parts[group];
    mm_f32(da, Vj, dzg, !first);
  });
  Tensor dz = p.groups == 1 ? dz_parts[0] : sum_groups(dz_parts);
  if (b1.has_value()) db1.copy_(db1_32);
  const Tensor dzL = dz.to(t);
  Tensor dU32 = at::empty({k, D}, f32);
  mm_f32(dzL.t(), gemm_ready(x), dU32, false);
  Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    Tensor dx32 = at::empty({B, D}, f32);
    mm_f32(dzL, gemm_ready(U), dx32, false);
    dx = dx32.to(t);
  }
  Tensor db2 = has_b2 ? dy32.sum(0).to(t) : at::empty({0}, x.options());
  return {dx, dU32.to(t), dV, db1, dW, db2};
}

// y (without b2) in the accumulation dtype and z in the GEMMs' operand dtype, on either path.
std::tuple<Tensor, Tensor> forward_acc(const Tensor& x, const Tensor& U, const Tensor& V,
                                       const c10::optional<Tensor>& b1, const Tensor& W,
                                       int64_t activation, int64_t chunk_h, int64_t loop,
                                       bool native) {
  if (!native) return forward_wide(x, U, V, b1, W, activation, chunk_h, loop);
  return forward_low(x, U, V, b1, W, activation, chunk_h, loop);
}

std::tuple<Tensor, Tensor> mlp_fwd(const Tensor& x, const Tensor& U, const Tensor& V,
                                   const c10::optional<Tensor>& b1, const Tensor& W,
                                   const c10::optional<Tensor>& b2, int64_t activation,
                                   int64_t chunk_h, int64_t loop, bool native) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_mlp("cpu_mlp_fwd", x, U, V, b1, W, b2);
  check_activation(activation);
  check_plan_args("cpu_mlp_fwd", chunk_h, loop, native, x.scalar_type());
  auto [y, z] = forward_acc(x, U, V, b1, W, activation, chunk_h, loop, native);
  if (b2.has_value()) y.add_(*b2);  // b2 in the input dtype, added in the accumulation dtype
  return {y.to(x.scalar_type()), z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& z, const Tensor& U, const Tensor& V,
    const c10::optional<Tensor>& b1, const Tensor& W, int64_t activation, bool has_b2,
    bool need_dx, int64_t chunk_h, int64_t loop, bool native) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const char* op = "cpu_mlp_bwd";
  check_mlp(op, x, U, V, b1, W, c10::nullopt);
  check_activation(activation);
  const auto t = x.scalar_type();
  check_plan_args(op, chunk_h, loop, native, t);
  const auto zt = dtypes_of(t, native).op;
  const int64_t B = x.size(0), k = U.size(0), C = W.size(0);
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == zt, op, ": z must be a CPU ", zt,
              " tensor (what cpu_mlp_fwd saved with the same native=", native, "), got ",
              z.scalar_type(), " on ", z.device());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == B && z.size(1) == k, op, ": z has shape ", z.sizes(),
              ": expected (", B, ", ", k, ")");
  TORCH_CHECK(dy.device().is_cpu() && dy.is_floating_point(), op,
              ": dy must be a floating-point CPU tensor, got ", dy.scalar_type(), " on ", dy.device());
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == B && dy.size(1) == C, op, ": dy has shape ", dy.sizes(),
              ": expected (", B, ", ", C, ")");
  if (!native) {
    return backward_wide(dy, x, z, U, V, b1, W, activation, has_b2, need_dx, chunk_h, loop);
  }
  return backward_low(dy, x, z, U, V, b1, W, activation, has_b2, need_dx, chunk_h, loop);
}

// y (B, C) and the teacher t in the accumulation dtype A; b2 in the input dtype B2.
template <typename A, typename B2>
void loss_epilogue(const Tensor& y, const B2* pb, const Tensor& t, Tensor& dy_unit,
                   Tensor& row_sq, Tensor* sq, double scale) {
  const int64_t B = y.size(0), C = y.size(1);
  const A* py = y.data_ptr<A>();
  const A* pt = t.data_ptr<A>();
  A* pg = dy_unit.data_ptr<A>();
  double* prow = row_sq.data_ptr<double>();
  A* psq = sq ? sq->data_ptr<A>() : nullptr;
  const A s = static_cast<A>(scale);
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double acc = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = r * C + c;
        const A res = (pb ? py[i] + static_cast<A>(pb[c]) : py[i]) - pt[i];
        const A sqv = res * res;
        pg[i] = s * res;
        if (psq) psq[i] = sqv;
        acc += static_cast<double>(sqv);
      }
      prow[r] = acc;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> mimic_fwd(const Tensor& x, const Tensor& U, const Tensor& V,
                                             const c10::optional<Tensor>& b1, const Tensor& W,
                                             const c10::optional<Tensor>& b2, const Tensor& teacher,
                                             int64_t activation, int64_t reduction, int64_t chunk_h,
                                             int64_t loop, bool native) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const char* op = "cpu_mimic_fwd";
  check_mlp(op, x, U, V, b1, W, b2);
  check_activation(activation);
  check_plan_args(op, chunk_h, loop, native, x.scalar_type());
  TORCH_CHECK(reduction >= kMean && reduction <= kNone, op,
              ": reduction code must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
  const int64_t B = x.size(0), C = W.size(0);
  TORCH_CHECK(teacher.device().is_cpu() && teacher.is_floating_point(), op,
              ": teacher must be a floating-point CPU tensor, got ", teacher.scalar_type(), " on ",
              teacher.device());
  TORCH_CHECK(teacher.dim() == 2 && teacher.size(0) == B && teacher.size(1) == C, op,
              ": teacher has shape ", teacher.sizes(), ": expected (", B, ", ", C, ")");
  auto [y, z] = forward_acc(x, U, V, b1, W, activation, chunk_h, loop, native);
  const auto acc = y.scalar_type();
  const Tensor t = teacher.to(acc).contiguous();
  const Tensor b2c = b2.has_value() ? b2->contiguous() : Tensor();
  const double numel = static_cast<double>(B * C);
  const double scale = reduction == kMean ? 2.0 / std::max(numel, 1.0) : 2.0;
  Tensor dy_unit = at::empty({B, C}, y.options());
  Tensor row_sq = at::empty({B}, y.options().dtype(at::kDouble));
  Tensor sq = reduction == kNone ? at::empty({B, C}, y.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "mimic_fast_cpu_loss", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mimic_fast_cpu_loss_b2",
                                    [&] {
      loss_epilogue<A, scalar_t>(y, b2c.defined() ? b2c.data_ptr<scalar_t>() : nullptr, t, dy_unit,
                                 row_sq, reduction == kNone ? &sq : nullptr, scale);
    });
  });
  Tensor loss;
  if (reduction == kNone) {
    loss = sq.to(x.scalar_type());
  } else {
    // Rows summed in order, in float64: deterministic for any thread count.
    const double* prow = row_sq.data_ptr<double>();
    double total = 0;
    for (int64_t r = 0; r < B; ++r) total += prow[r];
    if (reduction == kMean) total /= numel;  // 0/0 = NaN for an empty batch, as torch's mean
    loss = at::scalar_tensor(total, x.options().dtype(at::kDouble)).to(x.scalar_type());
  }
  return {loss, z, dy_unit};
}

// How many threads one at::parallel_for of this extension runs on. It is a header template: built
// without the intra-op backend's flags (-fopenmp where torch's backend is OpenMP, see setup.py) it
// compiles serial, and every parallel region here runs on the calling thread.
int64_t parallel_threads() {
  std::atomic<int64_t> tasks{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { tasks.fetch_add(1); });
  return tasks.load();
}

// Whether the native path's GEMMs are linked here, for (bfloat16, float16).
std::vector<int64_t> native_gemms() {
  return {native_gemm_for(at::kBFloat16), native_gemm_for(at::kHalf)};
}

}  // namespace
}  // namespace mimic_fast_cpu

// This file owns the namespace's TORCH_LIBRARY block; other extensions add theirs with
// TORCH_LIBRARY_FRAGMENT(mimic_fast, m). chunk_h, loop and native are the caller's plan
// (mimic_fast/ops/cpu.py plan()). need_dx = false: dx is neither computed nor allocated and comes
// back empty (the schema cannot return None), as do the gradients of absent biases.
TORCH_LIBRARY(mimic_fast, m) {
  m.def("cpu_mlp_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, "
        "int activation, int chunk_h, int loop, bool native) -> (Tensor, Tensor)");
  m.def("cpu_mlp_bwd(Tensor dy, Tensor x, Tensor z, Tensor U, Tensor V, Tensor? b1, Tensor W, "
        "int activation, bool has_b2, bool need_dx, int chunk_h, int loop, bool native) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_mimic_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, "
        "Tensor teacher, int activation, int reduction, int chunk_h, int loop, bool native) -> "
        "(Tensor, Tensor, Tensor)");
  // No tensor arguments, so a catch-all kernel: whether MKL's bf16 / fp16 -> f32 GEMMs are linked.
  m.def("cpu_native_gemms() -> int[]", &mimic_fast_cpu::native_gemms);
  m.def("cpu_parallel_threads() -> int", &mimic_fast_cpu::parallel_threads);
}

TORCH_LIBRARY_IMPL(mimic_fast, CPU, m) {
  m.impl("cpu_mlp_fwd", &mimic_fast_cpu::mlp_fwd);
  m.impl("cpu_mlp_bwd", &mimic_fast_cpu::mlp_bwd);
  m.impl("cpu_mimic_fwd", &mimic_fast_cpu::mimic_fwd);
}
