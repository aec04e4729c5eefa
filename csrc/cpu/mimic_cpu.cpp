// CPU ops of mimic_fast: the bottleneck MLP  y = act((x Uᵀ) Vᵀ + b1) Wᵀ + b2  and the fused mimic
// loss, streamed over the hidden width H in chunks so that no (B, H) tensor is ever allocated.
//
// Design limits: the GEMMs are ATen's (MKL / oneDNN, whatever torch was built with) and only the
// elementwise epilogues are ours; the hidden layer is recomputed in backward (z = x Uᵀ is saved),
// which costs one extra (B,k)x(k,H) GEMM, ~19% of the step's FLOPs at the paper's sizes.
//
// The plan is the caller's (mimic_fast/ops/cpu.py): every op takes the chunk width (columns of H per
// chunk), the loop order and, for bfloat16 / float16, the compute path:
//  - native: the GEMM operands (x, U, V, W, z, the hidden tile h, dy, da) stay in the input dtype and
//    every GEMM runs in it with float32 accumulation inside (oneDNN: AMX / AVX512-BF16 where the CPU
//    has them); the bias/activation epilogue computes in float32 on the cache-resident tile and
//    writes the low-precision operand of the next GEMM; the sums across chunks (y, dz, db1) and the
//    loss accumulate in float32. Weights already stored in the input dtype are read as they are.
//  - float32: the operands are upcast chunk by chunk and everything is computed in float32 (for CPUs
//    without a native low-precision matmul, where ATen's bf16/fp16 GEMMs are emulated and slow).
// float32 and float64 are computed natively. Outputs are in the input dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

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
// torch.__config__.parallel_info()), so it shares threads with the BLAS calls around it. Inside the
// `chunks` loop order it runs inline on the calling thread.

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

// Native low precision (L = BFloat16 / Half): the tiles hold the GEMMs' L outputs, the
// pre-activation with b1 already added (pre_activation below); the epilogue computes in float32 and
// writes L. ReLU is one pass; the transcendental activations widen the tile into float32 scratch,
// run the float32 epilogue above (ATen's SIMD kernels) and narrow it back.
template <typename L>
void epilogue_fwd_low(Tensor& a, int64_t activation, Tensor& scratch) {
  const int64_t B = a.size(0), n = a.size(1);
  L* pa = a.data_ptr<L>();
  if (activation == kRelu) {
    at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        L* row = pa + r * n;
        for (int64_t c = 0; c < n; ++c) {
          const float v = static_cast<float>(row[c]);
          row[c] = static_cast<L>(v < 0.f ? 0.f : v);
        }
      }
    });
    return;
  }
  Tensor pre = tile(scratch, B, n);
  pre.copy_(a);
  epilogue_fwd<float>(pre, nullptr, activation);
  a.copy_(pre);
}

template <typename L>
void epilogue_bwd_low(Tensor& a, Tensor& d, float* db1, int64_t activation, Tensor& scratch_a,
                      Tensor& scratch_d) {
  const int64_t B = a.size(0), n = a.size(1);
  L* pa = a.data_ptr<L>();
  L* pd = d.data_ptr<L>();
  if (activation == kRelu) {
    const int64_t col_grain = std::max<int64_t>(16, kGrainElems / std::max<int64_t>(B, 1));
    at::parallel_for(0, n, col_grain, [&](int64_t c0, int64_t c1) {
      const int64_t w = c1 - c0;
      std::vector<float> sums(db1 ? w : 0, 0.f);
      for (int64_t r = 0; r < B; ++r) {
        L* ar = pa + r * n + c0;
        L* dr = pd + r * n + c0;
        for (int64_t c = 0; c < w; ++c) {
          const float v = static_cast<float>(ar[c]);
          const float g = v > 0.f ? static_cast<float>(dr[c]) : 0.f;  // dh is already L: exact
          ar[c] = static_cast<L>(v < 0.f ? 0.f : v);
          dr[c] = static_cast<L>(g);
          if (db1) sums[c] += g;
        }
      }
      if (db1) {
        for (int64_t c = 0; c < w; ++c) db1[c0 + c] = sums[c];
      }
    });
    return;
  }
  Tensor pre = tile(scratch_a, B, n);
  Tensor dh = tile(scratch_d, B, n);
  pre.copy_(a);
  dh.copy_(d);
  epilogue_bwd<float>(pre, dh, nullptr, db1, activation);
  a.copy_(pre);
  d.copy_(dh);
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

// Sum of the per-group partials in group order.
Tensor sum_groups(const Tensor& parts) {
  Tensor out = parts[0].clone();
  for (int64_t g = 1; g < parts.size(0); ++g) out.add_(parts[g]);
  return out;
}

// acc += a @ b, accumulated in acc's dtype: one addmm_ when the GEMM's dtype is acc's, else the
// GEMM's low-precision product (float32 accumulation inside, rounded once) is added in float32.
void addmm_acc(Tensor& acc, const Tensor& a, const Tensor& b, Tensor& part) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    at::mm_out(part, a, b);
    acc.add_(part);
  }
}

// a = z Vⱼᵀ, plus b1ⱼ inside the GEMM on the native low-precision path: the pre-activation is
// rounded once (as F.linear's is), so its sign, and with it ReLU's mask, is the exact sum's. The
// float32 / float64 paths add the bias in their epilogue (the rounding there is negligible).
void pre_activation(Tensor& a, const Tensor& z, const Tensor& Vj, const c10::optional<Tensor>& b1j,
                    bool low) {
  if (low && b1j.has_value()) at::addmm_out(a, *b1j, z, Vj.t());
  else at::mm_out(a, z, Vj.t());
}

c10::optional<Tensor> bias_chunk(const c10::optional<Tensor>& b1, int64_t h0, int64_t n,
                                 at::ScalarType op) {
  if (!b1.has_value()) return c10::nullopt;
  return b1->narrow(0, h0, n).to(op).contiguous();
}

// y (without b2, in the accumulation dtype) and z = x Uᵀ (in the operand dtype).
std::tuple<Tensor, Tensor> forward_acc(const Tensor& x, const Tensor& U, const Tensor& V,
                                       const c10::optional<Tensor>& b1, const Tensor& W,
                                       int64_t activation, int64_t chunk_h, int64_t loop,
                                       bool native) {
  const auto dt = dtypes_of(x.scalar_type(), native);
  const auto op_opts = x.options().dtype(dt.op);
  const auto acc_opts = x.options().dtype(dt.acc);
  const int64_t B = x.size(0), H = V.size(0), C = W.size(0);
  const bool low = dt.op != dt.acc;  // native bfloat16 / float16
  Tensor z = at::mm(x.to(dt.op), U.to(dt.op).t());
  const Plan p = make_plan(B, H, chunk_h, loop, C, c10::elementSize(dt.acc));
  Tensor y_parts = at::zeros({p.groups, B, C}, acc_opts);
  Tensor work = at::empty({p.slots, B * p.chunk}, op_opts);
  Tensor y_part = low ? at::empty({p.slots, B, C}, op_opts) : Tensor();
  // float32 scratch of the transcendental epilogues (native path only)
  Tensor scratch = low && activation != kRelu ? at::empty({p.slots, B * p.chunk}, acc_opts) : Tensor();
  for_each_chunk(p, H, [&](int64_t h0, int64_t n, int64_t slot, int64_t group) {
    Tensor a = tile(work[slot], B, n);
    const auto b1j = bias_chunk(b1, h0, n, dt.op);
    pre_activation(a, z, V.narrow(0, h0, n).to(dt.op), b1j, low);
    if (low) {
      Tensor s = scratch.defined() ? scratch[slot] : Tensor();
      AT_DISPATCH_REDUCED_FLOATING_TYPES(dt.op, "mimic_fast_cpu_epilogue_fwd_low", [&] {
        epilogue_fwd_low<scalar_t>(a, activation, s);
      });
    } else {
      AT_DISPATCH_FLOATING_TYPES(dt.op, "mimic_fast_cpu_epilogue_fwd", [&] {
        epilogue_fwd<scalar_t>(a, b1j ? b1j->data_ptr<scalar_t>() : nullptr, activation);
      });
    }
    Tensor yg = y_parts[group];
    Tensor part = low ? y_part[slot] : Tensor();
    addmm_acc(yg, a, W.narrow(1, h0, n).to(dt.op).t(), part);
  });
  return {p.groups == 1 ? y_parts[0] : sum_groups(y_parts), z};
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
    int64_t chunk_h, int64_t loop, bool native) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const char* op = "cpu_mlp_bwd";
  check_mlp(op, x, U, V, b1, W, c10::nullopt);
  check_activation(activation);
  const auto t = x.scalar_type();
  check_plan_args(op, chunk_h, loop, native, t);
  const auto dt = dtypes_of(t, native);
  const bool low = dt.op != dt.acc;
  const int64_t B = x.size(0), k = U.size(0), H = V.size(0), C = W.size(0);
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == dt.op, op, ": z must be a CPU ", dt.op,
              " tensor (what cpu_mlp_fwd saved with the same native=", native, "), got ",
              z.scalar_type(), " on ", z.device());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == B && z.size(1) == k, op, ": z has shape ", z.sizes(),
              ": expected (", B, ", ", k, ")");
  TORCH_CHECK(dy.device().is_cpu() && dy.is_floating_point(), op,
              ": dy must be a floating-point CPU tensor, got ", dy.scalar_type(), " on ", dy.device());
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == B && dy.size(1) == C, op, ": dy has shape ", dy.sizes(),
              ": expected (", B, ", ", C, ")");

  const auto op_opts = x.options().dtype(dt.op);
  const auto acc_opts = x.options().dtype(dt.acc);
  const bool direct = dt.op == t;  // the GEMMs write dV, dW straight into the outputs
  const Tensor dy_acc = dy.to(dt.acc).contiguous();
  const Tensor dy_op = dy_acc.to(dt.op);
  const Tensor zc = z.contiguous();
  Tensor dV = at::empty({H, k}, x.options());
  Tensor dW = at::empty({C, H}, x.options());
  Tensor db1 = at::empty({b1.has_value() ? H : 0}, x.options());
  // db1 sums in the accumulation dtype (H elements: negligible)
  Tensor db1_acc = dt.acc == t ? db1 : at::empty({db1.numel()}, acc_opts);

  const Plan p = make_plan(B, H, chunk_h, loop, k, c10::elementSize(dt.acc));
  Tensor dz_parts = at::zeros({p.groups, B, k}, acc_opts);
  Tensor work_a = at::empty({p.slots, B * p.chunk}, op_opts);
  Tensor work_d = at::empty({p.slots, B * p.chunk}, op_opts);
  Tensor dz_part = low ? at::empty({p.slots, B, k}, op_opts) : Tensor();
  const bool scratch = low && activation != kRelu;
  Tensor scratch_a = scratch ? at::empty({p.slots, B * p.chunk}, acc_opts) : Tensor();
  Tensor scratch_d = scratch ? at::empty({p.slots, B * p.chunk}, acc_opts) : Tensor();
  for_each_chunk(p, H, [&](int64_t h0, int64_t n, int64_t slot, int64_t group) {
    Tensor a = tile(work_a[slot], B, n);
    Tensor d = tile(work_d[slot], B, n);
    const Tensor Vj = V.narrow(0, h0, n).to(dt.op);
    const auto b1j = bias_chunk(b1, h0, n, dt.op);
    pre_activation(a, zc, Vj, b1j, low);
    at::mm_out(d, dy_op, W.narrow(1, h0, n).to(dt.op));
    if (low) {
      Tensor sa = scratch ? scratch_a[slot] : Tensor();
      Tensor sd = scratch ? scratch_d[slot] : Tensor();
      float* pdb1 = b1.has_value() ? db1_acc.data_ptr<float>() + h0 : nullptr;
      AT_DISPATCH_REDUCED_FLOATING_TYPES(dt.op, "mimic_fast_cpu_epilogue_bwd_low", [&] {
        epilogue_bwd_low<scalar_t>(a, d, pdb1, activation, sa, sd);
      });
    } else {
      AT_DISPATCH_FLOATING_TYPES(dt.op, "mimic_fast_cpu_epilogue_bwd", [&] {
        scalar_t* pdb1 = b1.has_value() ? db1_acc.data_ptr<scalar_t>() + h0 : nullptr;
        epilogue_bwd<scalar_t>(a, d, b1j ? b1j->data_ptr<scalar_t>() : nullptr, pdb1, activation);
      });
    }
    Tensor dWj = dW.narrow(1, h0, n);
    Tensor dVj = dV.narrow(0, h0, n);
    if (direct) {
      at::mm_out(dWj, dy_op.t(), a);
      at::mm_out(dVj, d.t(), zc);
    } else {
      dWj.copy_(at::mm(dy_op.t(), a));
      dVj.copy_(at::mm(d.t(), zc));
    }
    Tensor dzg = dz_parts[group];
    Tensor part = low ? dz_part[slot] : Tensor();
    addmm_acc(dzg, d, Vj, part);
  });
  Tensor dz = p.groups == 1 ? dz_parts[0] : sum_groups(dz_parts);
  if (b1.has_value() && dt.acc != t) db1.copy_(db1_acc);
  const Tensor dz_op = dz.to(dt.op);
  Tensor dU = at::mm(dz_op.t(), x.to(dt.op)).to(t);
  Tensor dx = at::mm(dz_op, U.to(dt.op)).to(t);
  Tensor db2 = has_b2 ? dy_acc.sum(0).to(t) : at::empty({0}, x.options());
  return {dx, dU, dV, db1, dW, db2};
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

}  // namespace
}  // namespace mimic_fast_cpu

// This file owns the namespace's TORCH_LIBRARY block; other extensions add theirs with
// TORCH_LIBRARY_FRAGMENT(mimic_fast, m). chunk_h, loop and native are the caller's plan
// (mimic_fast/ops/cpu.py plan()).
TORCH_LIBRARY(mimic_fast, m) {
  m.def("cpu_mlp_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, "
        "int activation, int chunk_h, int loop, bool native) -> (Tensor, Tensor)");
  m.def("cpu_mlp_bwd(Tensor dy, Tensor x, Tensor z, Tensor U, Tensor V, Tensor? b1, Tensor W, "
        "int activation, bool has_b2, int chunk_h, int loop, bool native) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_mimic_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, "
        "Tensor teacher, int activation, int reduction, int chunk_h, int loop, bool native) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mimic_fast, CPU, m) {
  m.impl("cpu_mlp_fwd", &mimic_fast_cpu::mlp_fwd);
  m.impl("cpu_mlp_bwd", &mimic_fast_cpu::mlp_bwd);
  m.impl("cpu_mimic_fwd", &mimic_fast_cpu::mimic_fwd);
}
