#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/nf4.h"
#include "nf4.cuh"
#include "launch.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

__constant__ float kCodeDev[core::kNF4Codes] = {LORA_EXT_NF4_CODE_VALUES};

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Conv<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Conv<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Launches f<T> for the storage type named by dtype.
template <template <typename> class Launcher, typename... Args>
cudaError_t dispatch(DType dtype, Args... args) {
  switch (dtype) {
    case DType::kFloat32: return Launcher<float>::run(args...);
    case DType::kFloat16: return Launcher<__half>::run(args...);
    case DType::kBFloat16: return Launcher<__nv_bfloat16>::run(args...);
    default: return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------- quantize

// One warp per NF4 block: the absmax by shuffles, then each lane packs pairs of codes.
template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t n, int64_t bs, int64_t blocks,
                                uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  float bounds[core::kNF4Codes - 1];
  core::nf4_bounds(kCodeDev, bounds);
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (block >= blocks) return;
  const int64_t first = block * bs;
  const int64_t len = min(bs, n - first);
  float m = 0.0f;
  for (int64_t i = lane; i < len; i += 32) m = core::absmax_fold(m, Conv<T>::load(x[first + i]));
  for (int offset = 16; offset > 0; offset >>= 1) {
    m = core::absmax_fold(m, __shfl_xor_sync(kFullMask, m, offset));
  }
  if (lane == 0) absmax[block] = m;
  const core::NF4Scaler scale = core::nf4_scaler(m, len < bs);
  for (int64_t j = lane; 2 * j < len; j += 32) {
    const int64_t e = first + 2 * j;
    const uint8_t q0 = core::nf4_encode(scale(Conv<T>::load(x[e])), bounds);
    const uint8_t q1 = 2 * j + 1 < len ? core::nf4_encode(scale(Conv<T>::load(x[e + 1])), bounds)
                                       : core::kNF4PadCode;
    packed[e >> 1] = core::nf4_pack(q0, q1);
  }
}

template <typename T>
struct QuantizeLauncher {
  static cudaError_t run(const void* x, int64_t n, int64_t bs, uint8_t* packed, float* absmax,
                         cudaStream_t stream) {
    const int64_t blocks = ceil_div(n, bs);
    LORA_EXT_LAUNCH(static_cast<unsigned>(ceil_div(blocks, kWarps)), kThreads, 0, stream, quantize_kernel<T>)(
        static_cast<const T*>(x), n, bs, blocks, packed, absmax);
    return cudaGetLastError();
  }
};

// ---------------------------------------------------------------- dequantize

// Eight outputs per thread from one 32-bit word of packed codes (row_len, col0 and cols
// multiples of 8, so a group never straddles a block or a row).
template <typename T>
__global__ void dequant8_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                int bs_shift, int64_t row_len, int64_t row0, int64_t col0,
                                int64_t rows, int64_t cols, T* __restrict__ out) {
  const int64_t groups_per_row = cols / 8;
  const int64_t total = rows * groups_per_row;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = g / groups_per_row, c = (g - r * groups_per_row) * 8;
    const int64_t e = (row0 + r) * row_len + col0 + c;
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + (e >> 1));
    const float s = absmax[e >> bs_shift];
    union {
      T v[8];
      uint4 u[sizeof(T) * 8 / 16];
    } result;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = (word >> (8 * i)) & 0xFFu;
      result.v[2 * i] = Conv<T>::store(core::nf4_value(kCodeDev, byte >> 4, s));
      result.v[2 * i + 1] = Conv<T>::store(core::nf4_value(kCodeDev, byte & 15, s));
    }
    uint4* dst = reinterpret_cast<uint4*>(out + r * cols + c);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(T) * 8 / 16); ++i) dst[i] = result.u[i];
  }
}

template <typename T>
__global__ void dequant1_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                int bs_shift, int64_t row_len, int64_t row0, int64_t col0,
                                int64_t rows, int64_t cols, T* __restrict__ out) {
  const int64_t total = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    const int64_t e = (row0 + r) * row_len + col0 + c;
    out[i] = Conv<T>::store(core::nf4_value(kCodeDev, core::nf4_code_at(packed, e), absmax[e >> bs_shift]));
  }
}

unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), kMaxGridStrideBlocks)));
}

template <typename T>
struct DequantLauncher {
  static cudaError_t run(const uint8_t* packed, const float* absmax, int bs_shift, int64_t row_len,
                         int64_t row0, int64_t col0, int64_t rows, int64_t cols, void* out,
                         cudaStream_t stream) {
    T* o = static_cast<T*>(out);
    const bool vec = row_len % 8 == 0 && col0 % 8 == 0 && cols % 8 == 0 && aligned(packed, 4) &&
                     aligned(out, 16);
    if (vec) {
      LORA_EXT_LAUNCH(grid_for(rows * cols / 8), kThreads, 0, stream, dequant8_kernel<T>)(
          packed, absmax, bs_shift, row_len, row0, col0, rows, cols, o);
    } else {
      LORA_EXT_LAUNCH(grid_for(rows * cols), kThreads, 0, stream, dequant1_kernel<T>)(
          packed, absmax, bs_shift, row_len, row0, col0, rows, cols, o);
    }
    return cudaGetLastError();
  }
};

// ---------------------------------------------------------------- GEMV

template <typename T>
__device__ __forceinline__ void load8(const T* p, float* f) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  } else {
    union {
      uint4 u;
      T v[8];
    } data;
    data.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = Conv<T>::load(data.v[i]);
  }
}

// One warp per output feature. Fast path: each lane takes 32 codes (16 bytes) at a time, so
// the warp streams 512 contiguous bytes of the packed row per step; x rows stay in L1/L2.
template <typename T, int R, bool kVec>
__global__ void gemv_kernel(const T* __restrict__ x, int64_t in, const uint8_t* __restrict__ packed,
                            const float* __restrict__ absmax, int bs_shift, const T* __restrict__ bias,
                            T* __restrict__ y, int64_t out) {
  __shared__ float lut[core::kNF4Codes];
  if (threadIdx.x < core::kNF4Codes) lut[threadIdx.x] = kCodeDev[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (o >= out) return;
  const int64_t e0 = o * in;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  if constexpr (kVec) {
    const uint4* row = reinterpret_cast<const uint4*>(packed + (e0 >> 1));
    for (int64_t g = lane; g < in / 32; g += 32) {
      const uint4 word = row[g];
      const float s = absmax[(e0 + g * 32) >> bs_shift];
      const uint32_t parts[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
      for (int part = 0; part < 4; ++part) {
        float w[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t byte = (parts[part] >> (8 * i)) & 0xFFu;
          w[2 * i] = lut[byte >> 4] * s;
          w[2 * i + 1] = lut[byte & 15] * s;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float xv[8];
          load8(x + r * in + g * 32 + part * 8, xv);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r] = fmaf(w[i], xv[i], acc[r]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < in; k += 32) {
      const int64_t e = e0 + k;
      const float w = lut[core::nf4_code_at(packed, e)] * absmax[e >> bs_shift];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = fmaf(w, Conv<T>::load(x[r * in + k]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int offset = 16; offset > 0; offset >>= 1) acc[r] += __shfl_xor_sync(kFullMask, acc[r], offset);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? Conv<T>::load(bias[o]) : 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) y[r * out + o] = Conv<T>::store(acc[r] + b);
  }
}

template <typename T, int R>
cudaError_t gemv_rows(const T* x, int64_t in, const uint8_t* packed, const float* absmax, int bs_shift,
                      const T* bias, T* y, int64_t out, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(out, kWarps));
  const bool vec = in % 32 == 0 && aligned(packed, 16) && aligned(x, 16);
  if (vec) {
    LORA_EXT_LAUNCH(grid, kThreads, 0, stream, gemv_kernel<T, R, true>)(x, in, packed, absmax, bs_shift, bias, y, out);
  } else {
    LORA_EXT_LAUNCH(grid, kThreads, 0, stream, gemv_kernel<T, R, false>)(x, in, packed, absmax, bs_shift, bias, y, out);
  }
  return cudaGetLastError();
}

template <typename T>
struct GemvLauncher {
  static cudaError_t run(const void* xv, int64_t rows, int64_t in, const uint8_t* packed,
                         const float* absmax, int bs_shift, const void* biasv, void* yv, int64_t out,
                         cudaStream_t stream) {
    const T* x = static_cast<const T*>(xv);
    const T* bias = static_cast<const T*>(biasv);
    T* y = static_cast<T*>(yv);
    // Up to four rows share each decoded weight; more rows run in further passes.
    for (int64_t r = 0; r < rows; r += 4) {
      const int64_t left = std::min<int64_t>(4, rows - r);
      const T* xr = x + r * in;
      T* yr = y + r * out;
      cudaError_t err;
      switch (left) {
        case 1: err = gemv_rows<T, 1>(xr, in, packed, absmax, bs_shift, bias, yr, out, stream); break;
        case 2: err = gemv_rows<T, 2>(xr, in, packed, absmax, bs_shift, bias, yr, out, stream); break;
        case 3: err = gemv_rows<T, 3>(xr, in, packed, absmax, bs_shift, bias, yr, out, stream); break;
        default: err = gemv_rows<T, 4>(xr, in, packed, absmax, bs_shift, bias, yr, out, stream); break;
      }
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
};

// ---------------------------------------------------------------- double quantisation

__global__ void quantize_absmax_kernel(const float* __restrict__ c, int64_t n,
                                       const float* __restrict__ code, int64_t bs, int64_t blocks,
                                       uint8_t* __restrict__ codes, float* __restrict__ absmax2) {
  __shared__ float mids[core::kDynamicCodes - 1];
  for (int j = threadIdx.x; j < core::kDynamicCodes - 1; j += blockDim.x) {
    mids[j] = core::mul_rn(0.5f, core::add_rn(code[j], code[j + 1]));
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (block >= blocks) return;
  const int64_t first = block * bs, len = min(bs, n - first);
  float m = 0.0f;
  for (int64_t i = lane; i < len; i += 32) m = core::dynamic_absmax_fold(m, c[first + i]);
  for (int offset = 16; offset > 0; offset >>= 1) {
    m = core::dynamic_absmax_fold(m, __shfl_xor_sync(kFullMask, m, offset));
  }
  if (lane == 0) absmax2[block] = m;
  const float inv = core::div_rn(1.0f, m);
  for (int64_t i = lane; i < len; i += 32) {
    codes[first + i] = m == 0.0f ? 0 : core::dynamic_encode(core::mul_rn(c[first + i], inv), mids);
  }
}

__global__ void dequantize_absmax_kernel(const uint8_t* __restrict__ codes, int64_t n,
                                         const float* __restrict__ absmax2,
                                         const float* __restrict__ offset,
                                         const float* __restrict__ code, int64_t bs,
                                         float* __restrict__ out) {
  const float off = *offset;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = core::dynamic_dequantize(code, codes[i], absmax2[i / bs], off);
  }
}

}  // namespace

cudaError_t launch_nf4_quantize(DType dtype, const void* x, int64_t n, int64_t blocksize,
                                uint8_t* packed, float* absmax, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch<QuantizeLauncher>(dtype, x, n, blocksize, packed, absmax, stream);
}

cudaError_t launch_nf4_dequantize_2d(DType dtype, const uint8_t* packed, const float* absmax,
                                     int64_t blocksize, int64_t row_len, int64_t row0,
                                     int64_t col0, int64_t rows, int64_t cols, void* out,
                                     cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  return dispatch<DequantLauncher>(dtype, packed, absmax, core::log2_pow2(blocksize), row_len, row0,
                                   col0, rows, cols, out, stream);
}

cudaError_t launch_nf4_gemv(DType dtype, const void* x, int64_t rows, int64_t in,
                            const uint8_t* packed, const float* absmax, int64_t blocksize,
                            const void* bias, void* y, int64_t out, cudaStream_t stream) {
  if (rows == 0 || out == 0) return cudaSuccess;
  return dispatch<GemvLauncher>(dtype, x, rows, in, packed, absmax, core::log2_pow2(blocksize), bias,
                                y, out, stream);
}

cudaError_t launch_quantize_absmax(const float* centred, int64_t n, const float* code,
                                   int64_t blocksize, uint8_t* codes, float* absmax2,
                                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(n, blocksize);
  LORA_EXT_LAUNCH(static_cast<unsigned>(ceil_div(blocks, kWarps)), kThreads, 0, stream, quantize_absmax_kernel)(
      centred, n, code, blocksize, blocks, codes, absmax2);
  return cudaGetLastError();
}

cudaError_t launch_dequantize_absmax(const uint8_t* codes, int64_t n, const float* absmax2,
                                     const float* offset, const float* code, int64_t blocksize,
                                     float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  LORA_EXT_LAUNCH(grid_for(n), kThreads, 0, stream, dequantize_absmax_kernel)(codes, n, absmax2, offset, code,
                                                                 blocksize, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lora_ext
