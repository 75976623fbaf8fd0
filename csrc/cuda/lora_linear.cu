#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "convert.cuh"
#include "launch.cuh"
#include "lora_linear.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One thread per group of four elements: one Philox call feeds four lanes.
template <typename T>
__global__ void dropout_apply_kernel(const T* __restrict__ x, T* __restrict__ dropped,
                                     T* __restrict__ grad,
                                     int64_t numel, uint64_t seed, uint64_t offset,
                                     uint32_t threshold, typename Convert<T>::Acc scale) {
  using Acc = typename Convert<T>::Acc;
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const unsigned keep = core::dropout_keep_bits(seed, offset, threshold, g);
    core::dropout_apply_group(
        keep, static_cast<uint64_t>(g), numel, scale, x, dropped, grad,
        [](T v) { return Convert<T>::load(v); }, [](Acc v) { return Convert<T>::store(v); });
  }
}

__global__ void dropout_mask_kernel(bool* __restrict__ mask, int64_t numel, uint64_t seed,
                                    uint64_t offset, uint32_t threshold) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const unsigned keep = core::dropout_keep_bits(seed, offset, threshold, g);
    for (int lane = 0; lane < 4 && g * 4 + lane < numel; ++lane) {
      mask[g * 4 + lane] = (keep >> lane) & 1u;
    }
  }
}

// drop(x) of the elements of group g that lie in [first, last): v[q] = mask * scale * x[4g + q]
// (zero outside the range). Rows need not start on a group boundary, so a group may be shared
// by two rows; each takes its own part.
template <typename T, typename Acc>
__device__ __forceinline__ void dropped_group(const T* __restrict__ x, int64_t g, int64_t first,
                                              int64_t last, const core::DropoutParams& p,
                                              Acc scale, Acc (&v)[4]) {
  const unsigned keep = core::dropout_keep_bits(p.seed, p.offset, p.threshold, g);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t e = 4 * g + q;
    v[q] = (e >= first && e < last && ((keep >> q) & 1u)) ? Convert<T>::load(x[e]) * scale : Acc(0);
  }
}

constexpr int kShrinkWarps = 8;  // rows per block
constexpr int kShrinkRanks = 16;  // outputs of a row accumulated per pass over it

// Warp w of block b takes rows b * kShrinkWarps + w, then strides by the grid. Per row and per
// chunk of kShrinkRanks outputs, each lane walks the row's Philox groups 32 apart, then the
// warp sums its lanes by shuffles.
template <typename T>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    lora_shrink_dropout_kernel(const T* __restrict__ x, const T* __restrict__ A, T* __restrict__ z,
                               int64_t rows, int64_t in, int64_t r, core::DropoutParams params) {
  using Acc = typename Convert<T>::Acc;
  const int lane = threadIdx.x & 31;
  const Acc scale = static_cast<Acc>(params.scale);
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kShrinkWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kShrinkWarps + (threadIdx.x >> 5); t < rows;
       t += row_stride) {
    const int64_t first = t * in, last = first + in;
    const int64_t g_first = first / 4, g_last = (last + 3) / 4;
    for (int64_t j0 = 0; j0 < r; j0 += kShrinkRanks) {
      Acc acc[kShrinkRanks];
#pragma unroll
      for (int j = 0; j < kShrinkRanks; ++j) acc[j] = Acc(0);
      for (int64_t g = g_first + lane; g < g_last; g += 32) {
        Acc v[4];
        dropped_group(x, g, first, last, params, scale, v);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t k = 4 * g + q - first;
          if (k < 0 || k >= in) continue;  // the part of a shared group in the next row
#pragma unroll
          for (int j = 0; j < kShrinkRanks; ++j) {
            if (j0 + j < r) acc[j] += v[q] * Convert<T>::load(A[(j0 + j) * in + k]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kShrinkRanks; ++j) {
        Acc s = acc[j];
        for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
        if (lane == 0 && j0 + j < r) z[t * r + j0 + j] = Convert<T>::store(s);
      }
    }
  }
}

constexpr int kGradACols = 128;   // columns of grad_A per block, one per thread
constexpr int kGradARanks = 16;   // rows of grad_A per block, accumulated in registers
constexpr int kGradARowsPerTile = 256;
constexpr int kGradAMaxTiles = 64;

int64_t grad_a_tiles(int64_t rows) {
  const int64_t tiles = (rows + kGradARowsPerTile - 1) / kGradARowsPerTile;
  return tiles < 1 ? 1 : (tiles > kGradAMaxTiles ? kGradAMaxTiles : tiles);
}

// Block (c, j, tile): columns c * kGradACols + threadIdx.x, grad_A rows j * kGradARanks + ..,
// over the rows of its tile; grad_z's row segment is staged in shared memory for all threads.
template <typename T>
__global__ void __launch_bounds__(kGradACols)
    lora_grad_a_partial_kernel(const T* __restrict__ grad_z, const T* __restrict__ x,
                               typename Convert<T>::Acc* __restrict__ partial, int64_t rows,
                               int64_t in, int64_t r, int64_t rows_per_tile,
                               core::DropoutParams params) {
  using Acc = typename Convert<T>::Acc;
  __shared__ Acc gz[kGradARanks];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kGradACols + threadIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kGradARanks;
  const int64_t t0 = static_cast<int64_t>(blockIdx.z) * rows_per_tile;
  const int64_t t1 = t0 + rows_per_tile < rows ? t0 + rows_per_tile : rows;
  const Acc scale = static_cast<Acc>(params.scale);
  Acc acc[kGradARanks];
#pragma unroll
  for (int j = 0; j < kGradARanks; ++j) acc[j] = Acc(0);
  for (int64_t t = t0; t < t1; ++t) {
    __syncthreads();  // the previous row's readers are done
    if (threadIdx.x < kGradARanks) {
      const int64_t j = j0 + threadIdx.x;
      gz[threadIdx.x] = j < r ? Convert<T>::load(grad_z[t * r + j]) : Acc(0);
    }
    __syncthreads();
    if (k < in) {
      const int64_t e = t * in + k;
      const unsigned keep = core::dropout_keep_bits(params.seed, params.offset, params.threshold,
                                                    static_cast<uint64_t>(e / 4));
      if ((keep >> (e % 4)) & 1u) {
        const Acc v = Convert<T>::load(x[e]) * scale;
#pragma unroll
        for (int j = 0; j < kGradARanks; ++j) acc[j] += gz[j] * v;
      }
    }
  }
  if (k < in) {
    Acc* out = partial + static_cast<int64_t>(blockIdx.z) * r * in;
#pragma unroll
    for (int j = 0; j < kGradARanks; ++j) {
      if (j0 + j < r) out[(j0 + j) * in + k] = acc[j];
    }
  }
}

template <typename T>
__global__ void lora_grad_a_finish_kernel(const typename Convert<T>::Acc* __restrict__ partial,
                                          int64_t tiles, int64_t len, T* __restrict__ grad_A) {
  using Acc = typename Convert<T>::Acc;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len; i += stride) {
    Acc s = Acc(0);
    for (int64_t b = 0; b < tiles; ++b) s += partial[b * len + i];
    grad_A[i] = Convert<T>::store(s);
  }
}

unsigned grid_for(int64_t numel) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxGridStrideBlocks ? (blocks > 0 ? blocks : 1)
                                                              : kMaxGridStrideBlocks);
}

template <typename T>
cudaError_t shrink_typed(const void* x, const void* A, void* z, int64_t rows, int64_t in, int64_t r,
                         const core::DropoutParams& params, cudaStream_t stream) {
  const int64_t blocks = (rows + kShrinkWarps - 1) / kShrinkWarps;
  const unsigned grid = static_cast<unsigned>(blocks < kMaxGridStrideBlocks ? blocks : kMaxGridStrideBlocks);
  LORA_EXT_LAUNCH(grid, kShrinkWarps * 32, 0, stream, lora_shrink_dropout_kernel<T>)(
      static_cast<const T*>(x), static_cast<const T*>(A), static_cast<T*>(z), rows, in, r, params);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_a_typed(const void* grad_z, const void* x, void* grad_A, void* scratch, int64_t rows,
                         int64_t in, int64_t r, const core::DropoutParams& params,
                         cudaStream_t stream) {
  using Acc = typename Convert<T>::Acc;
  const int64_t tiles = grad_a_tiles(rows);
  const int64_t rows_per_tile = (rows + tiles - 1) / tiles;
  const int64_t ranks = (r + kGradARanks - 1) / kGradARanks;
  if (ranks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>((in + kGradACols - 1) / kGradACols), static_cast<unsigned>(ranks),
                  static_cast<unsigned>(tiles));
  Acc* partial = static_cast<Acc*>(scratch);
  LORA_EXT_LAUNCH(grid, kGradACols, 0, stream, lora_grad_a_partial_kernel<T>)(
      static_cast<const T*>(grad_z), static_cast<const T*>(x), partial, rows, in, r, rows_per_tile,
      params);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t len = r * in;
  LORA_EXT_LAUNCH(grid_for(4 * len), kThreads, 0, stream, lora_grad_a_finish_kernel<T>)(
      partial, tiles, len, static_cast<T*>(grad_A));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* x, void* dropped, void* grad, int64_t numel,
                         const core::DropoutParams& params, cudaStream_t stream) {
  using Acc = typename Convert<T>::Acc;
  LORA_EXT_LAUNCH(grid_for(numel), kThreads, 0, stream, dropout_apply_kernel<T>)(
      static_cast<const T*>(x), static_cast<T*>(dropped), static_cast<T*>(grad), numel, params.seed, params.offset, params.threshold,
      static_cast<Acc>(params.scale));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dropout_apply(DType dtype, const void* x, void* dropped, void* grad,
                                 int64_t numel, const core::DropoutParams& params,
                                 cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(x, dropped, grad, numel, params, stream);
    case DType::kFloat64: return launch_typed<double>(x, dropped, grad, numel, params, stream);
    case DType::kFloat16: return launch_typed<__half>(x, dropped, grad, numel, params, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, dropped, grad, numel, params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dropout_mask(bool* mask, int64_t numel, const core::DropoutParams& params,
                                cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  LORA_EXT_LAUNCH(grid_for(numel), kThreads, 0, stream, dropout_mask_kernel)(mask, numel, params.seed,
                                                                 params.offset, params.threshold);
  return cudaGetLastError();
}

cudaError_t launch_lora_shrink_dropout(DType dtype, const void* x, const void* lora_A, void* z,
                                       int64_t rows, int64_t in, int64_t r,
                                       const core::DropoutParams& params, cudaStream_t stream) {
  if (rows == 0 || r == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    return shrink_typed<decltype(tag)>(x, lora_A, z, rows, in, r, params, stream);
  });
}

int64_t lora_grad_a_scratch(int64_t rows, int64_t in, int64_t r) { return grad_a_tiles(rows) * r * in; }

cudaError_t launch_lora_grad_a_dropout(DType dtype, const void* grad_z, const void* x,
                                       void* grad_A, void* scratch, int64_t rows, int64_t in,
                                       int64_t r, const core::DropoutParams& params,
                                       cudaStream_t stream) {
  if (in == 0 || r == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    return grad_a_typed<decltype(tag)>(grad_z, x, grad_A, scratch, rows, in, r, params, stream);
  });
}

}  // namespace cuda
}  // namespace lora_ext
