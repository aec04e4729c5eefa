// Torch binding of the CUDA backend: torch.ops.mimic_fast.cuda_* (TORCH_LIBRARY_FRAGMENT; the CPU
// extension owns TORCH_LIBRARY(mimic_fast)). The bottleneck MLP is streamed over H in chunks sized
// so that each (B, chunk) tile stays in L2 (cudaDevAttrL2CacheSize): per chunk two or three cuBLAS
// GEMMs through ATen plus one of our elementwise epilogues; backward recomputes the tile.
//
// Design limits: the GEMMs are ATen's/cuBLAS's and the tile makes an L2 round trip between them
// (what a single fused kernel would avoid); y and dz accumulate in float32 across chunks: directly
// (addmm_, beta = 1) for float32; for bf16/fp16 through addmm(out_dtype=float32) into the float32
// accumulator where this torch accepts that, else mm(out_dtype=float32) into a small (B, C) or (B, k)
// scratch plus add_. Each
// chunk loop is replayed from a CUDA graph captured on its second call (~2,000 ATen calls per step at
// H = 400k would otherwise make the step host-bound), with ReLU's bias+activation fused into the
// GEMM by cuBLASLt and every operand's rows 16-byte aligned. Everything runs on the current stream
// with no host synchronisation, so a caller can also capture a whole step in its own graph. Only
// this file includes torch headers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernels.h"

namespace mimic_fast_cuda {
namespace {

using at::Tensor;

// Chunks are multiples of this many columns (GEMM tile widths, 16-byte epilogue vectors).
constexpr int64_t kChunkAlign = 128;
// Share of L2 the live (B, chunk) tiles may take; the rest holds the V/W slices, z and dy.
constexpr double kTileL2Fraction = 0.5;

struct DeviceInfo {
  int l2_bytes = -1;
  int num_sms = 1;
};

DeviceInfo device_info(int device) {
  // Attribute queries are not stream work (fine during graph capture), but are cached anyway.
  static std::mutex mu;
  static std::vector<DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1);
  DeviceInfo& info = cache[device];
  if (info.l2_bytes < 0) {
    int l2 = 0, sms = 1;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    info.l2_bytes = l2;
    info.num_sms = sms;
  }
  return info;
}

// Columns per chunk: `tiles` live (B, chunk) tiles of `elem_bytes` fit in kTileL2Fraction of L2.
// A small batch gets one chunk spanning all of H: that tile is the whole hidden layer, but it fits
// in L2 like any other tile.
int64_t chunk_columns(int64_t B, int64_t H, int64_t elem_bytes, int64_t tiles, int64_t l2_bytes) {
  const double budget = kTileL2Fraction * static_cast<double>(l2_bytes);
  const double per_column = static_cast<double>(std::max<int64_t>(B, 1) * elem_bytes * tiles);
  int64_t c = static_cast<int64_t>(budget / per_column) / kChunkAlign * kChunkAlign;
  c = std::max(c, kChunkAlign);  // a batch this large overflows L2 anyway; keep the GEMMs efficient
  return std::min(c, std::max<int64_t>(H, 1));
}

DType kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default:
      TORCH_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(),
                       "; the cuda backend supports float32, float16 and bfloat16");
  }
  return DType::kF32;
}

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but x is on ", like.device());
}

void check_kernel(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mimic_fast cuda kernel ", what, " failed: ", cudaGetErrorString(err));
}

struct MLPDims {
  int64_t B, D, k, H, C;
};

MLPDims check_mlp(const Tensor& x, const Tensor& U, const Tensor& V, const std::optional<Tensor>& b1,
                  const Tensor& W, const std::optional<Tensor>& b2) {
  TORCH_CHECK(x.dim() == 2 && U.dim() == 2 && V.dim() == 2 && W.dim() == 2,
              "cuda_mlp: x, U, V, W must be 2-D, got ", x.sizes(), ", ", U.sizes(), ", ", V.sizes(), ", ",
              W.sizes());
  const MLPDims d{x.size(0), x.size(1), U.size(0), V.size(0), W.size(0)};
  TORCH_CHECK(U.size(1) == d.D, "U has shape ", U.sizes(), ": expected (", d.k, ", ", d.D, ")");
  TORCH_CHECK(V.size(1) == d.k, "V has shape ", V.sizes(), ": expected (", d.H, ", ", d.k, ")");
  TORCH_CHECK(W.size(1) == d.H, "W has shape ", W.sizes(), ": expected (", d.C, ", ", d.H, ")");
  kernel_dtype(x, "x");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&U, "U"}, {&V, "V"}, {&W, "W"}}) {
    check_cuda(*t, name, x);
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name, " has dtype ", t->scalar_type(),
                     " but x has ", x.scalar_type());
  }
  check_cuda(x, "x", x);
  if (b1) {
    check_cuda(*b1, "b1", x);
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == d.H, "b1 has shape ", b1->sizes(), ": expected (", d.H, ",)");
    TORCH_CHECK_TYPE(b1->scalar_type() == x.scalar_type(), "b1 has dtype ", b1->scalar_type(), " but x has ",
                     x.scalar_type());
  }
  if (b2) {
    check_cuda(*b2, "b2", x);
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == d.C, "b2 has shape ", b2->sizes(), ": expected (", d.C, ",)");
    TORCH_CHECK_TYPE(b2->scalar_type() == x.scalar_type(), "b2 has dtype ", b2->scalar_type(), " but x has ",
                     x.scalar_type());
  }
  return d;
}

void check_activation(int64_t act) {
  TORCH_CHECK(act >= kRelu && act <= kGelu, "activation code must be 0 (relu), 1 (sigmoid), 2 (tanh) or "
              "3 (gelu), got ", act);
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= kMean && reduction <= kNone, "reduction code must be 0 (mean), 1 (sum) or "
              "2 (none), got ", reduction);
}

// ---- aligned leading dimensions ------------------------------------------------------------------
// cuBLAS takes its fastest kernels only when every matrix's rows start 16-byte aligned; k = 250 and
// C = 183 give 500- and 366-byte rows. The small (B, k) / (B, C) operands and every tile therefore
// live in buffers whose leading dimension is rounded up to 16 bytes (views narrowed to the real
// width, so the padding is never read); V (H, k) and W (C, H) are copied into such a buffer only when
// their own rows are misaligned (one parameter-sized pass each, ~1% of a paper-size step).
int64_t aligned_ld(int64_t cols, int64_t elem_bytes) {
  const int64_t q = 16 / elem_bytes;
  return std::max<int64_t>((cols + q - 1) / q * q, q);
}

Tensor padded_empty(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  const int64_t ld = aligned_ld(cols, static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType())));
  return at::empty({rows, ld}, opts).narrow(1, 0, cols);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool rows_aligned(const Tensor& t) {  // t is 2-D with unit column stride
  return t.stride(1) == 1 && (t.stride(0) * t.element_size()) % 16 == 0 && aligned16(t.const_data_ptr());
}

// A (rows, cols) view with 16-byte aligned rows of the first elements of a flat tile buffer.
Tensor tile_view(const Tensor& buffer, int64_t rows, int64_t cols) {
  const int64_t ld = aligned_ld(cols, buffer.element_size());
  return buffer.narrow(0, 0, rows * ld).view({rows, ld}).narrow(1, 0, cols);
}

const void* bias_ptr(const Tensor& b, int64_t h0) {
  return b.defined() ? static_cast<const char*>(b.const_data_ptr()) + h0 * b.element_size() : nullptr;
}

// ---- float32 accumulation of half-precision GEMMs --------------------------------------------------
// acc (float32) += a @ b. For bf16/fp16 operands: addmm with out_dtype=float32 into acc itself (one
// cuBLAS call, beta = 1) where this torch accepts a float32 `self` (newer versions do, older ones
// want self in the operands' dtype); else mm(out_dtype=float32) into a scratch and add_. Which one
// holds is learnt on the first call: the rejection is a TORCH_CHECK before anything is launched.
std::atomic<int> g_addmm_f32{0};  // 0 unknown, 1 works, 2 rejected

void gemm_accumulate(Tensor& acc, const Tensor& a, const Tensor& b, Tensor& scratch) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);  // beta = 1 inside cuBLAS
    return;
  }
  if (g_addmm_f32.load() != 2) {
    try {
      at::addmm_out(acc, acc, a, b, at::kFloat);
      g_addmm_f32.store(1);
      return;
    } catch (const c10::Error&) {
      g_addmm_f32.store(2);
    }
  }
  at::mm_out(scratch, a, b, at::kFloat);
  acc.add_(scratch);
}

// ---- the chunk loops --------------------------------------------------------------------------------
// Everything a loop reads and writes. In a captured graph these are the entry's static tensors; the
// call's own inputs (z, dy) are copied into zp / dyp before each replay and results copied out after.
struct LoopBuffers {
  Tensor zp, dyp;          // (B, k), (B, C) with aligned rows
  Tensor Vop, Wop;         // V (H, k) and W (C, H), or aligned copies of them
  Tensor Vsrc, Wsrc;       // what Vop / Wop are copied from, when they are copies
  Tensor b1, b2;
  Tensor tile_a, tile_g;   // flat (B * aligned chunk) tiles
  Tensor scratch;          // (B, C) or (B, k) float32, for half operands
  Tensor y32;              // forward: (B, C) float32 accumulator
  Tensor dVop, dWop, db1;  // backward outputs (dVop / dWop aligned; narrowed views)
  Tensor dz32;             // backward: (B, k) float32 accumulator
};

struct LoopShape {
  int64_t B, k, H, C, n;  // n: columns per chunk
  int act;
  DType dt;
};

// ReLU with a bias: cuBLASLt's fused bias+ReLU epilogue (_addmm_activation) writes h = relu(z V_jᵀ + b1)
// straight from the GEMM. Its GELU is the tanh approximation, not the exact erf GELU of our contract,
// so GELU (and sigmoid, tanh) keep our epilogue. Lt wants a contiguous output: the full chunks.
bool fused_relu(const LoopShape& s, const LoopBuffers& b, const Tensor& a) {
  return s.act == kRelu && b.b1.defined() && a.is_contiguous();
}

void refresh_copies(LoopBuffers& b) {
  if (b.Vsrc.defined()) b.Vop.copy_(b.Vsrc);
  if (b.Wsrc.defined()) b.Wop.copy_(b.Wsrc);
}

void forward_loop(const LoopShape& s, LoopBuffers& b, int num_sms) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  refresh_copies(b);
  if (b.b2.defined()) {
    b.y32.copy_(b.b2.unsqueeze(0).expand({s.B, s.C}));
  } else {
    b.y32.zero_();
  }
  for (int64_t h0 = 0; h0 < s.H; h0 += s.n) {
    const int64_t m = std::min(s.n, s.H - h0);
    Tensor a = tile_view(b.tile_a, s.B, m);
    const Tensor Vj = b.Vop.narrow(0, h0, m);
    if (fused_relu(s, b, a)) {
      at::_addmm_activation_out(a, b.b1.narrow(0, h0, m), b.zp, Vj.t());
    } else {
      at::mm_out(a, b.zp, Vj.t());
      check_kernel(bias_act_fwd(s.dt, a.data_ptr(), bias_ptr(b.b1, h0), s.B, m, a.stride(0), s.act,
                                num_sms, stream),
                   "bias_act_fwd");
    }
    gemm_accumulate(b.y32, a, b.Wop.narrow(1, h0, m).t(), b.scratch);
  }
}

void backward_loop(const LoopShape& s, LoopBuffers& b, int num_sms) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  refresh_copies(b);
  b.dz32.zero_();
  for (int64_t h0 = 0; h0 < s.H; h0 += s.n) {
    const int64_t m = std::min(s.n, s.H - h0);
    const Tensor Vj = b.Vop.narrow(0, h0, m);
    Tensor a = tile_view(b.tile_a, s.B, m);
    Tensor g = tile_view(b.tile_g, s.B, m);
    const bool fused = fused_relu(s, b, a);
    if (fused) {
      at::_addmm_activation_out(a, b.b1.narrow(0, h0, m), b.zp, Vj.t());  // a = h (recomputed)
    } else {
      at::mm_out(a, b.zp, Vj.t());                                        // a = z V_jᵀ (recomputed)
    }
    at::mm_out(g, b.dyp, b.Wop.narrow(1, h0, m));                         // dh = dy W_j
    // a <- h = act(a + b1), g <- da = dh act'(a + b1). After the fused ReLU, a already is h and
    // relu'(pre) = [h > 0], so the epilogue runs as a bias-free ReLU over h: h stays h.
    check_kernel(bias_act_bwd(s.dt, a.data_ptr(), g.data_ptr(), fused ? nullptr : bias_ptr(b.b1, h0), s.B,
                              m, a.stride(0), s.act, num_sms, stream),
                 "bias_act_bwd");
    Tensor dW_j = b.dWop.narrow(1, h0, m);
    at::mm_out(dW_j, b.dyp.t(), a);
    Tensor dV_j = b.dVop.narrow(0, h0, m);
    at::mm_out(dV_j, g.t(), b.zp);
    if (b.b1.defined()) {
      Tensor db1_j = b.db1.narrow(0, h0, m);
      at::sum_out(db1_j, g, {0});
    }
    gemm_accumulate(b.dz32, g, Vj, b.scratch);
  }
}

// Operand views with aligned rows: the tensor itself when it already has them, else a copy target
// (filled by refresh_copies inside the loop, so a captured graph re-reads the parameter each replay).
void set_operand(const Tensor& t, Tensor& op, Tensor& src) {
  if (rows_aligned(t)) {
    op = t;
    src = Tensor();
  } else {
    op = padded_empty(t.size(0), t.size(1), t.options());
    src = t;
  }
}

// ---- CUDA-graph replay of the loops ---------------------------------------------------------------
// At H = 400k a step is ~2,000 ATen calls, more than a CPU can issue in the ~10 ms the GPU needs, so
// each loop is captured once per (loop, device, stream, dtype, activation, shape, chunk, parameter
// pointers) and replayed: the first call of a key runs eagerly (one-off shapes never pay for a
// capture), the second warms up on a side stream, captures and keeps the result of its warm-up run,
// later ones replay. Parameters are read in place (keyed by pointer: an optimizer updating them in
// place is seen by the replay); z and dy are copied in, results are copied out (never handed out
// while the graph can still overwrite them). Not used while the caller is capturing a graph itself
// (its capture then records our launches) or with MIMIC_FAST_CUDA_GRAPHS=0 / cuda_set_graphs(False).
struct LoopKey {
  int kind, device, dtype, act;
  int64_t stream, B, k, H, C, n;
  const void *V, *W, *b1, *b2;
  bool operator==(const LoopKey& o) const {
    return std::tie(kind, device, dtype, act, stream, B, k, H, C, n, V, W, b1, b2) ==
           std::tie(o.kind, o.device, o.dtype, o.act, o.stream, o.B, o.k, o.H, o.C, o.n, o.V, o.W, o.b1,
                    o.b2);
  }
};

struct LoopKeyHash {
  size_t operator()(const LoopKey& k) const {
    size_t h = 0;
    auto mix = [&h](size_t v) { h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
    for (int64_t v : {int64_t(k.kind), int64_t(k.device), int64_t(k.dtype), int64_t(k.act), k.stream, k.B,
                      k.k, k.H, k.C, k.n}) {
      mix(std::hash<int64_t>()(v));
    }
    for (const void* p : {k.V, k.W, k.b1, k.b2}) mix(std::hash<const void*>()(p));
    return h;
  }
};

struct GraphEntry {
  LoopBuffers buf;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  uint64_t last_use = 0;
};

constexpr size_t kMaxGraphs = 4;      // entries kept (each holds its tiles and backward outputs)
constexpr size_t kMaxSightings = 256;  // keys remembered as seen once

struct GraphCache {
  std::mutex mu;
  bool enabled = std::getenv("MIMIC_FAST_CUDA_GRAPHS") == nullptr ||
                 std::string(std::getenv("MIMIC_FAST_CUDA_GRAPHS")) != "0";
  std::unordered_map<LoopKey, GraphEntry, LoopKeyHash> entries;
  std::unordered_map<LoopKey, int, LoopKeyHash> seen;  // -1: capture failed, never again
  uint64_t clock = 0, captures = 0, replays = 0, eager = 0, failures = 0;
};

GraphCache& graph_cache() {
  static GraphCache* cache = new GraphCache();  // leaked on purpose: no CUDA calls at exit
  return *cache;
}

c10::cuda::CUDAStream capture_stream(int device) {
  static std::mutex mu;
  static std::vector<std::optional<c10::cuda::CUDAStream>> streams;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(streams.size())) streams.resize(device + 1);
  if (!streams[device]) streams[device] = c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device));
  return *streams[device];
}

// `from` waits for `to`'s work so far (an event per call: cheap, and no state shared across threads).
void stream_wait(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& on) {
  cudaEvent_t ev;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(ev, on.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiter.stream(), ev, 0));
  C10_CUDA_CHECK(cudaEventDestroy(ev));  // released once the wait is satisfied
}

// Runs body(buffers): eagerly, or captured / replayed as described above. alloc() makes buffers and
// prepare(buffers) copies this call's inputs in. Returns the buffers holding the results and whether
// they are a graph's static ones (the caller must then copy its outputs out).
template <typename Alloc, typename Prepare, typename Body>
std::pair<LoopBuffers, bool> run_loop(const LoopKey& key, Alloc alloc, Prepare prepare, Body body) {
  GraphCache& cache = graph_cache();
  auto eager = [&]() {
    LoopBuffers b = alloc();
    prepare(b);
    body(b);
    return std::make_pair(b, false);
  };
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return eager();
  std::unique_lock<std::mutex> lock(cache.mu);
  if (!cache.enabled) {
    lock.unlock();
    return eager();
  }
  auto it = cache.entries.find(key);
  if (it != cache.entries.end()) {
    GraphEntry& e = it->second;
    e.last_use = ++cache.clock;
    prepare(e.buf);
    e.graph->replay();
    ++cache.replays;
    return {e.buf, true};
  }
  int& sightings = cache.seen[key];
  if (sightings < 0 || ++sightings < 2) {
    ++cache.eager;
    if (cache.seen.size() > kMaxSightings) cache.seen.clear();
    lock.unlock();
    return eager();
  }
  if (cache.entries.size() >= kMaxGraphs) {
    auto lru = std::min_element(cache.entries.begin(), cache.entries.end(),
                                [](const auto& a, const auto& b) { return a.second.last_use < b.second.last_use; });
    cache.entries.erase(lru);
  }
  GraphEntry& e = cache.entries[key];
  e.last_use = ++cache.clock;
  e.buf = alloc();
  prepare(e.buf);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  const c10::cuda::CUDAStream side = capture_stream(key.device);
  stream_wait(side, current);
  bool captured = false;
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    body(e.buf);  // the warm-up: cuBLAS handles and workspaces for this stream; this call's results
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    try {
      graph->capture_begin();
      try {
        body(e.buf);
      } catch (...) {
        try { graph->capture_end(); } catch (...) {}  // leave capture mode before reporting
        throw;
      }
      graph->capture_end();
      e.graph = std::move(graph);
      captured = true;
    } catch (const std::exception& err) {
      (void)cudaGetLastError();
      ++cache.failures;
      TORCH_WARN_ONCE("mimic_fast cuda: capturing the chunk loop in a CUDA graph failed (", err.what(),
                      "); this shape runs without one");
    }
  }
  stream_wait(current, side);
  if (!captured) {
    LoopBuffers b = e.buf;  // the warm-up's results, no longer any graph's: handed out as they are
    cache.entries.erase(key);
    cache.seen[key] = -1;
    return {b, false};
  }
  ++cache.captures;
  return {e.buf, true};
}

// Shared by mlp_fwd and mimic_fwd: y32 = act(x Uᵀ Vᵀ + b1) Wᵀ + b2 in float32 (rows aligned, so maybe
// a narrowed view) and z = x Uᵀ (contiguous); the bool says y32 belongs to a graph.
std::tuple<Tensor, Tensor, bool> forward_f32(const Tensor& x, const Tensor& U, const Tensor& V_in,
                                             const std::optional<Tensor>& b1_in, const Tensor& W_in,
                                             const std::optional<Tensor>& b2_in, int64_t act,
                                             int64_t chunk_h) {
  const MLPDims d = check_mlp(x, U, V_in, b1_in, W_in, b2_in);
  check_activation(act);
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo info = device_info(x.get_device());
  const DType dt = kernel_dtype(x, "x");
  const Tensor V = V_in.contiguous(), W = W_in.contiguous();
  const Tensor b1 = b1_in ? b1_in->contiguous() : Tensor();
  // b2 in its own dtype: it is keyed by pointer, and forward_loop's copy into y32 converts it.
  const Tensor b2 = b2_in ? b2_in->contiguous() : Tensor();
  const auto opts = x.options();
  const auto f32 = opts.dtype(at::kFloat);

  Tensor z = at::mm(x, U.t());
  if (d.B == 0) {
    Tensor y32 = at::zeros({0, d.C}, f32);
    return {y32, z, false};
  }
  const int64_t n = chunk_h > 0 ? std::min(chunk_h, d.H)
                                : chunk_columns(d.B, d.H, x.element_size(), 1, info.l2_bytes);
  const LoopShape s{d.B, d.k, d.H, d.C, n, static_cast<int>(act), dt};
  const LoopKey key{0, static_cast<int>(x.get_device()), static_cast<int>(dt), static_cast<int>(act),
                    static_cast<int64_t>(c10::cuda::getCurrentCUDAStream().id()), d.B, d.k, d.H, d.C, n,
                    V.const_data_ptr(), W.const_data_ptr(), b1.defined() ? b1.const_data_ptr() : nullptr,
                    b2.defined() ? b2.const_data_ptr() : nullptr};
  auto alloc = [&]() {
    LoopBuffers b;
    b.zp = padded_empty(d.B, d.k, opts);
    set_operand(V, b.Vop, b.Vsrc);
    set_operand(W, b.Wop, b.Wsrc);
    b.b1 = b1;
    b.b2 = b2;
    b.tile_a = at::empty({d.B * aligned_ld(n, x.element_size())}, opts);
    b.scratch = dt == DType::kF32 ? Tensor() : padded_empty(d.B, d.C, f32);
    b.y32 = padded_empty(d.B, d.C, f32);
    return b;
  };
  auto prepare = [&](LoopBuffers& b) { b.zp.copy_(z); };
  auto [buf, from_graph] = run_loop(key, alloc, prepare,
                                    [&](LoopBuffers& b) { forward_loop(s, b, info.num_sms); });
  return {buf.y32, z, from_graph};
}

std::tuple<Tensor, Tensor> mlp_fwd(const Tensor& x, const Tensor& U, const Tensor& V,
                                   const std::optional<Tensor>& b1, const Tensor& W,
                                   const std::optional<Tensor>& b2, int64_t act, int64_t chunk_h) {
  auto [y32, z, from_graph] = forward_f32(x, U, V, b1, W, b2, act, chunk_h);
  (void)from_graph;  // a fresh contiguous copy either way
  return {y32.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous), z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd(
    const Tensor& dy_in, const Tensor& x, const Tensor& z, const Tensor& U, const Tensor& V_in,
    const std::optional<Tensor>& b1_in, const Tensor& W_in, int64_t act, bool has_b2, bool need_dx,
    int64_t chunk_h) {
  const MLPDims d = check_mlp(x, U, V_in, b1_in, W_in, std::nullopt);
  check_activation(act);
  check_cuda(dy_in, "dy", x);
  check_cuda(z, "z", x);
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(0) == d.B && dy_in.size(1) == d.C, "dy has shape ",
              dy_in.sizes(), ": expected (", d.B, ", ", d.C, ")");
  TORCH_CHECK(z.dim() == 2 && z.size(0) == d.B && z.size(1) == d.k, "z has shape ", z.sizes(),
              ": expected (", d.B, ", ", d.k, ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo info = device_info(x.get_device());
  const DType dt = kernel_dtype(x, "x");
  const auto opts = x.options();
  const auto f32 = opts.dtype(at::kFloat);
  const Tensor V = V_in.contiguous(), W = W_in.contiguous();
  const Tensor b1 = b1_in ? b1_in->contiguous() : Tensor();

  Tensor dV, dW, db1, dz32;
  if (d.B == 0) {
    dV = at::zeros({d.H, d.k}, opts);
    dW = at::zeros({d.C, d.H}, opts);
    db1 = b1.defined() ? at::zeros({d.H}, opts) : at::empty({0}, opts);
    dz32 = at::zeros({0, d.k}, f32);
  } else {
    const int64_t n = chunk_h > 0 ? std::min(chunk_h, d.H)
                                  : chunk_columns(d.B, d.H, x.element_size(), 2, info.l2_bytes);
    const LoopShape s{d.B, d.k, d.H, d.C, n, static_cast<int>(act), dt};
    const LoopKey key{1, static_cast<int>(x.get_device()), static_cast<int>(dt), static_cast<int>(act),
                      static_cast<int64_t>(c10::cuda::getCurrentCUDAStream().id()), d.B, d.k, d.H, d.C, n,
                      V.const_data_ptr(), W.const_data_ptr(), b1.defined() ? b1.const_data_ptr() : nullptr,
                      nullptr};
    const int64_t tile = d.B * aligned_ld(n, x.element_size());
    auto alloc = [&]() {
      LoopBuffers b;
      b.zp = padded_empty(d.B, d.k, opts);
      b.dyp = padded_empty(d.B, d.C, opts);
      set_operand(V, b.Vop, b.Vsrc);
      set_operand(W, b.Wop, b.Wsrc);
      b.b1 = b1;
      b.tile_a = at::empty({tile}, opts);
      b.tile_g = at::empty({tile}, opts);
      b.scratch = dt == DType::kF32 ? Tensor() : padded_empty(d.B, d.k, f32);
      b.dVop = padded_empty(d.H, d.k, opts);
      b.dWop = padded_empty(d.C, d.H, opts);
      b.db1 = b1.defined() ? at::empty({d.H}, opts) : at::empty({0}, opts);
      b.dz32 = padded_empty(d.B, d.k, f32);
      return b;
    };
    // The GEMMs take dy and z in the operands' dtype, as autograd hands them to an unfused model.
    auto prepare = [&](LoopBuffers& b) {
      b.zp.copy_(z);
      b.dyp.copy_(dy_in);
    };
    auto [buf, from_graph] = run_loop(key, alloc, prepare,
                                      [&](LoopBuffers& b) { backward_loop(s, b, info.num_sms); });
    auto out = [from_graph = from_graph](const Tensor& t) {
      return from_graph ? t.clone(at::MemoryFormat::Contiguous) : t.contiguous();
    };
    dV = out(buf.dVop);
    dW = out(buf.dWop);
    db1 = out(buf.db1);
    dz32 = buf.dz32;  // consumed below, on this stream, before any later replay can overwrite it
  }
  const Tensor dz = dz32.to(x.scalar_type());
  Tensor dU = at::mm(dz.t(), x);
  Tensor dx = need_dx ? at::mm(dz, U) : at::empty({0}, opts);  // x is data: no dx GEMM, no (B, D)
  Tensor db2 = has_b2 ? at::sum(dy_in, at::IntArrayRef{0}, false, at::kFloat).to(x.scalar_type())
                      : at::empty({0}, opts);
  return {dx, dU, dV, db1, dW, db2};
}

int num_sms_of(const Tensor& t) { return device_info(t.get_device()).num_sms; }

std::tuple<Tensor, Tensor, Tensor> mimic_fwd_op(const Tensor& x, const Tensor& U, const Tensor& V,
                                                const std::optional<Tensor>& b1, const Tensor& W,
                                                const std::optional<Tensor>& b2, const Tensor& t_in,
                                                int64_t act, int64_t reduction, int64_t chunk_h) {
  check_cuda(t_in, "teacher_logits", x);
  check_reduction(reduction);
  const DType t_dt = kernel_dtype(t_in, "teacher_logits");
  auto [y32_loop, z, from_graph] = forward_f32(x, U, V, b1, W, b2, act, chunk_h);
  (void)from_graph;  // y32 is consumed here, on this stream, before a later replay can overwrite it
  const Tensor y32 = y32_loop.contiguous();  // the loss kernel reads dense rows
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = y32.size(0), C = y32.size(1);
  TORCH_CHECK(t_in.dim() == 2 && t_in.size(0) == B && t_in.size(1) == C, "teacher_logits has shape ",
              t_in.sizes(), ": expected (", B, ", ", C, ")");
  const Tensor t = t_in.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  const int sms = num_sms_of(x);
  Tensor dy = at::empty({B, C}, f32);
  Tensor elem = reduction == kNone ? at::empty({B, C}, f32) : Tensor();
  Tensor partials = at::empty({loss_max_blocks(sms)}, f32);
  Tensor loss32 = at::empty({}, f32);
  check_kernel(logit_mse(DType::kF32, y32.const_data_ptr(), t_dt, t.const_data_ptr(), B, C,
                         static_cast<int>(reduction), /*zero_mean=*/false, dy.data_ptr(),
                         elem.defined() ? elem.data_ptr() : nullptr, partials.data_ptr<float>(),
                         loss32.data_ptr<float>(), sms, c10::cuda::getCurrentCUDAStream()),
               "logit_mse");
  Tensor loss = (reduction == kNone ? elem : loss32).to(x.scalar_type());
  return {loss, z, dy};
}

void check_logit_pair(const Tensor& s, const Tensor& t) {
  TORCH_CHECK(s.is_cuda() && t.device() == s.device(), "student_logits and teacher_logits must be on one "
              "CUDA device, got ", s.device(), " and ", t.device());
  TORCH_CHECK(s.dim() == 2 && s.sizes() == t.sizes(), "expected 2-D logits of equal shapes, got ",
              s.sizes(), " and ", t.sizes());
}

std::tuple<Tensor, Tensor> logit_mse_op(const Tensor& s_in, const Tensor& t_in, int64_t reduction,
                                        bool zero_mean) {
  check_logit_pair(s_in, t_in);
  const DType s_dt = kernel_dtype(s_in, "student_logits"), t_dt = kernel_dtype(t_in, "teacher_logits");
  check_reduction(reduction);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous(), t = t_in.contiguous();
  const int64_t rows = s.size(0), cols = s.size(1);
  const int sms = num_sms_of(s);
  const auto f32 = s.options().dtype(at::kFloat);
  Tensor dy = at::empty({rows, cols}, f32);
  Tensor elem = reduction == kNone ? at::empty({rows, cols}, s.options()) : Tensor();
  Tensor partials = at::empty({loss_max_blocks(sms)}, f32);
  Tensor loss32 = at::empty({}, f32);
  check_kernel(logit_mse(s_dt, s.const_data_ptr(), t_dt, t.const_data_ptr(), rows, cols,
                         static_cast<int>(reduction), zero_mean, dy.data_ptr(),
                         elem.defined() ? elem.data_ptr() : nullptr, partials.data_ptr<float>(),
                         loss32.data_ptr<float>(), sms, c10::cuda::getCurrentCUDAStream()),
               "logit_mse");
  return {reduction == kNone ? elem : loss32.to(s.scalar_type()), dy};
}

std::tuple<Tensor, Tensor> kd_loss_op(const Tensor& s_in, const Tensor& t_in, double temperature) {
  check_logit_pair(s_in, t_in);
  const DType s_dt = kernel_dtype(s_in, "student_logits"), t_dt = kernel_dtype(t_in, "teacher_logits");
  TORCH_CHECK(temperature > 0, "temperature must be positive, got ", temperature);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous(), t = t_in.contiguous();
  const int64_t rows = s.size(0), cols = s.size(1);
  const int sms = num_sms_of(s);
  const auto f32 = s.options().dtype(at::kFloat);
  Tensor dy = at::empty({rows, cols}, f32);
  Tensor partials = at::empty({loss_max_blocks(sms)}, f32);
  Tensor loss32 = at::empty({}, f32);
  check_kernel(kd_loss(s_dt, s.const_data_ptr(), t_dt, t.const_data_ptr(), rows, cols,
                       static_cast<float>(temperature), dy.data_ptr(), partials.data_ptr<float>(),
                       loss32.data_ptr<float>(), sms, c10::cuda::getCurrentCUDAStream()),
               "kd_loss");
  return {loss32.to(s.scalar_type()), dy};
}

// The epilogues on their own (out of place), for tests and benchmarks.
Tensor bias_act_op(const Tensor& a, const std::optional<Tensor>& b, int64_t act) {
  check_activation(act);
  TORCH_CHECK(a.is_cuda() && a.dim() == 2, "a must be a 2-D CUDA tensor, got ", a.sizes(), " on ", a.device());
  const DType dt = kernel_dtype(a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  Tensor h = a.contiguous().clone();
  Tensor bc = b ? b->contiguous() : Tensor();
  if (bc.defined()) {
    check_cuda(bc, "b", a);
    TORCH_CHECK(bc.dim() == 1 && bc.size(0) == a.size(1) && bc.scalar_type() == a.scalar_type(),
                "b must be (", a.size(1), ",) of dtype ", a.scalar_type(), ", got ", bc.sizes(), " ",
                bc.scalar_type());
  }
  check_kernel(bias_act_fwd(dt, h.data_ptr(), bias_ptr(bc, 0), a.size(0), a.size(1), a.size(1),
                            static_cast<int>(act), num_sms_of(a), c10::cuda::getCurrentCUDAStream()),
               "bias_act_fwd");
  return h;
}

std::tuple<Tensor, Tensor> bias_act_bwd_op(const Tensor& a, const std::optional<Tensor>& b,
                                           const Tensor& dh, int64_t act) {
  check_activation(act);
  TORCH_CHECK(a.is_cuda() && a.dim() == 2, "a must be a 2-D CUDA tensor, got ", a.sizes(), " on ", a.device());
  check_cuda(dh, "dh", a);
  TORCH_CHECK(dh.sizes() == a.sizes() && dh.scalar_type() == a.scalar_type(), "dh must match a: ",
              a.sizes(), " ", a.scalar_type(), ", got ", dh.sizes(), " ", dh.scalar_type());
  const DType dt = kernel_dtype(a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  Tensor h = a.contiguous().clone(), da = dh.contiguous().clone();
  Tensor bc = b ? b->contiguous() : Tensor();
  if (bc.defined()) {
    check_cuda(bc, "b", a);
    TORCH_CHECK(bc.dim() == 1 && bc.size(0) == a.size(1) && bc.scalar_type() == a.scalar_type(),
                "b must be (", a.size(1), ",) of dtype ", a.scalar_type(), ", got ", bc.sizes(), " ",
                bc.scalar_type());
  }
  check_kernel(bias_act_bwd(dt, h.data_ptr(), da.data_ptr(), bias_ptr(bc, 0), a.size(0), a.size(1),
                            a.size(1), static_cast<int>(act), num_sms_of(a), c10::cuda::getCurrentCUDAStream()),
               "bias_act_bwd");
  return {h, da};
}

// Columns per chunk that the ops would pick on `device` (backward keeps two tiles live).
int64_t chunk_h_op(int64_t B, int64_t H, int64_t elem_bytes, bool backward, int64_t device) {
  return chunk_columns(B, H, elem_bytes, backward ? 2 : 1, device_info(static_cast<int>(device)).l2_bytes);
}

int64_t l2_bytes_op(int64_t device) { return device_info(static_cast<int>(device)).l2_bytes; }

// Turns the loops' CUDA-graph replay on or off (dropping every captured graph); returns the old setting.
bool set_graphs_op(bool enabled) {
  GraphCache& cache = graph_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  const bool old = cache.enabled;
  cache.enabled = enabled;
  cache.entries.clear();
  cache.seen.clear();
  return old;
}

int64_t storage_bytes(const Tensor& t) { return t.defined() ? static_cast<int64_t>(t.storage().nbytes()) : 0; }

// Device memory the held graphs keep for themselves: their static buffers (not the parameters they
// read in place, nor the graphs' private pools of ATen's own workspaces).
int64_t graph_buffer_bytes(const GraphCache& cache) {
  int64_t n = 0;
  for (const auto& kv : cache.entries) {
    const LoopBuffers& b = kv.second.buf;
    for (const Tensor* t : {&b.zp, &b.dyp, &b.tile_a, &b.tile_g, &b.scratch, &b.y32, &b.dVop, &b.dWop, &b.db1,
                            &b.dz32}) {
      n += storage_bytes(*t);
    }
    if (b.Vsrc.defined()) n += storage_bytes(b.Vop);
    if (b.Wsrc.defined()) n += storage_bytes(b.Wop);
  }
  return n;
}

// [enabled, graphs held, captures, replays, eager runs, failed captures, bytes of the held graphs'
// static buffers]; the counters run since the process started.
std::vector<int64_t> graph_stats_op() {
  GraphCache& cache = graph_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  return {cache.enabled ? 1 : 0, static_cast<int64_t>(cache.entries.size()), static_cast<int64_t>(cache.captures),
          static_cast<int64_t>(cache.replays), static_cast<int64_t>(cache.eager),
          static_cast<int64_t>(cache.failures), graph_buffer_bytes(cache)};
}

std::vector<int64_t> built_archs_op() {
  int archs[32];
  const int n = std::min(compiled_archs(archs, 32), 32);
  return std::vector<int64_t>(archs, archs + n);
}

}  // namespace
}  // namespace mimic_fast_cuda

TORCH_LIBRARY_FRAGMENT(mimic_fast, m) {
  m.def("cuda_mlp_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, int activation, "
        "int chunk_h) -> (Tensor, Tensor)");
  m.def("cuda_mlp_bwd(Tensor dy, Tensor x, Tensor z, Tensor U, Tensor V, Tensor? b1, Tensor W, "
        "int activation, bool has_b2, bool need_dx, int chunk_h) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("cuda_mimic_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, Tensor teacher, "
        "int activation, int reduction, int chunk_h) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_logit_mse(Tensor student, Tensor teacher, int reduction, bool zero_mean) -> (Tensor, Tensor)");
  m.def("cuda_kd_loss(Tensor student, Tensor teacher, float temperature) -> (Tensor, Tensor)");
  m.def("cuda_bias_act(Tensor a, Tensor? b, int activation) -> Tensor");
  m.def("cuda_bias_act_bwd(Tensor a, Tensor? b, Tensor dh, int activation) -> (Tensor, Tensor)");
  m.def("cuda_chunk_h(int B, int H, int elem_bytes, bool backward, int device) -> int",
        &mimic_fast_cuda::chunk_h_op);
  m.def("cuda_l2_bytes(int device) -> int", &mimic_fast_cuda::l2_bytes_op);
  m.def("cuda_set_graphs(bool enabled) -> bool", &mimic_fast_cuda::set_graphs_op);
  m.def("cuda_graph_stats() -> int[]", &mimic_fast_cuda::graph_stats_op);
  m.def("cuda_built_archs() -> int[]", &mimic_fast_cuda::built_archs_op);
}

TORCH_LIBRARY_IMPL(mimic_fast, CUDA, m) {
  m.impl("cuda_mlp_fwd", &mimic_fast_cuda::mlp_fwd);
  m.impl("cuda_mlp_bwd", &mimic_fast_cuda::mlp_bwd);
  m.impl("cuda_mimic_fwd", &mimic_fast_cuda::mimic_fwd_op);
  m.impl("cuda_logit_mse", &mimic_fast_cuda::logit_mse_op);
  m.impl("cuda_kd_loss", &mimic_fast_cuda::kd_loss_op);
  m.impl("cuda_bias_act", &mimic_fast_cuda::bias_act_op);
  m.impl("cuda_bias_act_bwd", &mimic_fast_cuda::bias_act_bwd_op);
}
