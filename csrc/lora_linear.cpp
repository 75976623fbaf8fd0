// Fused LoRA linear: on CPU mostly cpu::fused_forward/backward (csrc/cpu/lora_fused.cpp); the
// whole-tensor path orchestrates cuBLAS (or CPU BLAS) GEMMs around the fused Philox kernels.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "aten_glue.h"
#include "cpu/lora_fused.h"
#include "cpu/lora_linear.h"

#ifdef LORA_EXT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/lora_linear.cuh"
#endif

namespace lora_ext {

// Declared in aten_glue.h (DoRA uses it too).
void dropout_apply(const at::Tensor& x, const at::Tensor& dropped, const at::Tensor& grad,
                   const core::DropoutParams& params) {
  const at::Tensor& like = x.defined() ? x : grad;
  if (like.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(like.device());
    auto ptr = [](const at::Tensor& tensor) { return tensor.defined() ? tensor.data_ptr() : nullptr; };
    C10_CUDA_CHECK(cuda::launch_dropout_apply(cuda_dtype(like.scalar_type()), ptr(x), ptr(dropped),
                                              ptr(grad), like.numel(), params,
                                              c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    cpu::dropout_apply(x, dropped, grad, params);
  }
}

// Declared in aten_glue.h: the whole-tensor path's low-rank steps with dropout, z = drop(x2d)·lora_Aᵀ
// and grad_A = grad_zᵀ·drop(x2d). On CUDA each is one kernel that makes the mask in registers
// as x streams in; on CPU the tiles of cpu/lora_fused.cpp.
at::Tensor shrink_dropout(const at::Tensor& x2d, const at::Tensor& lora_A, double dropout_p,
                          const core::DropoutParams& params) {
  const at::Tensor x_contig = x2d.contiguous();
  if (x_contig.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const at::Tensor a = lora_A.contiguous();
    const c10::cuda::CUDAGuard guard(x_contig.device());
    at::Tensor z = at::empty({x_contig.size(0), a.size(0)}, x_contig.options());
    C10_CUDA_CHECK(cuda::launch_lora_shrink_dropout(
        cuda_dtype(x_contig.scalar_type()), x_contig.const_data_ptr(), a.const_data_ptr(),
        z.mutable_data_ptr(), x_contig.size(0), x_contig.size(1), a.size(0), params,
        c10::cuda::getCurrentCUDAStream()));
    return z;
#endif
  }
  return cpu::fused_shrink(x_contig, lora_A, dropout_p, params).to(x2d.scalar_type());
}

at::Tensor grad_a_dropout(const at::Tensor& grad_z, const at::Tensor& x2d, const at::Tensor& lora_A,
                          double dropout_p, const core::DropoutParams& params) {
  const at::Tensor x_contig = x2d.contiguous();
  if (x_contig.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const at::Tensor gz = grad_z.contiguous();
    const c10::cuda::CUDAGuard guard(x_contig.device());
    const int64_t rows = x_contig.size(0), in = x_contig.size(1), r = lora_A.size(0);
    const auto acc = x_contig.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor scratch = at::empty({cuda::lora_grad_a_scratch(rows, in, r)},
                                         x_contig.options().dtype(acc));
    at::Tensor grad_A = at::empty({r, in}, lora_A.options());
    C10_CUDA_CHECK(cuda::launch_lora_grad_a_dropout(
        cuda_dtype(x_contig.scalar_type()), gz.const_data_ptr(), x_contig.const_data_ptr(),
        grad_A.mutable_data_ptr(), scratch.mutable_data_ptr(), rows, in, r, params,
        c10::cuda::getCurrentCUDAStream()));
    return grad_A;
#endif
  }
  return cpu::fused_grad_a(grad_z, x_contig, dropout_p, params).to(lora_A.scalar_type());
}

namespace {

using at::Tensor;

// CPU tensors take the tiled path of csrc/cpu/lora_fused.cpp, except bf16 where the CPU has
// native bf16 GEMMs: there whole-tensor bf16 GEMMs beat tiles of fp32 ones (measured: 1.45x
// against 1.17x of the base layer at 1024, r = 16, no dropout).
bool cpu_tiles(const Tensor& x) {
  return !x.is_cuda() && !(x.scalar_type() == at::kBFloat16 && cpu::cpu_has_native_bf16());
}

void check_inputs(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                  const Tensor& lora_B, double dropout_p) {
  TORCH_CHECK(x.dim() >= 1, "lora_linear: x must have at least one dimension");
  TORCH_CHECK(weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              "lora_linear: weight, lora_A and lora_B must be 2-D");
  const int64_t in = weight.size(1), out = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(x.size(-1) == in, "lora_linear: x.shape[-1] = ", x.size(-1),
              " but weight expects in_features = ", in);
  TORCH_CHECK(lora_A.size(1) == in, "lora_linear: lora_A must be [r, ", in, "], got ",
              lora_A.sizes());
  TORCH_CHECK(lora_B.size(0) == out && lora_B.size(1) == r, "lora_linear: lora_B must be [",
              out, ", ", r, "], got ", lora_B.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.scalar_type() == lora_A.scalar_type() &&
                  x.scalar_type() == lora_B.scalar_type(),
              "lora_linear: x, weight, lora_A and lora_B must share one dtype");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lora_linear: dropout_p must be in [0, 1)");
}

std::tuple<Tensor, Tensor> lora_linear_forward(const Tensor& x, const Tensor& weight,
                                               const std::optional<Tensor>& bias,
                                               const Tensor& lora_A, const Tensor& lora_B,
                                               double scaling, double dropout_p,
                                               const Tensor& seed_tensor, int64_t offset) {
  check_inputs(x, weight, lora_A, lora_B, dropout_p);
  const int64_t seed = dropout_seed(seed_tensor, dropout_p);
  // The op runs in the dtypes it is given (autocast casts at its boundary, see ops/): the
  // GEMMs inside must not be cast again, here or in the CPU kernels' worker threads.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t in = weight.size(1), out = weight.size(0);
  const Tensor x2d = x.reshape({-1, in});
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;
  if (cpu_tiles(x)) {
    auto [y, z] = cpu::fused_forward(x2d, weight, bias.has_value() ? *bias : Tensor(), lora_A,
                                     lora_B, scaling, dropout_p,
                                     core::make_dropout_params(dropout_p, seed, offset));
    return {y.view(y_shape), z};
  }
  const Tensor z = dropout_p > 0.0
                       ? shrink_dropout(x2d, lora_A, dropout_p, core::make_dropout_params(dropout_p, seed, offset))
                       : at::mm(x2d, lora_A.t());
  const bool has_bias = bias.has_value() && bias->defined();
  Tensor y;
  if (x.is_cuda()) {
    // The low-rank term (and bias) first, then the big GEMM accumulates onto it (beta = 1 in
    // cuBLAS's epilogue): one pass over y instead of a second read-modify-write after it.
    y = has_bias ? at::addmm(*bias, z, lora_B.t(), /*beta=*/1, /*alpha=*/scaling)
                 : at::mm(z, lora_B.t() * scaling);  // scale the [out, r] factor, not y
    y.addmm_(x2d, weight.t());
  } else {
    // Native bf16 on CPU: oneDNN's big GEMM with beta = 1 costs more than a rank-r GEMM
    // accumulating afterwards (2048 x 1024 x 1024: 9.95 against 9.50 ms; at 2048 features
    // 42.4 against 39.9; one thread, interleaved medians), so the base GEMM goes first.
    y = has_bias ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
    y.addmm_(z, lora_B.t(), /*beta=*/1, /*alpha=*/scaling);
  }
  return {y.view(y_shape), z};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& z, const Tensor& weight,
    const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p,
    const Tensor& seed_tensor, int64_t offset, std::array<bool, 3> output_mask) {
  check_inputs(x, weight, lora_A, lora_B, dropout_p);
  const int64_t seed = dropout_seed(seed_tensor, dropout_p);
  // The op runs in the dtypes it is given (autocast casts at its boundary, see ops/): the
  // GEMMs inside must not be cast again, here or in the CPU kernels' worker threads.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t in = weight.size(1), out = weight.size(0);
  const Tensor g2d = grad_y.reshape({-1, out});
  const auto params = core::make_dropout_params(dropout_p, seed, offset);
  const bool need_x = output_mask[0], need_A = output_mask[1], need_B = output_mask[2];
  if (cpu_tiles(x)) {
    auto [grad_x, grad_A, grad_B] = cpu::fused_backward(g2d, x.reshape({-1, in}), z, weight, lora_A,
                                                        lora_B, scaling, dropout_p, params, output_mask);
    if (need_x) grad_x = grad_x.view(x.sizes());
    return {grad_x, grad_A, grad_B};
  }

  Tensor grad_x = at::empty({0}, x.options());
  Tensor grad_A = at::empty({0}, lora_A.options());
  Tensor grad_B = at::empty({0}, lora_B.options());
  if (need_B) grad_B = at::mm(g2d.t(), z).mul_(scaling);
  if (!need_x && !need_A) return {grad_x, grad_A, grad_B};

  const Tensor x2d = x.reshape({-1, in});
  const Tensor grad_z = at::mm(g2d, lora_B).mul_(scaling);  // [rows, r]
  if (need_x) {
    // grad_x = grad_y @ weight + the low-rank term grad_z @ lora_A, which dropout's backward
    // masks in place. On CUDA the big GEMM accumulates onto the low-rank term (beta = 1); on CPU
    // it goes first and the low-rank term is added (see the forward).
    Tensor low_rank = at::mm(grad_z, lora_A);
    if (dropout_p > 0.0) dropout_apply(Tensor(), Tensor(), low_rank, params);
    if (x.is_cuda()) {
      grad_x = low_rank.addmm_(g2d, weight);
    } else {
      grad_x = at::mm(g2d, weight).add_(low_rank);
    }
    grad_x = grad_x.view(x.sizes());
  }
  if (need_A) {
    grad_A = dropout_p == 0.0 ? at::mm(grad_z.t(), x2d)
                              : grad_a_dropout(grad_z, x2d, lora_A, dropout_p, params);  // mask regenerated
  }
  return {grad_x, grad_A, grad_B};
}

Tensor dropout_mask(const Tensor& like, double dropout_p, const Tensor& seed_tensor,
                    int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_mask: dropout_p must be in [0, 1)");
  const int64_t seed = dropout_seed(seed_tensor, dropout_p);
  const auto params = core::make_dropout_params(dropout_p, seed, offset);
  Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kBool));
  if (like.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(like.device());
    C10_CUDA_CHECK(cuda::launch_dropout_mask(mask.mutable_data_ptr<bool>(), mask.numel(), params,
                                             c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    cpu::dropout_mask(mask, params);
  }
  return mask;
}

Tensor fresh_dropout_seed(c10::Device device) {
  return at::randint(0, int64_t{1} << 62, {}, at::TensorOptions().dtype(at::kLong).device(device));
}

}  // namespace
}  // namespace lora_ext

// No tensor inputs: one kernel for every device.
TORCH_LIBRARY_IMPL(lora_ext, CompositeExplicitAutograd, m) {
  m.impl("dropout_seed", &lora_ext::fresh_dropout_seed);
}

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_linear_forward", &lora_ext::lora_linear_forward);
  m.impl("lora_linear_backward", &lora_ext::lora_linear_backward);
  m.impl("dropout_mask", &lora_ext::dropout_mask);
}

#ifdef LORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_linear_forward", &lora_ext::lora_linear_forward);
  m.impl("lora_linear_backward", &lora_ext::lora_linear_backward);
  m.impl("dropout_mask", &lora_ext::dropout_mask);
}
#endif
