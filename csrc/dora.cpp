// DoRA: the weight norm ‖W + s·B·A‖ per output row (kernels in csrc/cpu/dora.cpp and
// csrc/cuda/dora.cu), and the DoRA linear forward/backward, whose GEMMs run through ATen
// around the Philox dropout kernels of the fused LoRA linear and, with dropout, the kernels of
// the sparse correction (csrc/cpu/dora_dropout.cpp, csrc/cuda/dora_dropout.cu).
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "aten_glue.h"
#include "core/dropout.h"
#include "cpu/dora.h"
#include "cpu/dora_dropout.h"
#include "cpu/lora_fused.h"
#include "cpu/lora_linear.h"

#ifdef LORA_EXT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/dora.cuh"
#include "cuda/dora_dropout.cuh"
#include "cuda/lora_linear.cuh"
#endif

#include <cstdlib>
#include <cstring>

namespace lora_ext {
namespace {

using at::Tensor;

at::ScalarType acc_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

void check_factors(const char* op, const Tensor& weight, const Tensor& lora_A,
                   const Tensor& lora_B) {
  TORCH_CHECK(weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2, op,
              ": weight, lora_A and lora_B must be 2-D");
  const int64_t in = weight.size(1), out = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(lora_A.size(1) == in, op, ": lora_A must be [r, ", in, "], got ", lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == out && lora_B.size(1) == r, op, ": lora_B must be [", out, ", ",
              r, "], got ", lora_B.sizes());
  TORCH_CHECK(weight.scalar_type() == lora_A.scalar_type() &&
                  weight.scalar_type() == lora_B.scalar_type(),
              op, ": weight, lora_A and lora_B must share one dtype");
}

// ‖W + s·B·A‖ per row of W [out, in], in the accumulation type. W is read in place when
// its rows or its columns are contiguous (Conv1D and embedding tables store Wᵀ).
Tensor dora_weight_norm(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
                        double scaling) {
  check_factors("dora_weight_norm", weight, lora_A, lora_B);
  const auto acc = acc_type(weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  const bool rows_contiguous =
      weight.stride(1) == 1 && (out <= 1 || weight.stride(0) >= in);
  const bool columns_contiguous =
      !rows_contiguous && weight.stride(0) == 1 && (in <= 1 || weight.stride(1) >= out);
  Tensor m, p, q;
  if (columns_contiguous) {  // M = Wᵀ [in, out]: column sums of Wᵀ + Aᵀ·(s·Bᵀ)
    m = weight.t();
    p = lora_A.t().to(acc).contiguous();
    q = lora_B.t().to(acc).mul(scaling).contiguous();
  } else {  // M = W [out, in]: row sums of W + (s·B)·A
    m = rows_contiguous ? weight : weight.contiguous();
    p = lora_B.to(acc).mul(scaling).contiguous();
    q = lora_A.to(acc).contiguous();
  }
  Tensor sums = at::empty({out}, weight.options().dtype(acc));
  if (weight.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(weight.device());
    const int64_t partials = cuda::dora_partial_count(m.size(0), m.size(1), columns_contiguous);
    Tensor scratch = at::empty({partials * out}, sums.options());
    C10_CUDA_CHECK(cuda::launch_dora_sum_squares(
        cuda_dtype(weight.scalar_type()), m.data_ptr(), m.size(0), m.size(1), m.stride(0),
        p.data_ptr(), q.data_ptr(), static_cast<int>(p.size(1)), columns_contiguous,
        scratch.data_ptr(), sums.data_ptr(), c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    cpu::dora_sum_squares(m, p, q, columns_contiguous, sums);
  }
  return sums.sqrt_();
}

void check_linear(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B, const Tensor& magnitude, const Tensor& weight_norm,
                  double dropout_p) {
  check_factors("dora_linear", weight, lora_A, lora_B);
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "dora_linear: x must be [..., ", in, "]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  magnitude.scalar_type() == weight.scalar_type(),
              "dora_linear: x, weight and magnitude must share one dtype");
  TORCH_CHECK(magnitude.dim() == 1 && magnitude.size(0) == out, "dora_linear: magnitude must be [",
              out, "]");
  TORCH_CHECK(weight_norm.dim() == 1 && weight_norm.size(0) == out,
              "dora_linear: weight_norm must be [", out, "]");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dora_linear: dropout_p must be in [0, 1)");
}

// g = magnitude / ‖W + s·B·A‖, computed in the accumulation type, used in x's dtype.
// The dtype of the base GEMMs: on CPU, half types without native arithmetic run in fp32
// (PyTorch's own bf16 GEMM is about 45x slower than fp32 on AVX2-only CPUs).
at::ScalarType gemm_type(const Tensor& x) {
  return x.is_cuda() ? x.scalar_type() : cpu::base_gemm_type(x.scalar_type());
}

Tensor magnitude_scale(const Tensor& magnitude, const Tensor& weight_norm, at::ScalarType dtype) {
  const auto acc = acc_type(dtype);
  return magnitude.to(acc).div(weight_norm.to(acc)).to(dtype);
}

// Whether dropout takes the sparse correction: drop(x)·Wᵀ = (x·Wᵀ - (x ⊙ (1 - m))·Wᵀ) / q from
// the base output and a product over the dropped elements, about p of a dense GEMM. Above
// p = 0.5 the dense product is less work, and more accurate: the correction divides the base
// output's rounding error by q. On CUDA it is the default for fp32 and fp64 only: for fp16 and
// bf16, cuBLAS's tensor cores are expected to beat the correction's scattered reads of Wᵀ
// (one per dropped element and column, from L2), which is not yet measured on a GPU;
// LORA_EXT_DORA_CUDA_SPARSE=1 (or 0) takes (or avoids) it for every dtype.
bool sparse_correction(const Tensor& x, double dropout_p) {
  if (dropout_p == 0.0 || dropout_p > 0.5) return false;
  if (!x.is_cuda()) return true;
  // Read at every call (a getenv), so that a process can compare both paths.
  const char* value = std::getenv("LORA_EXT_DORA_CUDA_SPARSE");
  if (value != nullptr && value[0] != '\0' && std::strcmp(value, "auto") != 0) {
    TORCH_CHECK(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0,
                "LORA_EXT_DORA_CUDA_SPARSE='", value, "' must be 0, 1 or auto (unset: auto)");
    return value[0] == '1';
  }
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
}

#ifdef LORA_EXT_WITH_CUDA
// The dropped elements of a [rows, in] mask as bits (cuda/dora_dropout.cuh), made once per call.
Tensor cuda_dropped_bits(const Tensor& like, int64_t rows, int64_t in, const core::DropoutParams& params) {
  Tensor bits = at::empty({rows * cuda::dora_dropped_words(in)}, like.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::launch_dora_dropped_bits(reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>()), rows,
                                                in, params, c10::cuda::getCurrentCUDAStream()));
  return bits;
}
#endif

// Without dropout:  h = x·Wᵀ + s·z·Bᵀ (z = x·Aᵀ),      y = g ⊙ h + b,          hm = h.
// With dropout:     hd = d·Wᵀ + s·z·Bᵀ (z = d·Aᵀ),    y = x·Wᵀ + b + s·z·Bᵀ + (g - 1) ⊙ hd,  hm = hd.
// Both equal PEFT's base(x) + (g - 1)·base_noBias(drop(x)) + g·s·B(A(drop(x))). hm is what g
// multiplies: the magnitude's gradient is colsum(grad_y ⊙ hm) / ‖·‖.
std::tuple<Tensor, Tensor, Tensor> dora_linear_forward(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& magnitude, const Tensor& weight_norm, double scaling,
    double dropout_p, const Tensor& seed_tensor, int64_t offset) {
  check_linear(x, weight, lora_A, lora_B, magnitude, weight_norm, dropout_p);
  const int64_t seed = dropout_seed(seed_tensor, dropout_p);
  // The op runs in the dtypes it is given (autocast casts at its boundary, see ops/): the
  // GEMMs inside must not be cast again, here or in the CPU kernels' worker threads.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t in = weight.size(1), out = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor x2d = x.reshape({-1, in});
  const Tensor g = magnitude_scale(magnitude, weight_norm, x.scalar_type());
  const Tensor scaled_B_t = lora_B.t() * scaling;  // scale the [out, r] factor, not an output
  const auto gemm = gemm_type(x);
  Tensor y, z, hm;
  if (dropout_p == 0.0) {
    z = at::mm(x2d, lora_A.t());
    hm = at::mm(z.to(gemm), scaled_B_t.to(gemm));
    hm.addmm_(x2d.to(gemm), weight.to(gemm).t());  // the only big GEMM: x·Wᵀ serves both terms
    hm = hm.to(x.scalar_type());
    y = has_bias ? at::addcmul(*bias, hm, g) : hm * g;
  } else if (sparse_correction(x, dropout_p) && !x.is_cuda()) {
    // drop(x)·Wᵀ = (x·Wᵀ - (x ⊙ (1 - m))·Wᵀ) / q: the base GEMM serves both terms and the rest
    // is a product over the dropped elements only.
    const auto params = core::make_dropout_params(dropout_p, seed, offset);
    const auto acc = acc_type(x.scalar_type());
    const Tensor z_acc = cpu::fused_shrink(x2d, lora_A, dropout_p, params);
    // x·Wᵀ in the GEMM's dtype, then y in place: the low-rank term, the correction and the bias
    // are added per block of columns, with no [rows, out] temporary.
    Tensor y_g = at::mm(x2d.to(gemm), weight.to(gemm).t());  // the GEMM dtype: acc, or native bf16
    const Tensor hd = cpu::dropout_corrected_outputs(
        x2d, weight, y_g, z_acc, scaled_B_t.to(acc), g.to(acc) - 1, has_bias ? *bias : Tensor(), dropout_p,
        cpu::DroppedElements(x2d.size(0), in, params));
    z = z_acc.to(x.scalar_type());
    hm = hd.to(x.scalar_type());
    y = y_g.to(x.scalar_type());
  } else if (sparse_correction(x, dropout_p)) {
#ifdef LORA_EXT_WITH_CUDA
    // The same correction on CUDA: x·Wᵀ from cuBLAS, then one kernel forms the product over the
    // dropped elements and the DoRA outputs from it (y in place of x·Wᵀ).
    const c10::cuda::CUDAGuard guard(x.device());
    const auto params = core::make_dropout_params(dropout_p, seed, offset);
    const Tensor x_contig = x2d.contiguous();
    const int64_t rows = x_contig.size(0);
    z = shrink_dropout(x_contig, lora_A, dropout_p, params);
    const Tensor low_rank = at::mm(z, scaled_B_t);
    y = at::mm(x_contig, weight.t());
    hm = at::empty_like(y);
    const Tensor wt = weight.t().contiguous();
    const Tensor g_minus_1 = (g.to(acc_type(x.scalar_type())) - 1).contiguous();
    const Tensor bias_c = has_bias ? bias->to(x.scalar_type()).contiguous() : Tensor();
    TORCH_CHECK(!has_bias || bias_c.numel() == out, "dora_linear: bias must be [", out, "]");
    const Tensor bits = cuda_dropped_bits(x, rows, in, params);
    C10_CUDA_CHECK(cuda::launch_dora_dropout_outputs(
        cuda_dtype(x.scalar_type()), x_contig.const_data_ptr(), wt.const_data_ptr(), y.mutable_data_ptr(),
        low_rank.const_data_ptr(), g_minus_1.const_data_ptr(), has_bias ? bias_c.const_data_ptr() : nullptr,
        hm.mutable_data_ptr(), reinterpret_cast<const uint32_t*>(bits.const_data_ptr<int32_t>()), rows, in,
        out, 1.0 - dropout_p, c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    // The dense product: drop(x) materialised and multiplied by Wᵀ a second time.
    const auto params = core::make_dropout_params(dropout_p, seed, offset);
    const Tensor x_contig = x2d.contiguous();
    const Tensor dropped = at::empty_like(x_contig);
    dropout_apply(x_contig, dropped, Tensor(), params);
    const Tensor w = weight.to(gemm);
    z = at::mm(dropped, lora_A.t());
    Tensor y_g = at::mm(z.to(gemm), scaled_B_t.to(gemm));
    const Tensor hm_g = at::addmm(y_g, dropped.to(gemm), w.t());
    if (has_bias) y_g.add_(*bias);
    y_g.addmm_(x2d.to(gemm), w.t());
    y_g.addcmul_(hm_g, (g - 1).to(gemm));
    y = y_g.to(x.scalar_type());
    hm = hm_g.to(x.scalar_type());
  }
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;
  return {y.view(y_shape), z, hm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_linear_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& z, const Tensor& hm, const Tensor& weight,
    const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude, const Tensor& weight_norm,
    double scaling, double dropout_p, const Tensor& seed_tensor, int64_t offset,
    std::array<bool, 4> output_mask) {
  check_linear(x, weight, lora_A, lora_B, magnitude, weight_norm, dropout_p);
  const int64_t seed = dropout_seed(seed_tensor, dropout_p);
  // The op runs in the dtypes it is given (autocast casts at its boundary, see ops/): the
  // GEMMs inside must not be cast again, here or in the CPU kernels' worker threads.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t in = weight.size(1), out = weight.size(0);
  const bool need_x = output_mask[0], need_A = output_mask[1], need_B = output_mask[2],
             need_m = output_mask[3];
  const Tensor g2d = grad_y.reshape({-1, out});
  const Tensor x2d = x.reshape({-1, in});
  const auto acc = acc_type(x.scalar_type());
  const Tensor g = magnitude_scale(magnitude, weight_norm, x.scalar_type());

  Tensor grad_x = at::empty({0}, x.options());
  Tensor grad_A = at::empty({0}, lora_A.options());
  Tensor grad_B = at::empty({0}, lora_B.options());
  Tensor grad_m = at::empty({0}, magnitude.options());
  if (need_m) {
    const Tensor dots = x.is_cuda() ? at::sum(g2d * hm, {0}, false, acc) : cpu::column_dots(g2d, hm);
    grad_m = dots.div_(weight_norm.to(acc)).to(magnitude.scalar_type());
  }
  if (!need_x && !need_A && !need_B) return {grad_x, grad_A, grad_B, grad_m};
  // The gradient reaching the adapter path is gg = g ⊙ grad_y; g scales B's rows instead of
  // grad_y (a [out] scaling of [out, r] factors, not a pass over [rows, out]).
  if (need_B) grad_B = at::mm(g2d.t(), z).mul_(g.unsqueeze(1)).mul_(scaling);
  if (!need_x && !need_A) return {grad_x, grad_A, grad_B, grad_m};
  const Tensor grad_z = at::mm(g2d, lora_B * g.unsqueeze(1)).mul_(scaling);
  const auto gemm = gemm_type(x);
  if (dropout_p == 0.0) {
    if (need_A) grad_A = at::mm(grad_z.t(), x2d);
    if (need_x) {
      grad_x = at::mm(grad_z, lora_A).to(gemm).addmm_((g2d * g).to(gemm), weight.to(gemm)).to(x.scalar_type());
    }
  } else if (sparse_correction(x, dropout_p)) {
    // grad_x = grad_y·W + (m/q) ⊙ (G1 + grad_z·A) with G1 = ((g - 1) ⊙ grad_y)·W. Since
    // (m/q) ⊙ G1 = G1/q - ((1 - m)/q) ⊙ G1, one base GEMM of (1 + (g - 1)/q) ⊙ grad_y gives all
    // but G1 at the dropped elements, which are dot products of their own.
    const auto params = core::make_dropout_params(dropout_p, seed, offset);
    const double q = 1.0 - dropout_p;
    if (need_x && !x.is_cuda()) {
      // (m/q) ⊙ (grad_z·A) as (grad_z/q)·A with its dropped elements zeroed; the same list of
      // dropped elements then serves the dot products.
      const cpu::DroppedElements dropped(x2d.size(0), in, params);
      grad_x = at::mm(grad_z / q, lora_A).to(gemm);
      cpu::zero_dropped(grad_x, dropped);
      grad_x.addmm_((g2d * ((g - 1) / q + 1)).to(gemm), weight.to(gemm));
      cpu::subtract_dropped_dots(grad_x, g2d.to(acc), g.to(acc) - 1, weight, 1.0 / q, dropped);
      grad_x = grad_x.to(x.scalar_type());
    } else if (need_x) {
#ifdef LORA_EXT_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      grad_x = at::mm(grad_z, lora_A);
      dropout_apply(Tensor(), Tensor(), grad_x, params);  // (m/q) ⊙ (grad_z·A)
      grad_x.addmm_(g2d * ((g - 1) / q + 1), weight);
      const Tensor gy = (g2d * (g - 1)).contiguous(), wt = weight.t().contiguous();
      const int64_t rows = x2d.size(0);
      const Tensor bits = cuda_dropped_bits(x, rows, in, params);
      C10_CUDA_CHECK(cuda::launch_dora_subtract_dropped_dots(
          cuda_dtype(x.scalar_type()), grad_x.mutable_data_ptr(), gy.const_data_ptr(), wt.const_data_ptr(),
          reinterpret_cast<const uint32_t*>(bits.const_data_ptr<int32_t>()), rows, in, out, 1.0 / q,
          c10::cuda::getCurrentCUDAStream()));
#else
      TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
    }
    // grad_zᵀ·drop(x) is LoRA's grad_A for the gradient g ⊙ grad_y: no dropped copy of x.
    if (need_A) grad_A = grad_a_dropout(grad_z, x2d, lora_A, dropout_p, params);
  } else {
    // grad_x = grad_y·W + mask ⊙ ((g - 1) ⊙ grad_y)·W + mask ⊙ grad_z·A, the mask regenerated.
    const auto params = core::make_dropout_params(dropout_p, seed, offset);
    if (need_x) {
      const Tensor w = weight.to(gemm);
      grad_x = at::mm(grad_z.to(gemm), lora_A.to(gemm)).addmm_((g2d * (g - 1)).to(gemm), w);
      dropout_apply(Tensor(), Tensor(), grad_x, params);
      grad_x = grad_x.addmm_(g2d.to(gemm), w).to(x.scalar_type());
    }
    if (need_A) grad_A = grad_a_dropout(grad_z, x2d, lora_A, dropout_p, params);
  }
  if (need_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_A, grad_B, grad_m};
}

}  // namespace
}  // namespace lora_ext

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("dora_weight_norm", &lora_ext::dora_weight_norm);
  m.impl("dora_linear_forward", &lora_ext::dora_linear_forward);
  m.impl("dora_linear_backward", &lora_ext::dora_linear_backward);
}

#ifdef LORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("dora_weight_norm", &lora_ext::dora_weight_norm);
  m.impl("dora_linear_forward", &lora_ext::dora_linear_forward);
  m.impl("dora_linear_backward", &lora_ext::dora_linear_backward);
}
#endif
