#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/bgmv.h"
#include "bgmv.cuh"
#include "convert.cuh"
#include "launch.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kWarps = 4;          // shrink: one warp per (row, rank) output
constexpr int kExpandThreads = 256;  // expand: one thread per (row, output feature)

__device__ __forceinline__ int64_t row_slot(const RowAdapters& a, int64_t row) {
  int64_t index;
  if (a.num_segments >= 0) {
    const int64_t s = core::sgmv_segment_of_row(a.seg_starts, a.num_segments, row);
    index = s < 0 ? -1 : a.seg_adapter[s];
  } else {
    index = a.idx[row];
  }
  return core::bgmv_slot(index, a.num_adapters);
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// grid (rows, ceil(r / kWarps)); warp w of block (t, b) computes z[t, b * kWarps + w].
template <typename T>
__global__ void shrink_kernel(const T* __restrict__ x, const T* __restrict__ A, T* __restrict__ z,
                              int64_t in, int64_t r, RowAdapters adapters) {
  using C = Convert<T>;
  using Acc = typename C::Acc;
  const int64_t t = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (j >= r) return;
  const int64_t slot = row_slot(adapters, t);
  Acc acc = Acc(0);
  if (slot >= 0) {
    acc = core::bgmv_dot<Acc>(x + t * in, A + (slot * r + j) * in, in, lane, 32,
                              [](T v) { return C::load(v); });
    acc = warp_sum(acc);
  }
  if (lane == 0) z[t * r + j] = C::store(acc);
}

// grid (rows, ceil(out / kExpandThreads)); z[t, :] is staged in shared memory.
template <typename T>
__global__ void expand_kernel(T* __restrict__ y, const T* __restrict__ z, const T* __restrict__ B,
                              const float* __restrict__ scale, int64_t out, int64_t r,
                              RowAdapters adapters) {
  using C = Convert<T>;
  using Acc = typename C::Acc;
  extern __shared__ unsigned char smem_raw[];
  Acc* zs = reinterpret_cast<Acc*>(smem_raw);
  const int64_t t = blockIdx.x;
  const int64_t slot = row_slot(adapters, t);
  if (slot < 0) return;  // the whole block agrees: no adapter, y unchanged
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) zs[j] = C::load(z[t * r + j]);
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (o >= out) return;
  const T* Bo = B + (slot * out + o) * r;
  Acc sum = Acc(0);
  for (int64_t j = 0; j < r; ++j) sum += zs[j] * C::load(Bo[j]);
  T* yo = y + t * out + o;
  *yo = C::store(C::load(*yo) + static_cast<Acc>(scale[slot]) * sum);
}

template <typename T>
cudaError_t shrink_typed(const void* x, const void* A, void* z, int64_t rows, int64_t in, int64_t r,
                         RowAdapters adapters, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((r + kWarps - 1) / kWarps));
  LORA_EXT_LAUNCH(grid, kWarps * 32, 0, stream, shrink_kernel<T>)(static_cast<const T*>(x),
                                                      static_cast<const T*>(A),
                                                      static_cast<T*>(z), in, r, adapters);
  return cudaGetLastError();
}

template <typename T>
cudaError_t expand_typed(void* y, const void* z, const void* B, const float* scale, int64_t rows,
                         int64_t out, int64_t r, RowAdapters adapters, cudaStream_t stream) {
  using Acc = typename Convert<T>::Acc;
  const dim3 grid(static_cast<unsigned>(rows),
                  static_cast<unsigned>((out + kExpandThreads - 1) / kExpandThreads));
  const size_t smem = static_cast<size_t>(r) * sizeof(Acc);
  LORA_EXT_LAUNCH(grid, kExpandThreads, smem, stream, expand_kernel<T>)(
      static_cast<T*>(y), static_cast<const T*>(z), static_cast<const T*>(B), scale, out, r,
      adapters);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bgmv_shrink(DType dtype, const void* x, const void* lora_A, void* z,
                               int64_t rows, int64_t in, int64_t r, RowAdapters adapters,
                               cudaStream_t stream) {
  if (rows == 0 || r == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return shrink_typed<float>(x, lora_A, z, rows, in, r, adapters, stream);
    case DType::kFloat64: return shrink_typed<double>(x, lora_A, z, rows, in, r, adapters, stream);
    case DType::kFloat16: return shrink_typed<__half>(x, lora_A, z, rows, in, r, adapters, stream);
    case DType::kBFloat16:
      return shrink_typed<__nv_bfloat16>(x, lora_A, z, rows, in, r, adapters, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_bgmv_expand(DType dtype, void* y, const void* z, const void* lora_B,
                               const float* scale, int64_t rows, int64_t out, int64_t r,
                               RowAdapters adapters, cudaStream_t stream) {
  if (rows == 0 || out == 0 || r == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return expand_typed<float>(y, z, lora_B, scale, rows, out, r, adapters, stream);
    case DType::kFloat64:
      return expand_typed<double>(y, z, lora_B, scale, rows, out, r, adapters, stream);
    case DType::kFloat16:
      return expand_typed<__half>(y, z, lora_B, scale, rows, out, r, adapters, stream);
    case DType::kBFloat16:
      return expand_typed<__nv_bfloat16>(y, z, lora_B, scale, rows, out, r, adapters, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lora_ext
