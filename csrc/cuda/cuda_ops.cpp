// Torch binding of the CUDA backend: torch.ops.mimic_fast.cuda_* (TORCH_LIBRARY_FRAGMENT; the CPU
// extension owns TORCH_LIBRARY(mimic_fast)). The bottleneck MLP is streamed over H in chunks sized
// so that each (B, chunk) tile stays in L2 (cudaDevAttrL2CacheSize): per chunk two or three cuBLAS
// GEMMs through ATen plus one of our elementwise epilogues; backward recomputes the tile.
//
// Design limits: the GEMMs are ATen's/cuBLAS's and the tile makes an L2 round trip between them
// (what a single fused kernel would avoid); y and dz accumulate in float32 across chunks: directly
// (addmm_, beta = 1) for float32, and for bf16/fp16 through mm(out_dtype=float32) into a small
// (B, C) or (B, k) scratch plus add_, because ATen has no half-operand GEMM that accumulates into a
// float32 C. Everything runs on the current stream with no host synchronisation, so a whole
// forward + backward can be captured in a CUDA graph. Only this file includes torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <tuple>
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

// acc (float32) += a @ b with float32 accumulation across calls.
void gemm_accumulate(Tensor& acc, const Tensor& a, const Tensor& b, Tensor& scratch) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);  // beta = 1 inside cuBLAS
  } else {
    at::mm_out(scratch, a, b, at::kFloat);
    acc.add_(scratch);
  }
}

// A contiguous (rows, cols) view of the first rows * cols elements of a flat tile buffer.
Tensor tile_view(const Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

const void* bias_ptr(const Tensor& b, int64_t h0) {
  return b.defined() ? static_cast<const char*>(b.const_data_ptr()) + h0 * b.element_size() : nullptr;
}

// Shared by mlp_fwd and mimic_fwd: y32 = act(x Uᵀ Vᵀ + b1) Wᵀ + b2 in float32, and z = x Uᵀ.
std::tuple<Tensor, Tensor> forward_f32(const Tensor& x, const Tensor& U, const Tensor& V_in,
                                       const std::optional<Tensor>& b1_in, const Tensor& W_in,
                                       const std::optional<Tensor>& b2, int64_t act, int64_t chunk_h) {
  const MLPDims d = check_mlp(x, U, V_in, b1_in, W_in, b2);
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo info = device_info(x.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = kernel_dtype(x, "x");
  const Tensor V = V_in.contiguous(), W = W_in.contiguous();
  const Tensor b1 = b1_in ? b1_in->contiguous() : Tensor();
  const auto f32 = x.options().dtype(at::kFloat);

  Tensor z = at::mm(x, U.t());
  Tensor y32 = b2 ? b2->to(at::kFloat).unsqueeze(0).expand({d.B, d.C}).contiguous()
                  : at::zeros({d.B, d.C}, f32);
  if (d.B == 0) return {y32, z};
  const int64_t n = chunk_h > 0 ? std::min(chunk_h, d.H)
                                : chunk_columns(d.B, d.H, x.element_size(), 1, info.l2_bytes);
  Tensor tile = at::empty({d.B * n}, x.options());
  Tensor scratch = dt == DType::kF32 ? Tensor() : at::empty({d.B, d.C}, f32);
  for (int64_t h0 = 0; h0 < d.H; h0 += n) {
    const int64_t m = std::min(n, d.H - h0);
    Tensor a = tile_view(tile, d.B, m);
    at::mm_out(a, z, V.narrow(0, h0, m).t());
    check_kernel(bias_act_fwd(dt, a.data_ptr(), bias_ptr(b1, h0), d.B, m, static_cast<int>(act),
                              info.num_sms, stream),
                 "bias_act_fwd");
    gemm_accumulate(y32, a, W.narrow(1, h0, m).t(), scratch);
  }
  return {y32, z};
}

std::tuple<Tensor, Tensor> mlp_fwd(const Tensor& x, const Tensor& U, const Tensor& V,
                                   const std::optional<Tensor>& b1, const Tensor& W,
                                   const std::optional<Tensor>& b2, int64_t act, int64_t chunk_h) {
  auto [y32, z] = forward_f32(x, U, V, b1, W, b2, act, chunk_h);
  return {y32.to(x.scalar_type()), z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd(
    const Tensor& dy_in, const Tensor& x, const Tensor& z, const Tensor& U, const Tensor& V_in,
    const std::optional<Tensor>& b1_in, const Tensor& W_in, int64_t act, bool has_b2, int64_t chunk_h) {
  const MLPDims d = check_mlp(x, U, V_in, b1_in, W_in, std::nullopt);
  check_cuda(dy_in, "dy", x);
  check_cuda(z, "z", x);
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(0) == d.B && dy_in.size(1) == d.C, "dy has shape ",
              dy_in.sizes(), ": expected (", d.B, ", ", d.C, ")");
  TORCH_CHECK(z.dim() == 2 && z.size(0) == d.B && z.size(1) == d.k, "z has shape ", z.sizes(),
              ": expected (", d.B, ", ", d.k, ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo info = device_info(x.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = kernel_dtype(x, "x");
  const auto opts = x.options();
  const auto f32 = opts.dtype(at::kFloat);
  const Tensor V = V_in.contiguous(), W = W_in.contiguous();
  const Tensor b1 = b1_in ? b1_in->contiguous() : Tensor();
  // The GEMMs take dy in the operands' dtype, as autograd would hand it to an unfused model.
  const Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  const Tensor zc = z.to(x.scalar_type());

  Tensor dV = at::empty({d.H, d.k}, opts);
  Tensor dW = at::empty({d.C, d.H}, opts);
  Tensor db1 = b1.defined() ? at::empty({d.H}, opts) : at::empty({0}, opts);
  Tensor dz32 = at::zeros({d.B, d.k}, f32);
  if (d.B == 0) {
    dV.zero_();
    dW.zero_();
    db1.zero_();
  } else {
    const int64_t n = chunk_h > 0 ? std::min(chunk_h, d.H)
                                  : chunk_columns(d.B, d.H, x.element_size(), 2, info.l2_bytes);
    Tensor tile_a = at::empty({d.B * n}, opts);
    Tensor tile_g = at::empty({d.B * n}, opts);
    Tensor scratch = dt == DType::kF32 ? Tensor() : at::empty({d.B, d.k}, f32);
    for (int64_t h0 = 0; h0 < d.H; h0 += n) {
      const int64_t m = std::min(n, d.H - h0);
      const Tensor Vj = V.narrow(0, h0, m);
      Tensor a = tile_view(tile_a, d.B, m);
      Tensor g = tile_view(tile_g, d.B, m);
      at::mm_out(a, zc, Vj.t());                // a  = z V_jᵀ          (recomputed)
      at::mm_out(g, dy, W.narrow(1, h0, m));    // dh = dy W_j
      check_kernel(bias_act_bwd(dt, a.data_ptr(), g.data_ptr(), bias_ptr(b1, h0), d.B, m,
                                static_cast<int>(act), info.num_sms, stream),
                   "bias_act_bwd");            // a <- h = act(a + b1),  g <- da = dh act'(a + b1)
      Tensor dW_j = dW.narrow(1, h0, m);        // strided (ld = H): cuBLAS writes it in place
      at::mm_out(dW_j, dy.t(), a);
      Tensor dV_j = dV.narrow(0, h0, m);
      at::mm_out(dV_j, g.t(), zc);
      if (b1.defined()) {
        Tensor db1_j = db1.narrow(0, h0, m);
        at::sum_out(db1_j, g, {0});
      }
      gemm_accumulate(dz32, g, Vj, scratch);
    }
  }
  const Tensor dz = dz32.to(x.scalar_type());
  Tensor dU = at::mm(dz.t(), x);
  Tensor dx = at::mm(dz, U);
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
  const DType t_dt = kernel_dtype(t_in, "teacher_logits");
  auto [y32, z] = forward_f32(x, U, V, b1, W, b2, act, chunk_h);
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
  TORCH_CHECK(reduction >= kMean && reduction <= kNone, "reduction code must be 0, 1 or 2, got ", reduction);
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
  check_kernel(bias_act_fwd(dt, h.data_ptr(), bias_ptr(bc, 0), a.size(0), a.size(1), static_cast<int>(act),
                            num_sms_of(a), c10::cuda::getCurrentCUDAStream()),
               "bias_act_fwd");
  return h;
}

std::tuple<Tensor, Tensor> bias_act_bwd_op(const Tensor& a, const std::optional<Tensor>& b,
                                           const Tensor& dh, int64_t act) {
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
                            static_cast<int>(act), num_sms_of(a), c10::cuda::getCurrentCUDAStream()),
               "bias_act_bwd");
  return {h, da};
}

// Columns per chunk that the ops would pick on `device` (backward keeps two tiles live).
int64_t chunk_h_op(int64_t B, int64_t H, int64_t elem_bytes, bool backward, int64_t device) {
  return chunk_columns(B, H, elem_bytes, backward ? 2 : 1, device_info(static_cast<int>(device)).l2_bytes);
}

int64_t l2_bytes_op(int64_t device) { return device_info(static_cast<int>(device)).l2_bytes; }

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
        "int activation, bool has_b2, int chunk_h) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_mimic_fwd(Tensor x, Tensor U, Tensor V, Tensor? b1, Tensor W, Tensor? b2, Tensor teacher, "
        "int activation, int reduction, int chunk_h) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_logit_mse(Tensor student, Tensor teacher, int reduction, bool zero_mean) -> (Tensor, Tensor)");
  m.def("cuda_kd_loss(Tensor student, Tensor teacher, float temperature) -> (Tensor, Tensor)");
  m.def("cuda_bias_act(Tensor a, Tensor? b, int activation) -> Tensor");
  m.def("cuda_bias_act_bwd(Tensor a, Tensor? b, Tensor dh, int activation) -> (Tensor, Tensor)");
  m.def("cuda_chunk_h(int B, int H, int elem_bytes, bool backward, int device) -> int",
        &mimic_fast_cuda::chunk_h_op);
  m.def("cuda_l2_bytes(int device) -> int", &mimic_fast_cuda::l2_bytes_op);
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
