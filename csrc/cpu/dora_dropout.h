// CPU kernels that let DoRA with dropout skip its second dense GEMM. With the keep mask m and
// q = 1 - p, drop(x)·Wᵀ = (x·Wᵀ - (x ⊙ (1 - m))·Wᵀ) / q, and x·Wᵀ is the base output already
// computed: what remains is a product over the dropped elements only (a fraction p of x).
// Both kernels take Wᵀ contiguous ([in, out], the accumulation dtype) and walk it in blocks of
// columns that stay in L2, so that a dropped element reads a short contiguous piece of its row
// per block.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../core/dropout.h"

namespace lora_ext {
namespace cpu {

// The dropped elements of a [rows, in] tensor under a Philox mask, found once (one pass of
// the mask) and shared by the kernels below: row t's columns, ascending, are row(t)[0, count(t)).
class DroppedElements {
 public:
  DroppedElements(int64_t rows, int64_t in, const core::DropoutParams& params);
  const int32_t* row(int64_t t) const { return ks_.data() + start_[t]; }
  int32_t count(int64_t t) const { return static_cast<int32_t>(start_[t + 1] - start_[t]); }

 private:
  std::vector<int64_t> start_;  // rows + 1 offsets into ks_
  std::vector<int32_t> ks_;
};

// Sets the dropped elements of t2d [rows, in] (contiguous) to zero.
void zero_dropped(at::Tensor& t2d, const DroppedElements& dropped);

// DoRA's forward with dropout from the base output. With S[t] = Σ over dropped k of
// x[t, k] · wt[k] (never stored whole): returns hd = (base - S) / q + low_rank, and turns base
// into base + low_rank + g_minus_1 ⊙ hd (y without bias). base, low_rank [rows, out] and
// g_minus_1 [out] are contiguous, in the accumulation dtype of wt.
at::Tensor dropout_corrected_outputs(const at::Tensor& x2d, const at::Tensor& wt, at::Tensor& base,
                                     const at::Tensor& low_rank, const at::Tensor& g_minus_1,
                                     double dropout_p, const DroppedElements& dropped);

// In place, for every dropped (t, k): grad_x[t, k] -= factor · (gy[t] · wt[k]), gy [rows, out]
// in the accumulation dtype, grad_x [rows, in] of any floating dtype.
void subtract_dropped_dots(at::Tensor& grad_x, const at::Tensor& gy, const at::Tensor& wt,
                           double factor, const DroppedElements& dropped);

}  // namespace cpu
}  // namespace lora_ext
