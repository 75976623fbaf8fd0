// CUDA kernels that let DoRA with dropout skip its second dense GEMM (the CPU ones are in
// csrc/cpu/dora_dropout.h). With the keep mask m and q = 1 - p,
//   drop(x)·Wᵀ = (x·Wᵀ - (x ⊙ (1 - m))·Wᵀ) / q,
// and x·Wᵀ is the base output already computed: what remains is a product over the dropped
// elements only, a fraction p of x. Raw pointers and a stream in, no torch.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../core/dropout.h"
#include "lora_linear.cuh"  // DType

namespace lora_ext {
namespace cuda {

// The dropped elements of a [rows, in] tensor as bits: word w of row t holds elements
// k = 32w .. 32w + 31 of the row, bit j set when element 32w + j is dropped (bits past `in`
// clear). Rows are dora_dropped_words(in) words apart.
LORA_EXT_HD int64_t dora_dropped_words(int64_t in) { return (in + 31) / 32; }
cudaError_t launch_dora_dropped_bits(uint32_t* bits, int64_t rows, int64_t in,
                                     const core::DropoutParams& params, cudaStream_t stream);

// DoRA's forward with dropout from the base output. With S[t, o] = Σ over dropped k of
// x[t, k] · wt[k, o] (never stored) and core::dora_dropout_outputs per element:
//   hd = (base - S) / q + low_rank,  base <- base + low_rank + g_minus_1 ⊙ hd (+ bias).
// x [rows, in], wt = Wᵀ [in, out], base (in place), low_rank and hd [rows, out], bias [out]
// (may be null) are contiguous and of `dtype`; g_minus_1 [out] is in the accumulation type
// (double for kFloat64, float otherwise), which every sum uses.
cudaError_t launch_dora_dropout_outputs(DType dtype, const void* x, const void* wt, void* base,
                                        const void* low_rank, const void* g_minus_1,
                                        const void* bias, void* hd, const uint32_t* dropped_bits,
                                        int64_t rows, int64_t in, int64_t out, double q,
                                        cudaStream_t stream);

// In place, for every dropped (t, k): grad_x[t, k] -= factor · (gy[t] · wt[k]), with gy
// [rows, out], wt = Wᵀ [in, out] and grad_x [rows, in] contiguous and of `dtype`.
cudaError_t launch_dora_subtract_dropped_dots(DType dtype, void* grad_x, const void* gy,
                                              const void* wt, const uint32_t* dropped_bits,
                                              int64_t rows, int64_t in, int64_t out, double factor,
                                              cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
