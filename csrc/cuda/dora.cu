#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/dora.h"
#include "convert.cuh"
#include "dora.cuh"
#include "launch.cuh"

namespace lora_ext {
namespace cuda {
namespace {

// 256 threads as 8 warps; a thread owns a 4-row by 4-column register tile whose columns are
// 32 apart, so that each warp reads 32 consecutive elements of a row of M per load.
constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kThreadRows = 4;
constexpr int kThreadCols = 4;
constexpr int kStepCols = kWarp * kThreadCols;                 // 128
constexpr int kSteps = kDoraBlockCols / kStepCols;             // 4
constexpr int kRankChunk = 16;                                 // rank streamed through smem
static_assert(kWarps * kThreadRows == kDoraBlockRows, "block rows");

template <typename T, typename Acc, bool kColumnSums>
__global__ void __launch_bounds__(kWarp * kWarps)
    dora_partial_kernel(const T* __restrict__ m, int64_t rows, int64_t n, int64_t ldm,
                        const Acc* __restrict__ p, const Acc* __restrict__ q, int rank,
                        Acc* __restrict__ partial) {
  __shared__ Acc ps[kDoraBlockRows][kRankChunk + 1];
  __shared__ Acc qs[kRankChunk][kStepCols];
  __shared__ Acc reduce[kColumnSums ? kWarps : 1][kColumnSums ? kStepCols : 1];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kWarp + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kDoraBlockRows;
  const int64_t block_col0 = static_cast<int64_t>(blockIdx.x) * kDoraBlockCols;
  const auto load = [](T v) { return Convert<T>::load(v); };
  Acc row_sq[kThreadRows] = {};
  Acc col_sq[kSteps][kThreadCols] = {};

  for (int step = 0; step < kSteps; ++step) {
    const int64_t col0 = block_col0 + step * kStepCols;
    if (col0 >= n) break;  // uniform across the block
    Acc v[kThreadRows][kThreadCols];
    const int64_t my_row = row0 + ty * kThreadRows;
    const int64_t my_col = col0 + tx;
    if (my_row + kThreadRows <= rows && col0 + kStepCols <= n) {
      for (int a = 0; a < kThreadRows; ++a) {
        for (int c = 0; c < kThreadCols; ++c) v[a][c] = load(m[(my_row + a) * ldm + my_col + c * kWarp]);
      }
    } else {
      for (int a = 0; a < kThreadRows; ++a) {
        for (int c = 0; c < kThreadCols; ++c) {
          const int64_t i = my_row + a, j = my_col + c * kWarp;
          v[a][c] = (i < rows && j < n) ? load(m[i * ldm + j]) : Acc(0);
        }
      }
    }
    for (int k0 = 0; k0 < rank; k0 += kRankChunk) {
      __syncthreads();  // the previous chunk's readers are done
      for (int e = tid; e < kDoraBlockRows * kRankChunk; e += kWarp * kWarps) {
        const int a = e / kRankChunk, k = e % kRankChunk;
        const int64_t i = row0 + a;
        ps[a][k] = (i < rows && k0 + k < rank) ? p[i * rank + k0 + k] : Acc(0);
      }
      for (int e = tid; e < kRankChunk * kStepCols; e += kWarp * kWarps) {
        const int k = e / kStepCols, c = e % kStepCols;
        const int64_t j = col0 + c;
        qs[k][c] = (j < n && k0 + k < rank) ? q[static_cast<int64_t>(k0 + k) * n + j] : Acc(0);
      }
      __syncthreads();
      core::dora_tile_update<kThreadRows, kThreadCols>(
          kRankChunk, [&](int a, int k) { return ps[ty * kThreadRows + a][k]; },
          [&](int k, int c) { return qs[k][tx + c * kWarp]; }, v);
    }
    // Elements outside M are zero (M, P and Q were read as zero there) and add nothing.
    for (int a = 0; a < kThreadRows; ++a) {
      for (int c = 0; c < kThreadCols; ++c) {
        if (kColumnSums) {
          col_sq[step][c] += v[a][c] * v[a][c];
        } else {
          row_sq[a] += v[a][c] * v[a][c];
        }
      }
    }
  }

  if (!kColumnSums) {
    for (int a = 0; a < kThreadRows; ++a) {
      Acc s = row_sq[a];
      for (int lane = kWarp / 2; lane > 0; lane /= 2) s += __shfl_xor_sync(0xffffffffu, s, lane);
      const int64_t i = row0 + ty * kThreadRows + a;
      if (tx == 0 && i < rows) partial[static_cast<int64_t>(blockIdx.x) * rows + i] = s;
    }
  } else {
    for (int step = 0; step < kSteps; ++step) {
      const int64_t col0 = block_col0 + step * kStepCols;
      if (col0 >= n) break;
      __syncthreads();
      for (int c = 0; c < kThreadCols; ++c) reduce[ty][tx + c * kWarp] = col_sq[step][c];
      __syncthreads();
      if (ty == 0) {
        for (int c = 0; c < kThreadCols; ++c) {
          Acc s = 0;
          for (int w = 0; w < kWarps; ++w) s += reduce[w][tx + c * kWarp];
          const int64_t j = col0 + tx + c * kWarp;
          if (j < n) partial[static_cast<int64_t>(blockIdx.y) * n + j] = s;
        }
      }
    }
  }
}

template <typename Acc>
__global__ void dora_finish_kernel(const Acc* __restrict__ partial, int64_t count, int64_t len,
                                   Acc* __restrict__ sums) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= len) return;
  Acc s = 0;
  for (int64_t b = 0; b < count; ++b) s += partial[b * len + i];
  sums[i] = s;
}

template <typename T, typename Acc>
cudaError_t launch_typed(const void* m, int64_t rows, int64_t n, int64_t ldm, const void* p,
                         const void* q, int rank, bool column_sums, void* scratch, void* sums,
                         cudaStream_t stream) {
  const int64_t len = column_sums ? n : rows;
  if (len == 0) return cudaSuccess;
  Acc* out = static_cast<Acc*>(sums);
  if (rows == 0 || n == 0) return cudaMemsetAsync(out, 0, len * sizeof(Acc), stream);
  const dim3 grid(static_cast<unsigned>((n + kDoraBlockCols - 1) / kDoraBlockCols),
                  static_cast<unsigned>((rows + kDoraBlockRows - 1) / kDoraBlockRows));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  const dim3 block(kWarp, kWarps);
  Acc* partial = static_cast<Acc*>(scratch);
  const T* mt = static_cast<const T*>(m);
  const Acc* pt = static_cast<const Acc*>(p);
  const Acc* qt = static_cast<const Acc*>(q);
  if (column_sums) {
    LORA_EXT_LAUNCH(grid, block, 0, stream, dora_partial_kernel<T, Acc, true>)(mt, rows, n, ldm, pt, qt, rank, partial);
  } else {
    LORA_EXT_LAUNCH(grid, block, 0, stream, dora_partial_kernel<T, Acc, false>)(mt, rows, n, ldm, pt, qt, rank, partial);
  }
  const int64_t count = dora_partial_count(rows, n, column_sums);
  const unsigned finish_blocks = static_cast<unsigned>((len + 255) / 256);
  LORA_EXT_LAUNCH(finish_blocks, 256, 0, stream, dora_finish_kernel<Acc>)(partial, count, len, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dora_sum_squares(DType dtype, const void* m, int64_t rows, int64_t n,
                                    int64_t ldm, const void* p, const void* q, int rank,
                                    bool column_sums, void* scratch, void* sums,
                                    cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float, float>(m, rows, n, ldm, p, q, rank, column_sums, scratch, sums, stream);
    case DType::kFloat64:
      return launch_typed<double, double>(m, rows, n, ldm, p, q, rank, column_sums, scratch, sums, stream);
    case DType::kFloat16:
      return launch_typed<__half, float>(m, rows, n, ldm, p, q, rank, column_sums, scratch, sums, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, float>(m, rows, n, ldm, p, q, rank, column_sums, scratch, sums, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lora_ext
