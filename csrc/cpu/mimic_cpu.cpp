// CPU ops of mimic_fast: the bottleneck MLP  y = act((x Uᵀ) Vᵀ + b1) Wᵀ + b2  and the fused mimic
// loss, streamed over the hidden width H in chunks so that no (B, H) tensor is ever allocated.
//
// Design limits: the GEMMs are ATen's (MKL / oneDNN / OpenBLAS, whatever torch was built with) and
// only the elementwise epilogues are ours; the hidden layer is recomputed in backward (z = x Uᵀ is
// saved), which costs one extra (B,k)x(k,H) GEMM, ~19% of the step's FLOPs at the paper's sizes.
//
// Chunk size: each chunk keeps two (B, chunk) compute-dtype tiles live (pre-activation / hidden,
// and dh / da in backward) plus the V and W column blocks they touch (chunk x (k + C)). The tile is
// B * chunk * sizeof(float) ~= 1 MiB, half of a 2 MiB per-core L2 (current Xeon / EPYC): at B = 256
// that is 1024 columns, wide enough for the GEMMs to run near their peak (they lose efficiency
// below ~256 columns). Measured on a 2-core Xeon (benchmarks/tune_cpu.py): 512 and 1024 columns
// are equal at best, and 1024 was the steadier under co-tenant load. Clamped to [64, 4096] columns,
// a multiple of 64 (GEMM micro-kernel widths). MIMIC_FAST_CPU_CHUNK_H overrides it (read per call:
// for tuning and CPUs with very different caches).
//
// Dtypes: float32 and float64 are computed natively; bfloat16 / float16 are upcast to float32 chunk
// by chunk (float32 accumulation everywhere) and outputs are cast back to the input dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

namespace mimic_fast_cpu {
namespace {

using at::Tensor;

// Codes of mimic_fast/activations.py ACTIVATION_CODES; reductions of the Python wrapper.
enum Activation : int64_t { kRelu = 0, kSigmoid = 1, kTanh = 2, kGelu = 3 };
enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

constexpr int64_t kTileBytes = 1 << 20;
constexpr int64_t kMinChunk = 64;
constexpr int64_t kMaxChunk = 4096;
// Elements per at::parallel_for task: below this, thread wake-up costs more than the work.
constexpr int64_t kGrainElems = 16384;

int64_t chunk_h(int64_t B, int64_t H, int64_t tile_bytes) {
  int64_t chunk = 0;
  if (const char* env = std::getenv("MIMIC_FAST_CPU_CHUNK_H")) {
    chunk = std::atoll(env);
    TORCH_CHECK(chunk > 0, "MIMIC_FAST_CPU_CHUNK_H must be a positive integer, got '", env, "'");
  } else {
    chunk = tile_bytes / (std::max<int64_t>(B, 1) * static_cast<int64_t>(sizeof(float)));
    chunk = std::clamp<int64_t>(chunk / kMinChunk * kMinChunk, kMinChunk, kMaxChunk);
  }
  return std::max<int64_t>(1, std::min(chunk, H));
}

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

void check_activation(int64_t activation) {
  TORCH_CHECK(activation >= kRelu && activation <= kGelu,
              "activation code must be 0 (relu), 1 (sigmoid), 2 (tanh) or 3 (gelu), got ", activation);
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
// torch.__config__.parallel_info()), so it shares threads with the BLAS calls around it.

template <typename T>
void add_bias(T* a, const T* bias, int64_t B, int64_t n) {
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = a + r * n;
      for (int64_t c = 0; c < n; ++c) row[c] += bias[c];
    }
  });
}

// Forward: a <- act(a + b1).
template <typename T>
void epilogue_fwd(Tensor& a, const c10::optional<Tensor>& bias, int64_t activation) {
  const int64_t B = a.size(0), n = a.size(1);
  T* pa = a.data_ptr<T>();
  const T* pb = bias.has_value() ? bias->data_ptr<T>() : nullptr;
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

// Backward: with a = z Vⱼᵀ (pre-bias) and d = dy Wⱼ = dh on entry, leave h = act(a + b1) in a,
// da = dh ⊙ act'(a + b1) in d, and (if db1) db1 = Σ_rows da. Split over columns so every column's
// sum runs over the rows in order: db1 is bitwise the same for any thread count.
template <typename T>
void epilogue_bwd(Tensor& a, Tensor& d, const c10::optional<Tensor>& bias, T* db1,
                  int64_t activation) {
  using acc_t = at::opmath_type<T>;
  const int64_t B = a.size(0), n = a.size(1);
  T* pa = a.data_ptr<T>();
  T* pd = d.data_ptr<T>();
  const T* pb = bias.has_value() ? bias->data_ptr<T>() : nullptr;
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
      for (int64_t c = 0; c < w; ++c) db1[c0 + c] = static_cast<T>(sums[c]);
    }
  });
}

// ---- the streamed passes -------------------------------------------------------------------------

// Two loop orders over the chunks (MIMIC_FAST_CPU_LOOP=gemm|chunks overrides the rule below):
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
  int64_t chunk, nchunks, groups;
};

// Cap on the per-group partials (G x B x k for dz): they are workspace like the tiles.
constexpr int64_t kPartialBytes = 4 << 20;

Plan plan(int64_t B, int64_t H, int64_t partial_cols) {
  Plan p;
  const int64_t T = at::get_num_threads();
  p.chunk = chunk_h(B, H, kTileBytes);
  p.nchunks = (H + p.chunk - 1) / p.chunk;
  // Chunks order when there are enough chunks for every thread to take a few.
  p.loop = (T > 1 && p.nchunks >= 2 * T) ? Loop::kChunks : Loop::kGemm;
  if (const char* env = std::getenv("MIMIC_FAST_CPU_LOOP")) {
    const std::string s(env);
    TORCH_CHECK(s == "gemm" || s == "chunks", "MIMIC_FAST_CPU_LOOP must be 'gemm' or 'chunks', got '",
                s, "'");
    p.loop = s == "gemm" ? Loop::kGemm : Loop::kChunks;
  }
  const int64_t by_memory =
      kPartialBytes / std::max<int64_t>(1, B * partial_cols * static_cast<int64_t>(sizeof(float)));
  p.groups = p.loop == Loop::kGemm
                 ? 1
                 : std::min({p.nchunks, 8 * T, std::max<int64_t>(T, by_memory)});
  return p;
}

// Workspace slots: one per thread that can run a group.
int64_t num_slots(const Plan& p) {
  return p.loop == Loop::kGemm ? 1 : std::min<int64_t>(p.groups, at::get_num_threads());
}

// body(h0, n, slot, group) for every chunk [h0, h0 + n): slot picks the running thread's workspace,
// group the partial sum the chunk accumulates into.
template <typename F>
void for_each_chunk(const Plan& p, int64_t H, const F& body) {
  auto run_group = [&](int64_t g, int64_t slot) {
    const int64_t c0 = g * p.nchunks / p.groups, c1 = (g + 1) * p.nchunks / p.groups;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t h0 = c * p.chunk;
      body(h0, std::min(p.chunk, H - h0), slot, g);
    }
  };
  if (p.loop == Loop::kGemm) {
    run_group(0, 0);
    return;
  }
  const int64_t slots = num_slots(p);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    // Pool threads do not inherit the caller's thread-local state: keep autograd out of the GEMMs
    // (they write into out= views, which autograd refuses when a weight requires grad).
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t slot = s0; slot < s1; ++slot) {
      for (int64_t g = next.fetch_add(1); g < p.groups; g = next.fetch_add(1)) run_group(g, slot);
    }
  });
}

// Sum of the per-group partials in group order.
Tensor sum_groups(const Tensor& parts) {
  Tensor out = parts[0].clone();
  for (int64_t g = 1; g < parts.size(0); ++g) out.add_(parts[g]);
  return out;
}

// y (without b2) and z = x Uᵀ, both in the compute dtype.
std::tuple<Tensor, Tensor> forward_cd(const Tensor& x, const Tensor& U, const Tensor& V,
                                      const c10::optional<Tensor>& b1, const Tensor& W,
                                      int64_t activation) {
  const auto cd = compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cd);
  const int64_t B = x.size(0), H = V.size(0), C = W.size(0);
  Tensor z = at::mm(x.to(cd), U.to(cd).t());
  const Plan p = plan(B, H, C);
  Tensor y_parts = at::zeros({p.groups, B, C}, opts);
  Tensor work = at::empty({num_slots(p), B * p.chunk}, opts);
  for_each_chunk(p, H, [&](int64_t h0, int64_t n, int64_t slot, int64_t group) {
    Tensor a = tile(work[slot], B, n);
    at::mm_out(a, z, V.narrow(0, h0, n).to(cd).t());
    c10::optional<Tensor> b1j;
    if (b1.has_value()) b1j = b1->narrow(0, h0, n).to(cd).contiguous();
    AT_DISPATCH_FLOATING_TYPES(cd, "mimic_fast_cpu_epilogue_fwd",
                               [&] { epilogue_fwd<scalar_t>(a, b1j, activation); });
    y_parts[group].addmm_(a, W.narrow(1, h0, n).to(cd).t());
  });
  return {p.groups == 1 ? y_parts[0] : sum_groups(y_parts), z};
}

std::tuple<Tensor, Tensor> mlp_fwd(const Tensor& x, const Tensor& U, const Tensor& V,
                                   const c10::optional<Tensor>& b1, const Tensor& W,
                                   const c10::optional<Tensor>& b2, int64_t activation) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_mlp("cpu_mlp_fwd", x, U, V, b1, W, b2);
  check_activation(activation);
  auto [y, z] = forward_cd(x, U, V, b1, W, activation);
  if (b2.has_value()) y.add_(b2->to(y.scalar_type()));
  return {y.to(x.scalar_type()), z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& z, const Tensor& U, const Tensor& V,
    const c10::optional<Tensor>& b1, const Tensor& W, int64_t activation, bool has_b2) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const char* op = "cpu_mlp_bwd";
  check_mlp(op, x, U, V, b1, W, c10::nullopt);
  check_activation(activation);
  const auto dt = x.scalar_type();
  const auto cd = compute_dtype(dt);
  const int64_t B = x.size(0), k = U.size(0), H = V.size(0), C = W.size(0);
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == cd, op, ": z must be a CPU ", cd,
              " tensor (what cpu_mlp_fwd saved), got ", z.scalar_type(), " on ", z.device());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == B && z.size(1) == k, op, ": z has shape ", z.sizes(),
              ": expected (", B, ", ", k, ")");
  TORCH_CHECK(dy.device().is_cpu() && dy.is_floating_point(), op,
              ": dy must be a floating-point CPU tensor, got ", dy.scalar_type(), " on ", dy.device());
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == B && dy.size(1) == C, op, ": dy has shape ", dy.sizes(),
              ": expected (", B, ", ", C, ")");

  const auto opts = x.options().dtype(cd);
  const bool native = cd == dt;  // write gradients straight into the outputs
  const Tensor dyc = dy.to(cd).contiguous();
  const Tensor zc = z.contiguous();
  Tensor dV = at::empty({H, k}, x.options());
  Tensor dW = at::empty({C, H}, x.options());
  Tensor db1 = at::empty({b1.has_value() ? H : 0}, x.options());
  Tensor db1_cd = native ? db1 : at::empty({db1.numel()}, opts);  // H floats: negligible

  const Plan p = plan(B, H, k);
  Tensor dz_parts = at::zeros({p.groups, B, k}, opts);
  Tensor work_a = at::empty({num_slots(p), B * p.chunk}, opts);
  Tensor work_d = at::empty({num_slots(p), B * p.chunk}, opts);
  for_each_chunk(p, H, [&](int64_t h0, int64_t n, int64_t slot, int64_t group) {
    Tensor a = tile(work_a[slot], B, n);
    Tensor d = tile(work_d[slot], B, n);
    const Tensor Vj = V.narrow(0, h0, n).to(cd);
    at::mm_out(a, zc, Vj.t());
    at::mm_out(d, dyc, W.narrow(1, h0, n).to(cd));
    c10::optional<Tensor> b1j;
    if (b1.has_value()) b1j = b1->narrow(0, h0, n).to(cd).contiguous();
    AT_DISPATCH_FLOATING_TYPES(cd, "mimic_fast_cpu_epilogue_bwd", [&] {
      scalar_t* pdb1 = b1.has_value() ? db1_cd.data_ptr<scalar_t>() + h0 : nullptr;
      epilogue_bwd<scalar_t>(a, d, b1j, pdb1, activation);
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
    dz_parts[group].addmm_(d, Vj);
  });
  Tensor dz = p.groups == 1 ? dz_parts[0] : sum_groups(dz_parts);
  if (!native && b1.has_value()) db1.copy_(db1_cd);
  Tensor dU = at::mm(dz.t(), x.to(cd)).to(dt);
  Tensor dx = at::mm(dz, U.to(cd)).to(dt);
  Tensor db2 = has_b2 ? dyc.sum(0).to(dt) : at::empty({0}, x.options());
  return {dx, dU, dV, db1, dW, db2};
}

template <typename T>
void loss_epilogue(const Tensor& y, const Tensor* b2, const Tensor& t, Tensor& dy_unit,
                   Tensor& row_sq, Tensor* sq, double scale) {
  const int64_t B = y.size(0), C = y.size(1);
  const T* py = y.data_ptr<T>();
  const T* pt = t.data_ptr<T>();
  const T* pb = b2 ? b2->data_ptr<T>() : nullptr;
  T* pg = dy_unit.data_ptr<T>();
  double* prow = row_sq.data_ptr<double>();
  T* psq = sq ? sq->data_ptr<T>() : nullptr;
  const T s = static_cast<T>(scale);
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double acc = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = r * C + c;
        const T res = (pb ? py[i] + pb[c] : py[i]) - pt[i];
        const T sqv = res * res;
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
                                             int64_t activation, int64_t reduction) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const char* op = "cpu_mimic_fwd";
  check_mlp(op, x, U, V, b1, W, b2);
  check_activation(activation);
  TORCH_CHECK(reduction >= kMean && reduction <= kNone, op,
              ": reduction code must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
  const int64_t B = x.size(0), C = W.size(0);
  TORCH_CHECK(teacher.device().is_cpu() && teacher.is_floating_point(), op,
              ": teacher must be a floating-point CPU tensor, got ", teacher.scalar_type(), " on ",
              teacher.device());
  TORCH_CHECK(teacher.dim() == 2 && teacher.size(0) == B && teacher.size(1) == C, op,
              ": teacher has shape ", teacher.sizes(), ": expected (", B, ", ", C, ")");
  auto [y, z] = forward_cd(x, U, V, b1, W, activation);
  const auto cd = y.scalar_type();
  const Tensor t = teacher.to(cd).contiguous();
  c10::optional<Tensor> b2c;
  if (b2.has_value()) b2c = b2->to(cd).contiguous();
  const double numel = static_cast<double>(B * C);
  const double scale = reduction == kMean ? 2.0 / std::max(numel, 1.0) : 2.0;
  Tensor dy_unit = at::empty({B, C}, y.options());
  Tensor row_sq = at::empty({B}, y.options().dtype(at::kDouble));
  Tensor sq = reduction == kNone ? at::empty({B, C}, y.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(cd, "mimic_fast_cpu_loss", [&] {
    loss_epilogue<scalar_t>(y, b2c ? &*b2c : nullptr, t, dy_unit, row_sq,
                            reduction == kNone ? &sq : nullptr, scale);
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

int64_t cpu_chunk_h(int64_t B, int64_t H) {
  TORCH_CHECK(B >= 0 && H >= 1, "cpu_chunk_h: expected B >= 0 and H >= 1, got B=", B, ", H=", H);
  return plan(B, H, 1).chunk;
}

}  // namespace
}  // namespace mimic_fast_cpu

// This file owns the namespace's TORCH_LIBRARY block; other extensions add theirs with
// TORCH_LIBRARY_FRAGMENT(mimic_fast, m).
TORCH_LIBRARY(mimic_fast, m) {
  m.def("cpu_mlp_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, "
        "int activation) -> (Tensor, Tensor)");
  m.def("cpu_mlp_bwd(Tensor dy, Tensor x, Tensor z, Tensor U, Tensor V, Tensor? b1, Tensor W, "
        "int activation, bool has_b2) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_mimic_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, "
        "Tensor teacher, int activation, int reduction) -> (Tensor, Tensor, Tensor)");
  // No tensor arguments, so a catch-all kernel: the chunk width a call of batch B would use now
  // (it depends on the thread count and the MIMIC_FAST_CPU_* variables).
  m.def("cpu_chunk_h(int B, int H) -> int", &mimic_fast_cpu::cpu_chunk_h);
}

TORCH_LIBRARY_IMPL(mimic_fast, CPU, m) {
  m.impl("cpu_mlp_fwd", &mimic_fast_cpu::mlp_fwd);
  m.impl("cpu_mlp_bwd", &mimic_fast_cpu::mlp_bwd);
  m.impl("cpu_mimic_fwd", &mimic_fast_cpu::mimic_fwd);
}
