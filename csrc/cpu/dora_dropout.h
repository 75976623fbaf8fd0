// CPU kernels that let DoRA with dropout skip its second dense GEMM. With the keep mask m and
// q = 1 - p, drop(x)·Wᵀ = (x·Wᵀ - (x ⊙ (1 - m))·Wᵀ) / q, and x·Wᵀ is the base output already
// computed: what remains is a product over the dropped elements only (a fraction p of x).
// Both kernels take Wᵀ contiguous ([in, out], the accumulation dtype) so that each dropped
// element touches one contiguous row of it.
#pragma once
#include <ATen/core/Tensor.h>

#include "../core/dropout.h"

namespace lora_ext {
namespace cpu {

// Returns S [rows, out] (accumulation dtype), S[t] = Σ over dropped k of x[t, k] · wt[k].
at::Tensor dropped_rows_product(const at::Tensor& x2d, const at::Tensor& wt,
                                const core::DropoutParams& params);

// In place, for every dropped (t, k): grad_x[t, k] -= factor · (gy[t] · wt[k]), gy [rows, out]
// in the accumulation dtype, grad_x [rows, in] of any floating dtype.
void subtract_dropped_dots(at::Tensor& grad_x, const at::Tensor& gy, const at::Tensor& wt,
                           double factor, const core::DropoutParams& params);

}  // namespace cpu
}  // namespace lora_ext
