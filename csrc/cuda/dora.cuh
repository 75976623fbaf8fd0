// CUDA kernels of the DoRA family: raw pointers and a stream in, no torch.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "lora_linear.cuh"  // DType

namespace lora_ext {
namespace cuda {

// A block covers kDoraBlockRows rows by kDoraBlockCols columns of M and writes one partial
// sum per row (row sums) or per column (column sums) into the scratch buffer.
constexpr int kDoraBlockRows = 32;
constexpr int kDoraBlockCols = 512;

// Partial sums per output element: the scratch buffer holds this many times out.
inline int64_t dora_partial_count(int64_t rows, int64_t n, bool column_sums) {
  const int64_t count = column_sums ? (rows + kDoraBlockRows - 1) / kDoraBlockRows
                                    : (n + kDoraBlockCols - 1) / kDoraBlockCols;
  return count > 0 ? count : 1;
}

// sums = Σ (M + P·Q)² along rows (sums [rows]) or along columns (sums [n]); M [rows, n] with
// leading dimension ldm and dtype `dtype`; P [rows, rank], Q [rank, n], scratch and sums in
// the accumulation type (double for kFloat64, float otherwise). Deterministic: the partials
// are added in a fixed order.
cudaError_t launch_dora_sum_squares(DType dtype, const void* m, int64_t rows, int64_t n,
                                    int64_t ldm, const void* p, const void* q, int rank,
                                    bool column_sums, void* scratch, void* sums,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
