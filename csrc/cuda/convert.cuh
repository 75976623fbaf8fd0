// The storage types of the CUDA kernels, their accumulation types and the dispatch on DType: Convert<T>::Acc is
// double for double and float otherwise; load widens a stored value, store rounds to nearest
// even. One definition for every kernel file (the emulated tests include the .cu files).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lora_linear.cuh"  // DType

namespace lora_ext {
namespace cuda {

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

// Calls f(T()) for the storage type T named by dtype (a generic lambda takes T from it).
template <typename F>
cudaError_t by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float());
    case DType::kFloat64: return f(double());
    case DType::kFloat16: return f(__half());
    case DType::kBFloat16: return f(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lora_ext
