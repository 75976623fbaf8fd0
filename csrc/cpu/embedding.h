// CPU kernels of the Embedding LoRA family (csrc/core/embedding.h holds their arithmetic).
#pragma once
#include <ATen/core/Tensor.h>

namespace lora_ext {
namespace cpu {

// y [T, out] (contiguous, weight's dtype) row t = weight[idx[t]] + scaling * lora_A[:, idx[t]] . Bᵀ.
// idx: int64 [T], every entry a row of weight (checked by the caller), or undefined for every
// row in order (T = V: the merged weight W + s·(B·A) of a LoRA conv); weight [V, out] with unit
// column stride; lora_A [r, V] (any strides) of weight's dtype or float32 over a half weight;
// bt: Bᵀ [r, out] contiguous in the accumulation dtype (float64 for fp64, else float32).
void embedding_lora_forward(const at::Tensor& idx, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& bt, double scaling,
                            at::Tensor& y);

// Segment sums of a stable sort of the token indices (sorted [T] nondecreasing, perm [T] the
// tokens in that order; indices < 0 are skipped): for each index v present,
//   dst[v * stride_v + c * stride_c] = scale * sum_{t: idx[t] = v} src[t, c]   (c < C)
// accumulated in float32 (float64 for fp64) and rounded once to dst's dtype; src [T, C]
// contiguous of dst's dtype, or float32 into a half dst. Other dst entries are left alone.
void embedding_segment_sums(const at::Tensor& src, const at::Tensor& sorted, const at::Tensor& perm,
                            double scale, at::Tensor& dst, int64_t stride_v, int64_t stride_c);

}  // namespace cpu
}  // namespace lora_ext
