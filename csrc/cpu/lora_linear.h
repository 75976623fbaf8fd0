// CPU kernels of the fused LoRA linear family (ATen + at::parallel_for).
#pragma once
#include <ATen/core/Tensor.h>

#include "../core/dropout.h"

namespace lora_ext {
namespace cpu {

// out = (base if defined else 0) + mask * scale * src, elementwise over contiguous tensors
// of one dtype; the mask index is the flat element index.
void dropout_axpy(const at::Tensor& src, const at::Tensor& base, at::Tensor& out,
                  const core::DropoutParams& params);

// Fills a contiguous bool tensor with the keep mask.
void dropout_mask(at::Tensor& mask, const core::DropoutParams& params);

}  // namespace cpu
}  // namespace lora_ext
