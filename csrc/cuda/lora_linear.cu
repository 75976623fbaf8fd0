#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora_linear.cuh"
#include "launch.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  using Acc = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Convert<double> {
  using Acc = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};
template <>
struct Convert<__half> {
  using Acc = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  using Acc = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

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

unsigned grid_for(int64_t numel) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxGridStrideBlocks ? (blocks > 0 ? blocks : 1)
                                                              : kMaxGridStrideBlocks);
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

}  // namespace cuda
}  // namespace lora_ext
