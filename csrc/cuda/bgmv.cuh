// CUDA kernels of the BGMV / SGMV family: raw pointers and a stream in, no torch.
// Launch shapes depend only on tensor sizes, never on index values, and nothing is
// allocated: the launches can be captured in a CUDA graph.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "lora_linear.cuh"  // DType

namespace lora_ext {
namespace cuda {

// Which adapter each row uses: BGMV reads idx[t]; SGMV (num_segments >= 0) finds the
// segment holding row t in seg_starts[0..num_segments] and reads seg_adapter[segment].
// Indices are int64. Rows whose adapter is out of [0, num_adapters) have none.
struct RowAdapters {
  const int64_t* idx;          // BGMV, or nullptr
  const int64_t* seg_starts;   // SGMV, or nullptr
  const int64_t* seg_adapter;  // SGMV, or nullptr
  int64_t num_segments;        // -1 for BGMV
  int64_t num_adapters;
};

// z [T, r] = x [T, in] . A[slot] [r, in]ᵀ per row (zero for rows without an adapter).
cudaError_t launch_bgmv_shrink(DType dtype, const void* x, const void* lora_A, void* z,
                               int64_t rows, int64_t in, int64_t r, RowAdapters adapters,
                               cudaStream_t stream);

// y [T, out] += scale[slot] * z [T, r] . B[slot] [out, r]ᵀ per row, in place.
cudaError_t launch_bgmv_expand(DType dtype, void* y, const void* z, const void* lora_B,
                               const float* scale, int64_t rows, int64_t out, int64_t r,
                               RowAdapters adapters, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
