// NF4 family: argument checks, device dispatch and the GEMM paths around the kernels of
// csrc/cpu/nf4*.cpp and csrc/cuda/nf4.cu. Many rows go through a blocked 4-bit GEMM that
// decodes tiles of W on the fly: csrc/cpu/nf4_gemm.cpp, or the tiled kernel of nf4.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "aten_glue.h"
#include <cstdlib>
#include <limits>

#include "core/nf4.h"
#include "cpu/nf4.h"

#ifdef LORA_EXT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/nf4.cuh"
#endif

namespace lora_ext {
namespace {

using at::Tensor;

#ifdef LORA_EXT_WITH_CUDA
#define LORA_EXT_CUDA_CALL(device, ...)                       \
  do {                                                        \
    const c10::cuda::CUDAGuard guard(device);                 \
    C10_CUDA_CHECK(__VA_ARGS__);                              \
  } while (0)
#define LORA_EXT_STREAM c10::cuda::getCurrentCUDAStream()
#endif

[[noreturn, maybe_unused]] void no_cuda() { TORCH_CHECK(false, "lora_ext was built without CUDA kernels"); }

void check_float(const char* op, const char* name, const Tensor& t) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": ", name,
              " has dtype ", type, "; expected float32, float16 or bfloat16");
}

void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK(core::nf4_blocksize_ok(blocksize), op,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
}

void check_packed(const char* op, const Tensor& packed, const Tensor& absmax, int64_t n,
                  int64_t blocksize) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(packed.numel() == (n + 1) / 2, op, ": packed has ", packed.numel(),
              " bytes but ", n, " elements pack into ", (n + 1) / 2);
  TORCH_CHECK(absmax.numel() == (n + blocksize - 1) / blocksize, op, ": absmax has ",
              absmax.numel(), " values but ", n, " elements make ",
              (n + blocksize - 1) / blocksize, " blocks of ", blocksize);
  TORCH_CHECK(packed.device() == absmax.device(), op, ": packed and absmax are on different devices");
}

// out[i, j] = element (row0 + i) * row_len + col0 + j of the NF4 tensor (out contiguous).
void dequantize_2d(const Tensor& packed, const Tensor& absmax, int64_t blocksize, int64_t row_len,
                   int64_t row0, int64_t col0, Tensor& out) {
  if (out.numel() == 0) return;
  if (out.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    LORA_EXT_CUDA_CALL(out.device(), cuda::launch_nf4_dequantize_2d(
        cuda_dtype(out.scalar_type()), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
        blocksize, row_len, row0, col0, out.size(0), out.size(1), out.data_ptr(), LORA_EXT_STREAM));
#else
    no_cuda();
#endif
  } else {
    cpu::nf4_dequantize_2d(packed, absmax, blocksize, row_len, row0, col0, out);
  }
}

// The CUDA tiled GEMM takes up to this many rows; more go through dequantised tiles of W and
// cuBLAS (gemm_forward, and the slabs of nf4_matmul_grad_input). Default 128: there the tiled
// GEMM reads 4x fewer bytes than dense tiles, while from a few hundred rows on (training) the
// GEMM is compute-bound and cuBLAS, with its pipelining, is expected to win; neither has run on
// a GPU yet. LORA_EXT_NF4_CUDA_GEMM_ROWS=N sets it, so that a GPU run can compare the paths.
int64_t cuda_gemm_max_rows() {
  static const int64_t rows = [] {
    const char* env = std::getenv("LORA_EXT_NF4_CUDA_GEMM_ROWS");
    if (env == nullptr || *env == '\0') return int64_t{128};
    const long long v = std::atoll(env);
    return v >= 0 ? static_cast<int64_t>(v) : std::numeric_limits<int64_t>::max();
  }();
  return rows;
}

// Bytes of dequantised weight per tile of the cuBLAS path: tiles bound the transient memory
// (a layer never holds a dense copy of its whole weight). LORA_EXT_NF4_TILE_BYTES overrides it.
int64_t tile_bytes() {
  static const int64_t env_bytes = [] {
    const char* env = std::getenv("LORA_EXT_NF4_TILE_BYTES");
    const long long v = env ? std::atoll(env) : 0;
    return static_cast<int64_t>(v > 0 ? v : 0);
  }();
  return env_bytes > 0 ? env_bytes : int64_t{64} << 20;
}

// Up to this many rows of x go through the GEMV kernels (the weight decoded in registers);
// more go through the GEMM path. The CPU crossovers against the blocked GEMM were measured on
// 4096x4096 (lora-ext bench --family nf4). LORA_EXT_NF4_GEMV_ROWS overrides the CPU's.
int64_t gemv_max_rows(const Tensor& x2d) {
#ifdef LORA_EXT_WITH_CUDA
  if (x2d.is_cuda()) return cuda::kGemvMaxRows;
#endif
  static const int64_t env_rows = [] {
    const char* env = std::getenv("LORA_EXT_NF4_GEMV_ROWS");
    return env ? static_cast<int64_t>(std::atoll(env)) : int64_t{-1};
  }();
  if (env_rows >= 0) return env_rows;
  return 4;  // fp32 (AVX-512 or AVX2) and bf16 (AVX512-BF16) alike
}

std::tuple<Tensor, Tensor> nf4_quantize(const Tensor& x, int64_t blocksize) {
  check_float("nf4_quantize", "x", x);
  check_blocksize("nf4_quantize", blocksize);
  const Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  if (x.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    LORA_EXT_CUDA_CALL(x.device(), cuda::launch_nf4_quantize(
        cuda_dtype(x.scalar_type()), xc.data_ptr(), n, blocksize, packed.data_ptr<uint8_t>(),
        absmax.data_ptr<float>(), LORA_EXT_STREAM));
#else
    no_cuda();
#endif
  } else {
    cpu::nf4_quantize(xc, blocksize, packed, absmax);
  }
  return {packed, absmax};
}

Tensor nf4_dequantize(const Tensor& packed, const Tensor& absmax, at::IntArrayRef shape,
                      int64_t blocksize, at::ScalarType dtype) {
  check_blocksize("nf4_dequantize", blocksize);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "nf4_dequantize: dtype must be float32, float16 or bfloat16, got ", dtype);
  int64_t n = 1;
  for (const int64_t s : shape) {
    TORCH_CHECK(s >= 0, "nf4_dequantize: negative size in shape ", shape);
    n *= s;
  }
  check_packed("nf4_dequantize", packed, absmax, n, blocksize);
  Tensor out = at::empty(shape, packed.options().dtype(dtype));
  if (n == 0) return out;
  const Tensor p = packed.contiguous(), a = absmax.contiguous();
  if (out.is_cuda()) {
    Tensor flat = out.view({1, n});
    dequantize_2d(p, a, blocksize, n, 0, 0, flat);
  } else {
    cpu::nf4_dequantize(p, a, blocksize, out);
  }
  return out;
}

// out (fp32/fp16/bf16, any shape and strides) = every element of the NF4 tensor, in row-major
// order, written into out's own memory.
void nf4_dequantize_out(const Tensor& packed, const Tensor& absmax, int64_t blocksize, Tensor out) {
  const char* op = "nf4_dequantize_out";
  check_blocksize(op, blocksize);
  check_float(op, "out", out);
  const int64_t n = out.numel();
  check_packed(op, packed, absmax, n, blocksize);
  TORCH_CHECK(out.device() == packed.device(), op, ": out is on ", out.device(), " but packed is on ",
              packed.device());
  if (n == 0) return;
  const Tensor p = packed.contiguous(), a = absmax.contiguous();
  Tensor dst = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
  if (dst.is_cuda()) {
    Tensor flat = dst.view({1, n});
    dequantize_2d(p, a, blocksize, n, 0, 0, flat);
  } else {
    cpu::nf4_dequantize(p, a, blocksize, dst);
  }
  if (!dst.is_same(out)) out.copy_(dst);
}

void check_matmul(const char* op, const Tensor& x, const Tensor& packed, const Tensor& absmax,
                  int64_t rows_w, int64_t cols_w, int64_t blocksize) {
  check_float(op, "x", x);
  check_blocksize(op, blocksize);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(rows_w >= 1 && cols_w >= 0, op, ": weight must be [out >= 1, in]");
  check_packed(op, packed, absmax, rows_w * cols_w, blocksize);
  TORCH_CHECK(packed.device() == x.device(), op, ": packed is on ", packed.device(),
              " but x is on ", x.device());
}

// y2d [rows, out] (x's dtype) = x2d @ W.T (+ bias) through dequantised row tiles of W.
Tensor gemm_forward(const Tensor& x2d, const Tensor& packed, const Tensor& absmax, int64_t out,
                    int64_t blocksize, const std::optional<Tensor>& bias) {
  const int64_t rows = x2d.size(0), in = x2d.size(1);
  Tensor y = at::empty({rows, out}, x2d.options());
  const int64_t tile = std::max<int64_t>(
      1, std::min(out, tile_bytes() / std::max<int64_t>(1, in * x2d.element_size())));
  Tensor buffer = at::empty({tile, in}, x2d.options());
  const bool has_bias = bias.has_value() && bias->defined();
  for (int64_t o0 = 0; o0 < out; o0 += tile) {
    const int64_t t = std::min(tile, out - o0);
    Tensor w = buffer.narrow(0, 0, t);
    dequantize_2d(packed, absmax, blocksize, in, o0, 0, w);
    Tensor y_tile = t == out ? y : y.narrow(1, o0, t);
    if (has_bias) {
      at::addmm_out(y_tile, bias->narrow(0, o0, t), x2d, w.t());
    } else {
      at::mm_out(y_tile, x2d, w.t());
    }
  }
  return y;
}

Tensor nf4_matmul(const Tensor& x, const Tensor& packed, const Tensor& absmax, int64_t out_features,
                  int64_t blocksize, const std::optional<Tensor>& bias) {
  const char* op = "nf4_matmul";
  const int64_t in = x.dim() >= 1 ? x.size(-1) : 0;
  check_matmul(op, x, packed, absmax, out_features, in, blocksize);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from x's ", x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must be [",
                out_features, "], got ", bias->sizes());
  }
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out_features;
  const Tensor x2d = x.reshape({-1, in});
  const int64_t rows = x2d.size(0);
  if (rows == 0) return at::empty(y_shape, x.options());
  if (in == 0) {
    Tensor y = at::zeros({rows, out_features}, x.options());
    if (has_bias) y.add_(*bias);
    return y.view(y_shape);
  }
  const Tensor p = packed.contiguous(), a = absmax.contiguous();
  if (rows > gemv_max_rows(x2d)) {
    if (x.is_cuda()) {
      const Tensor x2dc = x2d.contiguous();
      if (rows > cuda_gemm_max_rows()) return gemm_forward(x2dc, p, a, out_features, blocksize, bias).view(y_shape);
#ifdef LORA_EXT_WITH_CUDA
      Tensor y = at::empty({rows, out_features}, x.options());
      const Tensor b = has_bias ? bias->contiguous() : Tensor();
      Tensor workspace = at::empty({cuda::nf4_gemm_workspace(rows, in, out_features)}, x.options().dtype(at::kFloat));
      LORA_EXT_CUDA_CALL(x.device(), cuda::launch_nf4_gemm(
          cuda_dtype(x.scalar_type()), x2dc.data_ptr(), rows, in, p.data_ptr<uint8_t>(), a.data_ptr<float>(),
          blocksize, has_bias ? b.data_ptr() : nullptr, y.data_ptr(), out_features,
          workspace.numel() > 0 ? workspace.data_ptr<float>() : nullptr, LORA_EXT_STREAM));
      return y.view(y_shape);
#else
      no_cuda();
#endif
    }
    // The blocked GEMM copies x into its own padded fp32/bf16 rows: any strides will do.
    Tensor y = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
    cpu::nf4_gemm(x2d, p, a, blocksize, y);
    if (has_bias) y.add_(bias->to(at::kFloat));
    return (x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type())).view(y_shape);
  }
  const Tensor x2dc = x2d.contiguous();
  if (x.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    Tensor y = at::empty({rows, out_features}, x.options());
    const Tensor b = has_bias ? bias->contiguous() : Tensor();
    LORA_EXT_CUDA_CALL(x.device(), cuda::launch_nf4_gemv(
        cuda_dtype(x.scalar_type()), x2dc.data_ptr(), rows, in, p.data_ptr<uint8_t>(),
        a.data_ptr<float>(), blocksize, has_bias ? b.data_ptr() : nullptr, y.data_ptr(),
        out_features, LORA_EXT_STREAM));
    return y.view(y_shape);
#else
    no_cuda();
#endif
  }
  Tensor y = at::empty({rows, out_features}, x2d.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16 && cpu::nf4_gemv_bf16_supported(in)) {
    cpu::nf4_gemv_bf16(x2dc, p, a, blocksize, y);
  } else {
    cpu::nf4_gemv(x2dc.to(at::kFloat).contiguous(), p, a, blocksize, y);
  }
  if (has_bias) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type()).view(y_shape);
}

// grad_x [..., in] = grad_y [..., out] @ W, fp32 accumulation. CPU: the blocked kernel. CUDA:
// the tiled kernel, or past cuda_gemm_max_rows() column slabs of W through cuBLAS, so that
// every slab writes its own columns of grad_x and nothing is accumulated in low precision.
Tensor nf4_matmul_grad_input(const Tensor& grad_y, const Tensor& packed, const Tensor& absmax,
                             int64_t in_features, int64_t blocksize) {
  const char* op = "nf4_matmul_grad_input";
  const int64_t out = grad_y.dim() >= 1 ? grad_y.size(-1) : 0;
  check_matmul(op, grad_y, packed, absmax, out, in_features, blocksize);
  std::vector<int64_t> shape(grad_y.sizes().begin(), grad_y.sizes().end());
  shape.back() = in_features;
  const Tensor g2d = grad_y.reshape({-1, out}).contiguous();
  const int64_t rows = g2d.size(0);
  Tensor grad_x = at::empty({rows, in_features}, grad_y.options());
  if (rows == 0 || in_features == 0) return grad_x.view(shape);
  const Tensor p = packed.contiguous(), a = absmax.contiguous();
  if (!g2d.is_cuda()) {
    cpu::nf4_gemm_grad_input(g2d, p, a, blocksize, grad_x);
    return grad_x.view(shape);
  }
  if (rows <= cuda_gemm_max_rows()) {
#ifdef LORA_EXT_WITH_CUDA
    Tensor workspace = at::empty({cuda::nf4_gemm_workspace(rows, out, in_features)}, g2d.options().dtype(at::kFloat));
    LORA_EXT_CUDA_CALL(g2d.device(), cuda::launch_nf4_gemm_grad_input(
        cuda_dtype(g2d.scalar_type()), g2d.data_ptr(), rows, out, p.data_ptr<uint8_t>(), a.data_ptr<float>(),
        blocksize, grad_x.data_ptr(), in_features, workspace.numel() > 0 ? workspace.data_ptr<float>() : nullptr,
        LORA_EXT_STREAM));
    return grad_x.view(shape);
#else
    no_cuda();
#endif
  }
  const int64_t slab = std::max<int64_t>(
      1, std::min(in_features, tile_bytes() / std::max<int64_t>(1, out * g2d.element_size())));
  Tensor buffer = at::empty({out, slab}, g2d.options());
  for (int64_t k0 = 0; k0 < in_features; k0 += slab) {
    const int64_t t = std::min(slab, in_features - k0);
    Tensor w = t == slab ? buffer : buffer.narrow(1, 0, t).contiguous();
    dequantize_2d(p, a, blocksize, in_features, 0, k0, w);
    Tensor g_tile = t == in_features ? grad_x : grad_x.narrow(1, k0, t);
    at::mm_out(g_tile, g2d, w);
  }
  return grad_x.view(shape);
}

std::tuple<Tensor, Tensor, Tensor> nf4_quantize_absmax(const Tensor& absmax, const Tensor& code,
                                                       int64_t blocksize) {
  const char* op = "nf4_quantize_absmax";
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(absmax.numel() > 0, op, ": absmax is empty");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == core::kDynamicCodes, op,
              ": code must be 256 float32 values, got ", code.numel(), " of ", code.scalar_type());
  TORCH_CHECK(blocksize >= 1, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(code.device() == absmax.device(), op, ": code and absmax are on different devices");
  const Tensor flat = absmax.reshape({-1});
  // bitsandbytes centres with torch's own mean, so this is that very reduction.
  Tensor offset = flat.mean();
  const Tensor centred = (flat - offset).contiguous();
  const int64_t n = centred.numel();
  Tensor codes = at::empty({n}, absmax.options().dtype(at::kByte));
  Tensor absmax2 = at::empty({(n + blocksize - 1) / blocksize}, absmax.options());
  const Tensor table = code.contiguous();
  if (absmax.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    LORA_EXT_CUDA_CALL(absmax.device(), cuda::launch_quantize_absmax(
        centred.data_ptr<float>(), n, table.data_ptr<float>(), blocksize,
        codes.data_ptr<uint8_t>(), absmax2.data_ptr<float>(), LORA_EXT_STREAM));
#else
    no_cuda();
#endif
  } else {
    cpu::quantize_absmax(centred, table, blocksize, codes, absmax2);
  }
  return {codes, absmax2, offset};
}

Tensor nf4_dequantize_absmax(const Tensor& codes, const Tensor& absmax2, const Tensor& offset,
                             const Tensor& code, int64_t blocksize) {
  const char* op = "nf4_dequantize_absmax";
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8");
  TORCH_CHECK(absmax2.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat, op,
              ": absmax2 and offset must be float32");
  TORCH_CHECK(offset.numel() == 1, op, ": offset must hold one value");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == core::kDynamicCodes, op,
              ": code must be 256 float32 values");
  TORCH_CHECK(blocksize >= 1, op, ": blocksize must be positive");
  const int64_t n = codes.numel();
  TORCH_CHECK(absmax2.numel() == (n + blocksize - 1) / blocksize, op, ": absmax2 has ",
              absmax2.numel(), " values but ", n, " codes need ", (n + blocksize - 1) / blocksize);
  Tensor out = at::empty({n}, absmax2.options());
  if (n == 0) return out;
  const Tensor q = codes.contiguous(), a2 = absmax2.contiguous(), table = code.contiguous();
  if (codes.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const Tensor off = offset.reshape({1}).contiguous();
    LORA_EXT_CUDA_CALL(codes.device(), cuda::launch_dequantize_absmax(
        q.data_ptr<uint8_t>(), n, a2.data_ptr<float>(), off.data_ptr<float>(),
        table.data_ptr<float>(), blocksize, out.data_ptr<float>(), LORA_EXT_STREAM));
#else
    no_cuda();
#endif
  } else {
    cpu::dequantize_absmax(q, a2, offset.item<float>(), table, blocksize, out);
  }
  return out;
}

}  // namespace
}  // namespace lora_ext

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("nf4_quantize", &lora_ext::nf4_quantize);
  m.impl("nf4_dequantize", &lora_ext::nf4_dequantize);
  m.impl("nf4_dequantize_out", &lora_ext::nf4_dequantize_out);
  m.impl("nf4_matmul", &lora_ext::nf4_matmul);
  m.impl("nf4_matmul_grad_input", &lora_ext::nf4_matmul_grad_input);
  m.impl("nf4_quantize_absmax", &lora_ext::nf4_quantize_absmax);
  m.impl("nf4_dequantize_absmax", &lora_ext::nf4_dequantize_absmax);
}

#ifdef LORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("nf4_quantize", &lora_ext::nf4_quantize);
  m.impl("nf4_dequantize", &lora_ext::nf4_dequantize);
  m.impl("nf4_dequantize_out", &lora_ext::nf4_dequantize_out);
  m.impl("nf4_matmul", &lora_ext::nf4_matmul);
  m.impl("nf4_matmul_grad_input", &lora_ext::nf4_matmul_grad_input);
  m.impl("nf4_quantize_absmax", &lora_ext::nf4_quantize_absmax);
  m.impl("nf4_dequantize_absmax", &lora_ext::nf4_dequantize_absmax);
}
#endif
