// CPU kernels that let DoRA with dropout skip its second dense GEMM. With the keep mask m and
// q = 1 - p, drop(x)·Wᵀ = (x·Wᵀ - (x ⊙ (1 - m))·Wᵀ) / q, and x·Wᵀ is the base output already
// computed: what remains is a product over the dropped elements only (a fraction p of x).
// Both kernels take W as it is stored ([out, in], any floating dtype) and walk Wᵀ in blocks of
// output columns that each task transposes into an L2-sized buffer of the accumulation dtype,
// so that a dropped element reads a short contiguous piece of its row of Wᵀ per block; no
// W-sized transposed copy is made (it cost a W-sized allocation, its page faults and a strided
// pass through memory in every call: 7.5 ms of a 2048 x 2048 fp32 step).
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
  // The index of row t's first dropped element among all of them (rows in order).
  int64_t first(int64_t t) const { return start_[t]; }
  int64_t total() const { return start_.back(); }
  // x2d's values at the dropped elements, in the order above, as a 1-D tensor of dtype acc.
  at::Tensor values(const at::Tensor& x2d, at::ScalarType acc) const;

 private:
  std::vector<int64_t> start_;  // rows + 1 offsets into ks_
  std::vector<int32_t> ks_;
};

// Sets the dropped elements of t2d [rows, in] (contiguous) to zero.
void zero_dropped(at::Tensor& t2d, const DroppedElements& dropped);

// DoRA's forward with dropout from the base output. With S[t] = Σ over dropped k of
// x[t, k] · W[:, k] (never stored whole) and the low-rank term lr = z·scaled_b_t (never stored
// either): returns hd = (base - S) / q + lr, and turns base into base + lr + g_minus_1 ⊙ hd +
// bias, all per block of columns in cache. base [rows, out] (x·Wᵀ from the GEMM) is contiguous
// in the accumulation dtype or bf16, and hd comes in base's dtype; z [rows, r], scaled_b_t
// [r, out] (s·Bᵀ) and g_minus_1 [out] are in the accumulation dtype (float, or double for
// double); bias [out] may be undefined.
at::Tensor dropout_corrected_outputs(const at::Tensor& x2d, const at::Tensor& weight, at::Tensor& base,
                                     const at::Tensor& z, const at::Tensor& scaled_b_t,
                                     const at::Tensor& g_minus_1, const at::Tensor& bias,
                                     double dropout_p, const DroppedElements& dropped);

// In place, for every dropped (t, k): grad_x[t, k] -= factor · ((gy[t] ⊙ column_scale) · W[:, k]),
// gy [rows, out] and column_scale [out] in the accumulation dtype, grad_x [rows, in] of any
// floating dtype. The result does not depend on the number of threads.
void subtract_dropped_dots(at::Tensor& grad_x, const at::Tensor& gy, const at::Tensor& column_scale,
                           const at::Tensor& weight, double factor, const DroppedElements& dropped);

// Σ over rows of a ⊙ b, per column ([rows, out] each, one dtype), in the accumulation dtype,
// without an [rows, out] product: the magnitude's gradient.
at::Tensor column_dots(const at::Tensor& a, const at::Tensor& b);

}  // namespace cpu
}  // namespace lora_ext
