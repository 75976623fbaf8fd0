#include <algorithm>
#include <type_traits>

#include <mma.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/nf4.h"
#include "nf4.cuh"
#include "convert.cuh"
#include "launch.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

__constant__ float kCodeDev[core::kNF4Codes] = {LORA_EXT_NF4_CODE_VALUES};

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
  for (int64_t i = lane; i < len; i += 32) m = core::absmax_fold(m, Convert<T>::load(x[first + i]));
  for (int offset = 16; offset > 0; offset >>= 1) {
    m = core::absmax_fold(m, __shfl_xor_sync(kFullMask, m, offset));
  }
  if (lane == 0) absmax[block] = m;
  const core::NF4Scaler scale = core::nf4_scaler(m, len < bs);
  for (int64_t j = lane; 2 * j < len; j += 32) {
    const int64_t e = first + 2 * j;
    const uint8_t q0 = core::nf4_encode(scale(Convert<T>::load(x[e])), bounds);
    const uint8_t q1 = 2 * j + 1 < len ? core::nf4_encode(scale(Convert<T>::load(x[e + 1])), bounds)
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
      result.v[2 * i] = Convert<T>::store(core::nf4_value(kCodeDev, byte >> 4, s));
      result.v[2 * i + 1] = Convert<T>::store(core::nf4_value(kCodeDev, byte & 15, s));
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
    out[i] = Convert<T>::store(core::nf4_value(kCodeDev, core::nf4_code_at(packed, e), absmax[e >> bs_shift]));
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
    for (int i = 0; i < 8; ++i) f[i] = Convert<T>::load(data.v[i]);
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
      for (int r = 0; r < R; ++r) acc[r] = fmaf(w, Convert<T>::load(x[r * in + k]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int offset = 16; offset > 0; offset >>= 1) acc[r] += __shfl_xor_sync(kFullMask, acc[r], offset);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? Convert<T>::load(bias[o]) : 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) y[r * out + o] = Convert<T>::store(acc[r] + b);
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
    // Every row shares each decoded weight in one pass: the packed bytes are read once.
    static_assert(kGemvMaxRows == 8, "one case per row count");
    switch (rows) {
      case 1: return gemv_rows<T, 1>(x, in, packed, absmax, bs_shift, bias, y, out, stream);
      case 2: return gemv_rows<T, 2>(x, in, packed, absmax, bs_shift, bias, y, out, stream);
      case 3: return gemv_rows<T, 3>(x, in, packed, absmax, bs_shift, bias, y, out, stream);
      case 4: return gemv_rows<T, 4>(x, in, packed, absmax, bs_shift, bias, y, out, stream);
      case 5: return gemv_rows<T, 5>(x, in, packed, absmax, bs_shift, bias, y, out, stream);
      case 6: return gemv_rows<T, 6>(x, in, packed, absmax, bs_shift, bias, y, out, stream);
      case 7: return gemv_rows<T, 7>(x, in, packed, absmax, bs_shift, bias, y, out, stream);
      case 8: return gemv_rows<T, 8>(x, in, packed, absmax, bs_shift, bias, y, out, stream);
      default: return cudaErrorInvalidValue;
    }
  }
};

// ---------------------------------------------------------------- tiled GEMM
//
// y [M, N] = x [M, K] . B [K, N] (+ bias [N]), B the NF4 weight W seen as W [N, K]ᵀ (the
// forward: B's element (k, n) is W's e = n * K + k) or as W [K, N] itself (the gradient of x,
// kTransW: e = k * N + n). Each block owns a kTileM x kTileN tile of y; per step of kTileK it
// decodes its kTileN x kTileK tile of W into shared memory once and multiplies the x tile with
// it, so W is never written to global memory and each packed byte is read once per row tile.
// fp32 accumulation; bf16/fp16 on the tensor cores (sm_80 on), fp32 in registers (4 x 4 per
// thread). Few tiles (few rows) would leave most of a GPU idle, each block walking all of K:
// then K is split over blockIdx.z, each split writes its fp32 partial tile to a workspace and
// a second kernel adds the splits in a fixed order (deterministic), adds bias and rounds once.

constexpr int kTileM = 64, kTileN = 64, kTileK = 64;  // a tile row of W: 32 bytes, one sector
constexpr int kGemmThreads = 256;
// Split K until there are this many blocks (an H100 holds 5 of these per SM, 660 at once),
// each split at least two K tiles long, at most kMaxSplits of them, and so few that the
// partial tiles' round trip (8 bytes per split per element of y) stays within the packed
// weight's bytes (K / 2 per column): splits <= K / (16 rows).
constexpr int64_t kGemmTargetBlocks = 1024;
constexpr int64_t kMaxSplits = 16;
// gridDim.y stops at 65535: taller x runs in slabs of rows.
constexpr int64_t kRowSlab = int64_t{65535} * kTileM;

struct GemmArgs {
  const void* x;
  const uint8_t* packed;
  const float* absmax;
  const void* bias;  // [N] or null
  void* y;
  int64_t m, n, k;
  int bs_shift;
  int64_t k_split = 0;       // K elements per split (a multiple of kTileK); 0: all of K
  float* partial = nullptr;  // [splits, m, n] fp32 partial sums, or null: y directly
};

// Calls put(n, k, value) for the kTileN x kTileK tile of B at (n0, k0), zeros past its edges.
// Along a row of W eight codes are one 32-bit word when the row length is a multiple of 8
// (vec); the eight then share one absmax, blocksizes being multiples of 8.
template <bool kTransW, typename Put>
__device__ __forceinline__ void load_w_tile(const GemmArgs& a, const float* lut, int64_t n0,
                                            int64_t k0, bool vec, Put put) {
  // The tile in W's own layout: R rows of C consecutive elements.
  constexpr int R = kTransW ? kTileK : kTileN, C = kTransW ? kTileN : kTileK;
  const int64_t r0 = kTransW ? k0 : n0, c0 = kTransW ? n0 : k0;
  const int64_t rows = kTransW ? a.k : a.n, row_len = kTransW ? a.n : a.k;
  for (int g = threadIdx.x; g < R * C / 8; g += kGemmThreads) {
    const int r = g / (C / 8), c = g % (C / 8) * 8;
    const int64_t wr = r0 + r, wc = c0 + c;
    float v[8];
    if (vec) {
      if (wr < rows && wc < row_len) {
        const int64_t e = wr * row_len + wc;
        const uint32_t word = *reinterpret_cast<const uint32_t*>(a.packed + (e >> 1));
        const float s = a.absmax[e >> a.bs_shift];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t byte = (word >> (8 * i)) & 0xFFu;
          v[2 * i] = core::nf4_value(lut, byte >> 4, s);
          v[2 * i + 1] = core::nf4_value(lut, byte & 15, s);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t e = wr * row_len + wc + i;
        v[i] = wr < rows && wc + i < row_len
                   ? core::nf4_value(lut, core::nf4_code_at(a.packed, e), a.absmax[e >> a.bs_shift])
                   : 0.0f;
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if constexpr (kTransW) {
        put(c + i, r, v[i]);
      } else {
        put(r, c + i, v[i]);
      }
    }
  }
}

// Calls put(m, k, value) for the kTileM x kTileK tile of x at (m0, k0), zeros past its edges.
template <typename T, typename Put>
__device__ __forceinline__ void load_x_tile(const GemmArgs& a, int64_t m0, int64_t k0, bool vec,
                                            Put put) {
  const T* x = static_cast<const T*>(a.x);
  for (int g = threadIdx.x; g < kTileM * kTileK / 8; g += kGemmThreads) {
    const int r = g / (kTileK / 8), c = g % (kTileK / 8) * 8;
    const int64_t m = m0 + r, k = k0 + c;
    float v[8];
    if (vec && m < a.m && k < a.k) {
      load8(x + m * a.k + k, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = m < a.m && k + i < a.k ? Convert<T>::load(x[m * a.k + k + i]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) put(r, c + i, v[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store_y(const GemmArgs& a, int64_t m, int64_t n, float acc) {
  if (m >= a.m || n >= a.n) return;
  if (a.partial != nullptr) {
    a.partial[(blockIdx.z * a.m + m) * a.n + n] = acc;
    return;
  }
  const float b = a.bias != nullptr ? Convert<T>::load(static_cast<const T*>(a.bias)[n]) : 0.0f;
  static_cast<T*>(a.y)[m * a.n + n] = Convert<T>::store(acc + b);
}

// fp32 tiles in shared memory, k-major so that a thread reads its 4 x values and 4 weights
// of each k as two 16-byte words.
template <typename T, bool kTransW>
__device__ __forceinline__ void gemm_simt(const GemmArgs& a, bool w_vec, bool x_vec) {
  __shared__ float lut[core::kNF4Codes];
  alignas(16) __shared__ float xs[kTileK][kTileM + 4];
  alignas(16) __shared__ float ws[kTileK][kTileN + 4];
  if (threadIdx.x < core::kNF4Codes) lut[threadIdx.x] = kCodeDev[threadIdx.x];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int tm = threadIdx.x / (kTileN / 4) * 4, tn = threadIdx.x % (kTileN / 4) * 4;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  const int64_t k_begin = blockIdx.z * a.k_split, k_end = a.k_split > 0 ? min(a.k, k_begin + a.k_split) : a.k;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    __syncthreads();  // the table is written and the previous tiles are consumed
    load_x_tile<T>(a, m0, k0, x_vec, [&](int m, int k, float v) { xs[k][m] = v; });
    load_w_tile<kTransW>(a, lut, n0, k0, w_vec, [&](int n, int k, float v) { ws[k][n] = v; });
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTileK; ++k) {
      const float4 xv = *reinterpret_cast<const float4*>(&xs[k][tm]);
      const float4 wv = *reinterpret_cast<const float4*>(&ws[k][tn]);
      const float xr[4] = {xv.x, xv.y, xv.z, xv.w}, wr[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xr[i], wr[j], acc[i][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) store_y<T>(a, m0 + tm + i, n0 + tn + j, acc[i][j]);
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// bf16/fp16 tiles (W rounded to x's dtype, as the dequantise-then-GEMM path rounds it) on the
// tensor cores: eight warps, each a 16 x 32 slab of the y tile as two 16 x 16 fragments.
template <typename T, bool kTransW>
__device__ __forceinline__ void gemm_mma(const GemmArgs& a, bool w_vec, bool x_vec) {
  namespace wmma = nvcuda::wmma;
  constexpr int kLd = kTileK + 8;  // 16-byte row padding against bank conflicts
  constexpr int kLdY = kTileN + 4;
  __shared__ float lut[core::kNF4Codes];
  alignas(128) __shared__ T xs[kTileM][kLd];  // A = x tile, row-major
  alignas(128) __shared__ T ws[kTileN][kLd];  // B = W tile, column-major (a row of W per n)
  alignas(128) __shared__ float ys[kTileM][kLdY];
  if (threadIdx.x < core::kNF4Codes) lut[threadIdx.x] = kCodeDev[threadIdx.x];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 16, wn = (warp & 1) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  const int64_t k_begin = blockIdx.z * a.k_split, k_end = a.k_split > 0 ? min(a.k, k_begin + a.k_split) : a.k;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    __syncthreads();
    load_x_tile<T>(a, m0, k0, x_vec, [&](int m, int k, float v) { xs[m][k] = Convert<T>::store(v); });
    load_w_tile<kTransW>(a, lut, n0, k0, w_vec, [&](int n, int k, float v) { ws[n][k] = Convert<T>::store(v); });
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &xs[wm][kk], kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, &ws[wn + 16 * j][kk], kLd);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
  // The fragments' lanes hold unspecified elements: out through shared memory.
  wmma::store_matrix_sync(&ys[wm][wn], acc[0], kLdY, wmma::mem_row_major);
  wmma::store_matrix_sync(&ys[wm][wn + 16], acc[1], kLdY, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kTileM * kTileN; i += kGemmThreads) {
    const int r = i / kTileN, c = i % kTileN;
    store_y<T>(a, m0 + r, n0 + c, ys[r][c]);
  }
}
#endif

// kSimt keeps bf16/fp16 off the tensor cores too (what builds for older GPUs run; the
// emulated tests take it on purpose).
template <typename T, bool kTransW, bool kSimt>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(GemmArgs a, bool w_vec, bool x_vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kSimt || std::is_same<T, float>::value) {
    gemm_simt<T, kTransW>(a, w_vec, x_vec);
  } else {
    gemm_mma<T, kTransW>(a, w_vec, x_vec);
  }
#else
  gemm_simt<T, kTransW>(a, w_vec, x_vec);
#endif
}

// y [m, n] = the sum of the splits' partial tiles, in split order, + bias, rounded once.
template <typename T>
__global__ void gemm_reduce_kernel(const float* __restrict__ partial, int64_t splits, int64_t m, int64_t n,
                                   const T* __restrict__ bias, T* __restrict__ y) {
  const int64_t total = m * n;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = partial[i];
    for (int64_t z = 1; z < splits; ++z) sum += partial[z * total + i];
    y[i] = Convert<T>::store(bias != nullptr ? sum + Convert<T>::load(bias[i % n]) : sum);
  }
}

int64_t gemm_splits(int64_t rows, int64_t k, int64_t n) {
  const int64_t slab = std::min(rows, kRowSlab);
  const int64_t tiles = ceil_div(slab, kTileM) * ceil_div(n, kTileN);
  const int64_t splits =
      std::min({kGemmTargetBlocks / tiles, kMaxSplits, ceil_div(k, kTileK) / 2, k / (16 * slab)});
  return std::max<int64_t>(1, splits);
}

template <typename T>
struct GemmLauncher {
  // splits > 1 needs workspace of splits * min(m, kRowSlab) * n floats.
  template <bool kTransW, bool kSimt = false>
  static cudaError_t launch(GemmArgs args, int64_t splits, float* workspace, cudaStream_t stream) {
    const int64_t row_len = kTransW ? args.n : args.k;
    const bool w_vec = row_len % 8 == 0 && aligned(args.packed, 4);
    const bool x_vec = args.k % 8 == 0 && aligned(args.x, 16);
    const unsigned n_tiles = static_cast<unsigned>(ceil_div(args.n, kTileN));
    if (splits > 1) {
      args.k_split = ceil_div(ceil_div(args.k, kTileK), splits) * kTileK;
      splits = ceil_div(args.k, args.k_split);  // no empty split
      args.partial = workspace;
    }
    const T* x = static_cast<const T*>(args.x);
    T* y = static_cast<T*>(args.y);
    for (int64_t m0 = 0; m0 < args.m; m0 += kRowSlab) {
      GemmArgs slab = args;
      slab.m = std::min(kRowSlab, args.m - m0);
      slab.x = x + m0 * args.k;
      slab.y = y + m0 * args.n;
      const dim3 grid(n_tiles, static_cast<unsigned>(ceil_div(slab.m, kTileM)), static_cast<unsigned>(splits));
      LORA_EXT_LAUNCH(grid, kGemmThreads, 0, stream, gemm_kernel<T, kTransW, kSimt>)(slab, w_vec, x_vec);
      cudaError_t err = cudaGetLastError();
      if (err == cudaSuccess && splits > 1) {
        LORA_EXT_LAUNCH(grid_for(slab.m * slab.n), kThreads, 0, stream, gemm_reduce_kernel<T>)(
            workspace, splits, slab.m, slab.n, static_cast<const T*>(slab.bias), static_cast<T*>(slab.y));
        err = cudaGetLastError();
      }
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  static cudaError_t run(const GemmArgs& args, bool trans_w, float* workspace, cudaStream_t stream) {
    const int64_t splits = workspace != nullptr ? gemm_splits(args.m, args.k, args.n) : 1;
    return trans_w ? launch<true>(args, splits, workspace, stream) : launch<false>(args, splits, workspace, stream);
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

int64_t nf4_gemm_workspace(int64_t rows, int64_t k, int64_t n) {
  if (rows == 0 || n == 0) return 0;
  const int64_t splits = gemm_splits(rows, k, n);
  return splits > 1 ? splits * std::min(rows, kRowSlab) * n : 0;
}

cudaError_t launch_nf4_gemm(DType dtype, const void* x, int64_t rows, int64_t in,
                            const uint8_t* packed, const float* absmax, int64_t blocksize,
                            const void* bias, void* y, int64_t out, float* workspace,
                            cudaStream_t stream) {
  if (rows == 0 || out == 0) return cudaSuccess;
  const GemmArgs args{x, packed, absmax, bias, y, rows, out, in, core::log2_pow2(blocksize)};
  return dispatch<GemmLauncher>(dtype, args, false, workspace, stream);
}

cudaError_t launch_nf4_gemm_grad_input(DType dtype, const void* grad_y, int64_t rows, int64_t out,
                                       const uint8_t* packed, const float* absmax, int64_t blocksize,
                                       void* grad_x, int64_t in, float* workspace, cudaStream_t stream) {
  if (rows == 0 || in == 0) return cudaSuccess;
  const GemmArgs args{grad_y, packed, absmax, nullptr, grad_x, rows, in, out, core::log2_pow2(blocksize)};
  return dispatch<GemmLauncher>(dtype, args, true, workspace, stream);
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
