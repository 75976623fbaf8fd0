// Helpers shared by the ATen orchestration files (csrc/<family>.cpp): the CUDA kernels' dtype
// tag for an ATen dtype, and the Philox dropout steps of the fused LoRA linear (defined in
// lora_linear.cpp), which DoRA reuses so that both draw the same mask from a seed.
#pragma once

#include <ATen/ATen.h>

#include "core/dropout.h"

#ifdef LORA_EXT_WITH_CUDA
#include "cuda/lora_linear.cuh"  // DType
#endif

namespace lora_ext {

#ifdef LORA_EXT_WITH_CUDA
inline cuda::DType cuda_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "lora_ext: unsupported dtype ", type);
  }
}
#endif

// The Philox seed the dropout ops take: a one-element int64 tensor, so that torch.compile keeps
// the draw (the dropout_seed op) in its graph where an int argument would need .item() in
// Python, a graph break. Read here on the host: layers draw seeds on the CPU, so no device sync.
// Only validated, not read, without dropout.
inline int64_t dropout_seed(const at::Tensor& seed, double dropout_p) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "lora_ext: seed must be a one-element int64 tensor, got ", seed.scalar_type(),
              " with ", seed.numel(), " elements");
  return dropout_p > 0.0 ? seed.item<int64_t>() : 0;
}

// One Philox pass over contiguous [rows, in] tensors of one dtype (undefined = unused):
//   dropped = mask * scale * x,   grad *= mask * scale (in place).
void dropout_apply(const at::Tensor& x, const at::Tensor& dropped, const at::Tensor& grad,
                   const core::DropoutParams& params);

// z = drop(x2d)·lora_Aᵀ [rows, r] and grad_A = grad_zᵀ·drop(x2d) [r, in] in x2d's dtype (lora_A's
// for grad_A), drop(x) made as x streams in, never stored whole (CUDA kernels or CPU tiles).
at::Tensor shrink_dropout(const at::Tensor& x2d, const at::Tensor& lora_A, double dropout_p,
                          const core::DropoutParams& params);
at::Tensor grad_a_dropout(const at::Tensor& grad_z, const at::Tensor& x2d, const at::Tensor& lora_A,
                          double dropout_p, const core::DropoutParams& params);

}  // namespace lora_ext
