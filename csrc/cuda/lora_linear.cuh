// CUDA kernels of the fused LoRA linear family: raw pointers and a stream in, no torch.
// The GEMMs around them run through cuBLAS from the ATen side (csrc/lora_linear.cpp).
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../core/dropout.h"

namespace lora_ext {
namespace cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Elementwise kernels cap their grid here and loop over the rest (grid-stride): 8192 blocks
// of 256 threads are 2M threads, several times what an H100 or H200 holds resident.
constexpr unsigned kMaxGridStrideBlocks = 8192;

// One Philox pass over `numel` contiguous elements (see core::dropout_apply_group):
//   dropped = mask * scale * x   unless dropped is null
//   grad   *= mask * scale       unless grad is null (in place)
cudaError_t launch_dropout_apply(DType dtype, const void* x, void* dropped, void* grad,
                                 int64_t numel, const core::DropoutParams& params,
                                 cudaStream_t stream);

// mask[i] = keep(i) for i < numel.
cudaError_t launch_dropout_mask(bool* mask, int64_t numel, const core::DropoutParams& params,
                                cudaStream_t stream);

// The fused shrink: z [rows, r] = drop(x) [rows, in] . lora_A [r, in]ᵀ, with drop(x) made in
// registers from the Philox mask as x streams in, never stored. x, lora_A and z contiguous,
// of dtype; fp32 accumulation (fp64 for kFloat64). One warp per row.
cudaError_t launch_lora_shrink_dropout(DType dtype, const void* x, const void* lora_A, void* z,
                                       int64_t rows, int64_t in, int64_t r,
                                       const core::DropoutParams& params, cudaStream_t stream);

// The fused weight gradient of the shrink: grad_A [r, in] = grad_zᵀ [r, rows] . drop(x)
// [rows, in], the mask regenerated in registers. Row tiles write partial sums into scratch
// (lora_grad_a_scratch(rows, in, r) accumulators: float, or double for kFloat64), which a
// second kernel adds in a fixed order: deterministic.
int64_t lora_grad_a_scratch(int64_t rows, int64_t in, int64_t r);
cudaError_t launch_lora_grad_a_dropout(DType dtype, const void* grad_z, const void* x,
                                       void* grad_A, void* scratch, int64_t rows, int64_t in,
                                       int64_t r, const core::DropoutParams& params,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
