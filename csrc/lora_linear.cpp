// Fused LoRA linear: GEMMs through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA) around the
// Philox dropout kernels of csrc/cpu and csrc/cuda. One orchestration serves both devices.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/lora_linear.h"

#ifdef LORA_EXT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/lora_linear.cuh"
#endif

namespace lora_ext {
namespace {

using at::Tensor;

#ifdef LORA_EXT_WITH_CUDA
cuda::DType cuda_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "lora_ext: unsupported dtype ", type);
  }
}
#endif

// out = (base if defined else 0) + mask * scale * src, all contiguous, one dtype.
void dropout_axpy(const Tensor& src, const Tensor& base, Tensor& out,
                  const core::DropoutParams& params) {
  if (src.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(src.device());
    C10_CUDA_CHECK(cuda::launch_dropout_axpy(
        cuda_dtype(src.scalar_type()), src.const_data_ptr(),
        base.defined() ? base.const_data_ptr() : nullptr, out.mutable_data_ptr(), src.numel(),
        params, c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    cpu::dropout_axpy(src, base, out, params);
  }
}

Tensor dropped(const Tensor& x2d, const core::DropoutParams& params) {
  Tensor out = at::empty_like(x2d);
  dropout_axpy(x2d, Tensor(), out, params);
  return out;
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
                                               double scaling, double dropout_p, int64_t seed,
                                               int64_t offset) {
  check_inputs(x, weight, lora_A, lora_B, dropout_p);
  const int64_t in = weight.size(1), out = weight.size(0);
  const Tensor x2d = x.reshape({-1, in});
  Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x2d, weight.t())
                                                 : at::mm(x2d, weight.t());
  Tensor z;
  if (dropout_p > 0.0) {
    const auto params = core::make_dropout_params(dropout_p, seed, offset);
    z = at::mm(dropped(x2d.contiguous(), params), lora_A.t());
  } else {
    z = at::mm(x2d, lora_A.t());
  }
  y.addmm_(z, lora_B.t(), /*beta=*/1, /*alpha=*/scaling);
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = out;
  return {y.view(y_shape), z};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& z, const Tensor& weight,
    const Tensor& lora_A, const Tensor& lora_B, double scaling, double dropout_p, int64_t seed,
    int64_t offset, std::array<bool, 3> output_mask) {
  check_inputs(x, weight, lora_A, lora_B, dropout_p);
  const int64_t in = weight.size(1), out = weight.size(0);
  const Tensor g2d = grad_y.reshape({-1, out});
  const auto params = core::make_dropout_params(dropout_p, seed, offset);
  const bool need_x = output_mask[0], need_A = output_mask[1], need_B = output_mask[2];

  Tensor grad_x = at::empty({0}, x.options());
  Tensor grad_A = at::empty({0}, lora_A.options());
  Tensor grad_B = at::empty({0}, lora_B.options());
  if (need_B) grad_B = at::mm(g2d.t(), z).mul_(scaling);
  if (need_x || need_A) {
    const Tensor grad_z = at::mm(g2d, lora_B).mul_(scaling);  // [M, r]
    if (need_A) {
      const Tensor x2d = x.reshape({-1, in});
      grad_A = dropout_p > 0.0 ? at::mm(grad_z.t(), dropped(x2d.contiguous(), params))
                               : at::mm(grad_z.t(), x2d);
    }
    if (need_x) {
      Tensor gx = at::mm(g2d, weight);
      if (dropout_p > 0.0) {
        // The dropout backward is the same mask and scale applied to grad_z @ lora_A.
        dropout_axpy(at::mm(grad_z, lora_A), gx, gx, params);
      } else {
        gx.addmm_(grad_z, lora_A);
      }
      grad_x = gx.view(x.sizes());
    }
  }
  return {grad_x, grad_A, grad_B};
}

Tensor dropout_mask(const Tensor& like, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_mask: dropout_p must be in [0, 1)");
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

}  // namespace
}  // namespace lora_ext

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
