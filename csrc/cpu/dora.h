// CPU kernel of the DoRA family: the weight norm ‖W + s·B·A‖ per output row (see core/dora.h).
#pragma once
#include <ATen/core/Tensor.h>

namespace lora_ext {
namespace cpu {

// sums[i] = Σ_j (M[i, j] + Σ_k P[i, k]·Q[k, j])²  (column_sums = false: sums has m entries)
// sums[j] = Σ_i (M[i, j] + Σ_k P[i, k]·Q[k, j])²  (column_sums = true: sums has n entries)
// M [m, n] with unit column stride; P [m, rank], Q [rank, n] and sums contiguous, in the
// accumulation type (double for double M, float otherwise).
void dora_sum_squares(const at::Tensor& m, const at::Tensor& p, const at::Tensor& q,
                      bool column_sums, at::Tensor& sums);

}  // namespace cpu
}  // namespace lora_ext
