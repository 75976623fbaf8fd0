// Blocked 4-bit GEMM on the CPU: y = x·dequant(W)ᵀ and its backward grad_x = grad_y·dequant(W),
// with no dense copy of W. Each thread decodes one tile of W at a time into a buffer that
// stays in its L2 cache, and every row of x (or grad_y) in the current pass uses that tile
// before the next is decoded; so W's packed bytes are read and decoded once per pass, and a
// pass covers as many rows as fit a few MiB of L3 (all of them below a few hundred rows).
//
// Forward: lanes run along k (the reduction), the natural layout of a decoded row of W, so a
// tile is decoded exactly as nf4_dequantize writes it; a micro-kernel keeps kMR rows x 4
// outputs of vector accumulators in registers and sums each across its lanes once at the end
// of the row. Rows are walked in 4 KiB chunks: kMR rows of x stay in L1 while every 4-output
// group of the tile passes over them (the groups' accumulators wait in a small scratch).
// Backward: lanes run along grad_x's columns, again W's natural layout, and each accumulator
// needs no horizontal sum. fp32 accumulation everywhere; bf16 x on
// AVX512-BF16 CPUs multiplies bf16 weights (rounded as the reference rounds them) with
// vdpbf16ps, every other dtype runs in fp32.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "nf4.h"
#include "nf4_decode.h"

namespace lora_ext {
namespace cpu {
namespace {

using nf4_decode::dequant_range;

constexpr int64_t kTileBytes = 256 << 10;  // decoded weight per thread: L2, next to x's rows
constexpr int64_t kPassBytes = 4 << 20;    // rows of x per pass: they stay in L3 for every tile
constexpr int kNR = 4;                     // outputs per forward micro-kernel
constexpr int64_t kChunkBytes = 4096;      // of each row of x and W per micro-kernel call

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

// n zeroed elements on a 64-byte boundary (a thread's tile).
template <typename T>
std::unique_ptr<T[], AlignedFree> aligned_zeros(int64_t n) {
  const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(T)), 64));
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "nf4 GEMM: out of memory for a ", bytes, "-byte tile");
  std::memset(p, 0, bytes);
  return std::unique_ptr<T[], AlignedFree>(static_cast<T*>(p));
}

// A row stride of at least n elements, a multiple of `lanes`, that is not a multiple of 4 KiB:
// rows 4 KiB apart share L1 sets and evict each other while a tile streams through.
int64_t padded_stride(int64_t n, int64_t lanes, int64_t elem_bytes) {
  int64_t ld = round_up(std::max<int64_t>(n, 1), lanes);
  if ((ld * elem_bytes) % 4096 == 0) ld += 64 / elem_bytes;
  return ld;
}

// ---------------------------------------------------------------- forward micro-kernels
// Over one chunk k < kc: acc[r][c] (+)= x[r * ldx + k] * w[c * ldw + k] for r < kMR, c < 4,
// the accumulators starting from zero on the first chunk of a row and from `scratch` after it;
// on the last chunk y[r * ldy + c] = the lane sum of acc[r][c] for c < ncols, otherwise the
// accumulators go back to `scratch`. x and w rows are zero-padded to a multiple of the lanes.

template <typename T>
using FwdMicro = void (*)(const T* x, int64_t ldx, const T* w, int64_t ldw, int64_t kc, float* scratch,
                          bool first, bool last, float* y, int64_t ldy, int ncols);

// Rows e0 + j * in .. of the NF4 tensor (j < n, each `in` long) into tile rows ldt apart,
// rounded exactly as nf4_dequantize rounds them.
template <typename T>
void decode_tile(const uint8_t* packed, const float* absmax, int shift, int64_t e0, int64_t n, int64_t in, T* tile,
                 int64_t ldt) {
  for (int64_t j = 0; j < n; ++j) dequant_range(packed, absmax, shift, e0 + j * in, e0 + (j + 1) * in, tile + j * ldt);
}

// The portable loops accumulate in double: one long fp32 chain would be less accurate than
// PyTorch's blocked sums (the tolerance rule).
void fwd_scalar(int mr, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kp, float* y, int64_t ldy,
                int ncols) {
  for (int r = 0; r < mr; ++r) {
    for (int c = 0; c < ncols; ++c) {
      double acc = 0.0;
      for (int64_t k = 0; k < kp; ++k) acc += double(x[r * ldx + k]) * double(w[c * ldw + k]);
      y[r * ldy + c] = static_cast<float>(acc);
    }
  }
}

#ifdef LORA_EXT_NF4_AVX2
// 3 rows x 4 outputs: 12 accumulators, 3 x vectors and one weight vector fill the 16 registers.
template <int kMR>
LORA_EXT_AVX2_FN __attribute__((noinline)) void fwd_avx2(const float* x, int64_t ldx, const float* w, int64_t ldw,
                                                         int64_t kc, float* scratch, bool first, bool last,
                                                         float* y, int64_t ldy, int ncols) {
  __m256 acc[kMR][kNR];
  for (int r = 0; r < kMR; ++r) {
    for (int c = 0; c < kNR; ++c) {
      acc[r][c] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(scratch + (r * kNR + c) * 8);
    }
  }
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 xv[kMR];
    for (int r = 0; r < kMR; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + k);
    for (int c = 0; c < kNR; ++c) {
      const __m256 wv = _mm256_loadu_ps(w + c * ldw + k);
      for (int r = 0; r < kMR; ++r) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < kMR; ++r) {
    for (int c = 0; c < kNR; ++c) {
      if (!last) {
        _mm256_storeu_ps(scratch + (r * kNR + c) * 8, acc[r][c]);
      } else if (c < ncols) {
        y[r * ldy + c] = nf4_decode::hsum(acc[r][c]);
      }
    }
  }
}

// 6 rows x 4 outputs: 24 accumulators, 6 x vectors and one weight vector of the 32 registers.
template <int kMR>
LORA_EXT_AVX512_FN __attribute__((noinline)) void fwd_avx512(const float* x, int64_t ldx, const float* w,
                                                             int64_t ldw, int64_t kc, float* scratch, bool first,
                                                             bool last, float* y, int64_t ldy, int ncols) {
  __m512 acc[kMR][kNR];
  for (int r = 0; r < kMR; ++r) {
    for (int c = 0; c < kNR; ++c) {
      acc[r][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(scratch + (r * kNR + c) * 16);
    }
  }
  for (int64_t k = 0; k < kc; k += 16) {
    __m512 xv[kMR];
    for (int r = 0; r < kMR; ++r) xv[r] = _mm512_loadu_ps(x + r * ldx + k);
    for (int c = 0; c < kNR; ++c) {
      const __m512 wv = _mm512_loadu_ps(w + c * ldw + k);
      for (int r = 0; r < kMR; ++r) acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < kMR; ++r) {
    for (int c = 0; c < kNR; ++c) {
      if (!last) {
        _mm512_storeu_ps(scratch + (r * kNR + c) * 16, acc[r][c]);
      } else if (c < ncols) {
        y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
      }
    }
  }
}

// bf16 pairs through vdpbf16ps: each step covers 32 elements of k.
template <int kMR>
LORA_EXT_BF16_FN __attribute__((noinline)) void fwd_bf16(const c10::BFloat16* x, int64_t ldx,
                                                         const c10::BFloat16* w, int64_t ldw, int64_t kc,
                                                         float* scratch, bool first, bool last, float* y,
                                                         int64_t ldy, int ncols) {
  __m512 acc[kMR][kNR];
  for (int r = 0; r < kMR; ++r) {
    for (int c = 0; c < kNR; ++c) {
      acc[r][c] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(scratch + (r * kNR + c) * 16);
    }
  }
  for (int64_t k = 0; k < kc; k += 32) {
    __m512bh xv[kMR];
    for (int r = 0; r < kMR; ++r) xv[r] = (__m512bh)_mm512_loadu_si512(x + r * ldx + k);
    for (int c = 0; c < kNR; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c * ldw + k);
      for (int r = 0; r < kMR; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv[r], wv);
    }
  }
  for (int r = 0; r < kMR; ++r) {
    for (int c = 0; c < kNR; ++c) {
      if (!last) {
        _mm512_storeu_ps(scratch + (r * kNR + c) * 16, acc[r][c]);
      } else if (c < ncols) {
        y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
      }
    }
  }
}
#endif

// The micro-kernel of one instruction set for every row count up to its kMR.
template <typename T>
struct FwdKernel {
  int lanes;  // elements of k per vector step: rows are padded to a multiple of it
  int mr;     // rows per micro-kernel
  FwdMicro<T> micro[7];  // by row count 1 .. mr; null: the scalar loop
};

template <typename T>
void gemm_forward_blocked(const FwdKernel<T>& kern, const T* x, int64_t ldx, int64_t rows, int64_t in,
                          const uint8_t* packed, const float* absmax, int shift, float* y, int64_t out) {
  const int64_t kp = round_up(in, kern.lanes);
  const int64_t ldt = padded_stride(in, kern.lanes, int64_t(sizeof(T)));  // tile row stride
  const int64_t nt = std::clamp<int64_t>(kTileBytes / (ldt * int64_t(sizeof(T))) / kNR * kNR, kNR, 64);
  const int64_t pass_rows = std::max<int64_t>(kern.mr, kPassBytes / (ldx * int64_t(sizeof(T))));
  const int64_t tiles = (out + nt - 1) / nt;
  const int64_t chunk = kChunkBytes / int64_t(sizeof(T));
  for (int64_t m0 = 0; m0 < rows; m0 += pass_rows) {
    const int64_t m1 = std::min(rows, m0 + pass_rows);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      // Zero-initialised: the padding columns [in, kp) stay zero for every tile. 64-byte
      // aligned, as are x's rows: no vector load splits across two cache lines.
      const auto tile_mem = aligned_zeros<T>(nt * ldt);
      T* tile = tile_mem.get();
      const int64_t acc_floats = kern.mr * kNR * 16;  // one micro-kernel's accumulators
      std::vector<float> scratch(static_cast<size_t>(nt / kNR * acc_floats));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * nt, n = std::min(nt, out - n0);
        decode_tile(packed, absmax, shift, n0 * in, n, in, tile, ldt);
        for (int64_t r0 = m0; r0 < m1; r0 += kern.mr) {
          const int mr = static_cast<int>(std::min<int64_t>(kern.mr, m1 - r0));
          const T* xb = x + r0 * ldx;
          if constexpr (std::is_same_v<T, float>) {
            if (!kern.micro[mr]) {
              for (int64_t j0 = 0; j0 < n; j0 += kNR) {
                fwd_scalar(mr, xb, ldx, tile + j0 * ldt, ldt, kp, y + r0 * out + n0 + j0, out,
                           static_cast<int>(std::min<int64_t>(kNR, n - j0)));
              }
              continue;
            }
          }
          // Chunk by chunk of the row: kMR rows of x stay in L1 while every 4-output slice
          // of the tile passes over them.
          for (int64_t k0 = 0; k0 < kp; k0 += chunk) {
            const int64_t kc = std::min(chunk, kp - k0);
            for (int64_t j0 = 0; j0 < n; j0 += kNR) {
              kern.micro[mr](xb + k0, ldx, tile + j0 * ldt + k0, ldt, kc, scratch.data() + (j0 / kNR) * acc_floats,
                             k0 == 0, k0 + kc == kp, y + r0 * out + n0 + j0, out,
                             static_cast<int>(std::min<int64_t>(kNR, n - j0)));
            }
          }
        }
      }
    });
  }
}

FwdKernel<float> fwd_kernel_f32() {
#ifdef LORA_EXT_NF4_AVX2
  if (cpu_has_avx512()) {
    return {16, 6, {nullptr, fwd_avx512<1>, fwd_avx512<2>, fwd_avx512<3>, fwd_avx512<4>, fwd_avx512<5>, fwd_avx512<6>}};
  }
  if (cpu_has_avx2()) return {8, 3, {nullptr, fwd_avx2<1>, fwd_avx2<2>, fwd_avx2<3>}};
#endif
  return {1, 4, {}};
}

// ---------------------------------------------------------------- backward micro-kernels
// gx[r * ldgx + j] (+)= sum over o < n of g[r * ldg + o] * w[o * kt + j], for r < kMR, j < kt
// (kt: the tile width, kVec vectors).

using BwdMicro = void (*)(const float* g, int64_t ldg, const float* w, int64_t n, float* gx, int64_t ldgx,
                          bool accumulate);

void bwd_scalar(int mr, int64_t kt, const float* g, int64_t ldg, const float* w, int64_t n, float* gx,
                int64_t ldgx, bool accumulate) {
  for (int r = 0; r < mr; ++r) {
    float* row = gx + r * ldgx;
    for (int64_t j = 0; j < kt; ++j) {
      double acc = accumulate ? row[j] : 0.0;
      for (int64_t o = 0; o < n; ++o) acc += double(g[r * ldg + o]) * double(w[o * kt + j]);
      row[j] = static_cast<float>(acc);
    }
  }
}

#ifdef LORA_EXT_NF4_AVX2
template <int kMR>
LORA_EXT_AVX2_FN __attribute__((noinline)) void bwd_avx2(const float* g, int64_t ldg, const float* w, int64_t n,
                                                         float* gx, int64_t ldgx, bool accumulate) {
  constexpr int kVec = 4, kt = 8 * kVec;
  __m256 acc[kMR][kVec];
  for (int r = 0; r < kMR; ++r) {
    for (int v = 0; v < kVec; ++v) {
      acc[r][v] = accumulate ? _mm256_loadu_ps(gx + r * ldgx + 8 * v) : _mm256_setzero_ps();
    }
  }
  for (int64_t o = 0; o < n; ++o) {
    __m256 wv[kVec];
    for (int v = 0; v < kVec; ++v) wv[v] = _mm256_loadu_ps(w + o * kt + 8 * v);
    for (int r = 0; r < kMR; ++r) {
      const __m256 b = _mm256_broadcast_ss(g + r * ldg + o);
      for (int v = 0; v < kVec; ++v) acc[r][v] = _mm256_fmadd_ps(b, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kMR; ++r) {
    for (int v = 0; v < kVec; ++v) _mm256_storeu_ps(gx + r * ldgx + 8 * v, acc[r][v]);
  }
}

template <int kMR>
LORA_EXT_AVX512_FN __attribute__((noinline)) void bwd_avx512(const float* g, int64_t ldg, const float* w,
                                                             int64_t n, float* gx, int64_t ldgx, bool accumulate) {
  constexpr int kVec = 4, kt = 16 * kVec;
  __m512 acc[kMR][kVec];
  for (int r = 0; r < kMR; ++r) {
    for (int v = 0; v < kVec; ++v) {
      acc[r][v] = accumulate ? _mm512_loadu_ps(gx + r * ldgx + 16 * v) : _mm512_setzero_ps();
    }
  }
  for (int64_t o = 0; o < n; ++o) {
    __m512 wv[kVec];
    for (int v = 0; v < kVec; ++v) wv[v] = _mm512_loadu_ps(w + o * kt + 16 * v);
    for (int r = 0; r < kMR; ++r) {
      const __m512 b = _mm512_set1_ps(g[r * ldg + o]);
      for (int v = 0; v < kVec; ++v) acc[r][v] = _mm512_fmadd_ps(b, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kMR; ++r) {
    for (int v = 0; v < kVec; ++v) _mm512_storeu_ps(gx + r * ldgx + 16 * v, acc[r][v]);
  }
}
#endif

struct BwdKernel {
  int64_t kt;  // grad_x columns per tile
  int mr;
  BwdMicro micro[7];  // null: the scalar loop
};

BwdKernel bwd_kernel() {
#ifdef LORA_EXT_NF4_AVX2
  if (cpu_has_avx512()) {
    return {64, 6, {nullptr, bwd_avx512<1>, bwd_avx512<2>, bwd_avx512<3>, bwd_avx512<4>, bwd_avx512<5>, bwd_avx512<6>}};
  }
  if (cpu_has_avx2()) return {32, 2, {nullptr, bwd_avx2<1>, bwd_avx2<2>}};
#endif
  return {16, 4, {}};
}

}  // namespace

void nf4_gemm(const at::Tensor& x2d, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
              at::Tensor& y) {
  const int64_t rows = x2d.size(0), in = x2d.size(1), out = y.size(1);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const int shift = core::log2_pow2(blocksize);
  float* ys = y.data_ptr<float>();
#ifdef LORA_EXT_NF4_AVX2
  if (x2d.scalar_type() == at::kBFloat16 && cpu_has_avx512bf16()) {
    const FwdKernel<c10::BFloat16> kern{
        32, 6, {nullptr, fwd_bf16<1>, fwd_bf16<2>, fwd_bf16<3>, fwd_bf16<4>, fwd_bf16<5>, fwd_bf16<6>}};
    // x copied once into zero-padded rows: every vector load is whole and in bounds.
    const int64_t ldx = padded_stride(in, kern.lanes, 2);
    at::Tensor xp = at::empty({rows, ldx}, x2d.options());
    xp.narrow(1, in, ldx - in).zero_();
    xp.narrow(1, 0, in).copy_(x2d);
    gemm_forward_blocked(kern, xp.data_ptr<c10::BFloat16>(), ldx, rows, in, p, a, shift, ys, out);
    return;
  }
#endif
  const FwdKernel<float> kern = fwd_kernel_f32();
  const int64_t ldx = padded_stride(in, kern.lanes, 4);
  at::Tensor xp = at::empty({rows, ldx}, x2d.options().dtype(at::kFloat));
  xp.narrow(1, in, ldx - in).zero_();
  xp.narrow(1, 0, in).copy_(x2d);
  gemm_forward_blocked(kern, xp.data_ptr<float>(), ldx, rows, in, p, a, shift, ys, out);
}

void nf4_gemm_grad_input(const at::Tensor& g2d, const at::Tensor& packed, const at::Tensor& absmax,
                         int64_t blocksize, at::Tensor& grad_x) {
  const int64_t rows = g2d.size(0), out = g2d.size(1), in = grad_x.size(1);
  const BwdKernel kern = bwd_kernel();
  const at::Tensor g = g2d.to(at::kFloat).contiguous();
  // grad_x is computed in whole tiles of kt columns into a padded buffer.
  const int64_t ldgx = padded_stride(in, kern.kt, 4);
  at::Tensor gxp = at::empty({rows, ldgx}, g.options());
  const float* gs = g.data_ptr<float>();
  float* gxs = gxp.data_ptr<float>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const int shift = core::log2_pow2(blocksize);
  const int64_t kt = kern.kt;
  const int64_t oc = std::max<int64_t>(1, kTileBytes / (kt * 4));  // rows of W per tile
  const int64_t pass_rows = std::max<int64_t>(kern.mr, kPassBytes / (std::max<int64_t>(out, 1) * 4));
  const int64_t tiles = (in + kt - 1) / kt;
  for (int64_t m0 = 0; m0 < rows; m0 += pass_rows) {
    const int64_t m1 = std::min(rows, m0 + pass_rows);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      // Columns past `in` of the last tile hold leftovers of earlier tiles: they only reach
      // grad_x's padding, which is dropped.
      const auto tile_mem = aligned_zeros<float>(std::min(oc, out) * kt);
      float* tile = tile_mem.get();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kt, width = std::min(kt, in - k0);
        for (int64_t o0 = 0; o0 < out; o0 += oc) {
          const int64_t n = std::min(oc, out - o0);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t e0 = (o0 + j) * in + k0;
            dequant_range(p, a, shift, e0, e0 + width, tile + j * kt);
          }
          for (int64_t r0 = m0; r0 < m1; r0 += kern.mr) {
            const int mr = static_cast<int>(std::min<int64_t>(kern.mr, m1 - r0));
            const float* gb = gs + r0 * out + o0;
            float* gxb = gxs + r0 * ldgx + k0;
            if (kern.micro[mr]) {
              kern.micro[mr](gb, out, tile, n, gxb, ldgx, o0 > 0);
            } else {
              bwd_scalar(mr, kt, gb, out, tile, n, gxb, ldgx, o0 > 0);
            }
          }
        }
      }
    });
  }
  grad_x.copy_(gxp.narrow(1, 0, in));
}

}  // namespace cpu
}  // namespace lora_ext
