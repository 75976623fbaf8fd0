// CPU kernels of the fused LoRA linear family (ATen + at::parallel_for over OpenMP).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "../core/dropout.h"

namespace lora_ext {
namespace cpu {

// One Philox pass over contiguous tensors of one dtype, indexed by flat element index:
//   dropped = mask * scale * x     when dropped is defined
//   grad   *= mask * scale         when grad is defined (in place)
void dropout_apply(const at::Tensor& x, const at::Tensor& dropped, const at::Tensor& grad,
                   const core::DropoutParams& params);

// Fills a contiguous bool tensor with the keep mask.
void dropout_mask(at::Tensor& mask, const core::DropoutParams& params);

// m[i] = keep(first + i) ? scale : 0 for i < count: the dropout multipliers of any range of
// flat element indices (a tile of rows need not start on a Philox group).
void dropout_multipliers(float* m, int64_t first, int64_t count, const core::DropoutParams& params);
void dropout_multipliers(double* m, int64_t first, int64_t count, const core::DropoutParams& params);

// Appends k - base to `out` for every dropped element k of the flat range [first, first + count),
// in ascending order.
void dropout_dropped_indices(int64_t first, int64_t count, const core::DropoutParams& params, int64_t base,
                             std::vector<int32_t>& out);

}  // namespace cpu
}  // namespace lora_ext
