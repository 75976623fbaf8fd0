// DoRA with dropout without the second dense GEMM, on CUDA (see dora_dropout.cuh). The dropped
// elements are found once per call as a bit mask (one Philox call per group of four, as every
// dropout kernel here), then both kernels walk only the set bits:
//   forward: a block takes 8 rows by 512 output columns; per chunk of 256 elements of its rows,
//     each warp lists its row's dropped (k, x[t, k]) in shared memory in ascending k, and each
//     thread adds x[t, k]·Wᵀ[k, o] for its two columns, reading Wᵀ's row k coalesced across
//     the block. The DoRA epilogue (core::dora_dropout_outputs) runs on the accumulators.
//   backward: a warp per row takes the row's dropped k in ascending order and forms
//     gy[t]·Wᵀ[k] with its lanes 32 columns apart, then a fixed shuffle tree.
// Sums run over the dropped elements in ascending k and in a fixed tree: results do not
// depend on the schedule.
#include "convert.cuh"
#include "dora_dropout.cuh"
#include "launch.cuh"

#include "../core/dora.h"

namespace lora_ext {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kWarps = 8;                  // rows per block
constexpr int kThreads = kWarps * 32;
constexpr int kColsPerThread = 2;          // columns o and o + kThreads
constexpr int kBlockCols = kThreads * kColsPerThread;
constexpr int kChunkWords = 8;             // mask words listed per row per pass
constexpr int kChunk = kChunkWords * 32;   // elements of a row per pass
constexpr int64_t kMaxGridY = 65535;

__global__ void dropped_bits_kernel(uint32_t* __restrict__ bits, int64_t rows, int64_t in,
                                    int64_t words, core::DropoutParams params) {
  const int64_t total = rows * words;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / words, k0 = (i % words) * 32;
    const int64_t first = t * in + k0;
    const int64_t last = first + (in - k0 < 32 ? in - k0 : 32);
    uint32_t word = 0;
    // A row need not start on a Philox group: the word's elements span up to nine groups.
    for (int64_t g = first / 4; 4 * g < last; ++g) {
      const unsigned keep = core::dropout_keep_bits(params.seed, params.offset, params.threshold,
                                                    static_cast<uint64_t>(g));
      for (int lane = 0; lane < 4; ++lane) {
        const int64_t e = 4 * g + lane;
        if (e >= first && e < last && !((keep >> lane) & 1u)) word |= 1u << (e - first);
      }
    }
    bits[i] = word;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dropout_outputs_kernel(const T* __restrict__ x, const T* __restrict__ wt, T* __restrict__ base,
                           const T* __restrict__ low_rank,
                           const typename Convert<T>::Acc* __restrict__ g_minus_1,
                           const T* __restrict__ bias, T* __restrict__ hd,
                           const uint32_t* __restrict__ bits, int64_t rows, int64_t in, int64_t out,
                           typename Convert<T>::Acc q) {
  using Acc = typename Convert<T>::Acc;
  __shared__ Acc xs[kWarps][kChunk];
  __shared__ int32_t ks[kWarps][kChunk];
  __shared__ int counts[kWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t words = dora_dropped_words(in);
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kBlockCols + threadIdx.x;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kWarps; t0 < rows;
       t0 += static_cast<int64_t>(gridDim.y) * kWarps) {
    Acc acc[kWarps][kColsPerThread];
#pragma unroll
    for (int r = 0; r < kWarps; ++r) {
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) acc[r][c] = Acc(0);
    }
    for (int64_t w0 = 0; w0 < words; w0 += kChunkWords) {
      // Warp `warp` lists row t0 + warp: lane l takes word w0 + l, and an exclusive prefix sum
      // of the lanes' counts places its elements after those of the lanes before it.
      const int64_t t = t0 + warp;
      uint32_t word = 0;
      if (t < rows && lane < kChunkWords && w0 + lane < words) word = bits[t * words + w0 + lane];
      const int n = __popc(word);
      int prefix = n;
      for (int d = 1; d < 32; d <<= 1) {
        const int before = __shfl_up_sync(kFullMask, prefix, d);
        if (lane >= d) prefix += before;
      }
      const int total = __shfl_sync(kFullMask, prefix, 31);
      int pos = prefix - n;
      while (word != 0) {
        const int64_t k = (w0 + lane) * 32 + (__ffs(word) - 1);
        word &= word - 1;
        ks[warp][pos] = static_cast<int32_t>(k);
        xs[warp][pos] = Convert<T>::load(x[t * in + k]);
        ++pos;
      }
      if (lane == 0) counts[warp] = total;
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kWarps; ++r) {
        const int count = counts[r];
        for (int i = 0; i < count; ++i) {
          const Acc xv = xs[r][i];
          const T* w = wt + static_cast<int64_t>(ks[r][i]) * out;
#pragma unroll
          for (int c = 0; c < kColsPerThread; ++c) {
            const int64_t o = o0 + c * kThreads;
            if (o < out) acc[r][c] += xv * Convert<T>::load(w[o]);
          }
        }
      }
      __syncthreads();  // the lists are rewritten by the next pass
    }
#pragma unroll
    for (int r = 0; r < kWarps; ++r) {
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int64_t t = t0 + r, o = o0 + c * kThreads;
        if (t >= rows || o >= out) continue;
        const int64_t i = t * out + o;
        Acc h, y;
        core::dora_dropout_outputs(Convert<T>::load(base[i]), acc[r][c], Convert<T>::load(low_rank[i]),
                                   g_minus_1[o], q, h, y);
        if (bias != nullptr) y += Convert<T>::load(bias[o]);
        hd[i] = Convert<T>::store(h);
        base[i] = Convert<T>::store(y);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    subtract_dots_kernel(T* __restrict__ grad_x, const T* __restrict__ gy, const T* __restrict__ wt,
                         const uint32_t* __restrict__ bits, int64_t rows, int64_t in, int64_t out,
                         typename Convert<T>::Acc factor) {
  using Acc = typename Convert<T>::Acc;
  const int lane = threadIdx.x & 31;
  const int64_t words = dora_dropped_words(in);
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); t < rows; t += row_stride) {
    const T* g = gy + t * out;
    for (int64_t w0 = 0; w0 < words; w0 += 32) {
      const uint32_t mine = w0 + lane < words ? bits[t * words + w0 + lane] : 0u;
      if (__ballot_sync(kFullMask, mine != 0) == 0) continue;
      for (int j = 0; j < 32; ++j) {
        uint32_t word = __shfl_sync(kFullMask, mine, j);  // the same word in every lane
        while (word != 0) {
          const int64_t k = (w0 + j) * 32 + (__ffs(word) - 1);
          word &= word - 1;
          const T* w = wt + k * out;
          Acc s = Acc(0);
          for (int64_t o = lane; o < out; o += 32) s += Convert<T>::load(g[o]) * Convert<T>::load(w[o]);
          for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(kFullMask, s, d);
          if (lane == 0) {
            T& e = grad_x[t * in + k];
            e = Convert<T>::store(Convert<T>::load(e) - factor * s);
          }
        }
      }
    }
  }
}

unsigned capped_blocks(int64_t blocks, int64_t cap) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

}  // namespace

cudaError_t launch_dora_dropped_bits(uint32_t* bits, int64_t rows, int64_t in,
                                     const core::DropoutParams& params, cudaStream_t stream) {
  const int64_t total = rows * dora_dropped_words(in);
  if (total == 0) return cudaSuccess;
  LORA_EXT_LAUNCH(capped_blocks((total + kThreads - 1) / kThreads, kMaxGridStrideBlocks), kThreads, 0,
                  stream, dropped_bits_kernel)(bits, rows, in, dora_dropped_words(in), params);
  return cudaGetLastError();
}

cudaError_t launch_dora_dropout_outputs(DType dtype, const void* x, const void* wt, void* base,
                                        const void* low_rank, const void* g_minus_1,
                                        const void* bias, void* hd, const uint32_t* dropped_bits,
                                        int64_t rows, int64_t in, int64_t out, double q,
                                        cudaStream_t stream) {
  if (rows == 0 || out == 0) return cudaSuccess;
  if (in > INT32_MAX) return cudaErrorInvalidValue;  // the lists hold k as int32
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Convert<T>::Acc;
    const dim3 grid(capped_blocks((out + kBlockCols - 1) / kBlockCols, INT32_MAX),
                    capped_blocks((rows + kWarps - 1) / kWarps, kMaxGridY));
    LORA_EXT_LAUNCH(grid, kThreads, 0, stream, dropout_outputs_kernel<T>)(
        static_cast<const T*>(x), static_cast<const T*>(wt), static_cast<T*>(base),
        static_cast<const T*>(low_rank), static_cast<const Acc*>(g_minus_1), static_cast<const T*>(bias),
        static_cast<T*>(hd), dropped_bits, rows, in, out, static_cast<Acc>(q));
    return cudaGetLastError();
  });
}

cudaError_t launch_dora_subtract_dropped_dots(DType dtype, void* grad_x, const void* gy,
                                              const void* wt, const uint32_t* dropped_bits,
                                              int64_t rows, int64_t in, int64_t out, double factor,
                                              cudaStream_t stream) {
  if (rows == 0 || in == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Convert<T>::Acc;
    LORA_EXT_LAUNCH(capped_blocks((rows + kWarps - 1) / kWarps, kMaxGridStrideBlocks), kThreads, 0, stream,
                    subtract_dots_kernel<T>)(static_cast<T*>(grad_x), static_cast<const T*>(gy),
                                             static_cast<const T*>(wt), dropped_bits, rows, in, out,
                                             static_cast<Acc>(factor));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace lora_ext
