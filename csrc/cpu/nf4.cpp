#include "nf4.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/nf4.h"
#include "isa.h"

#include "nf4_decode.h"

namespace lora_ext {
namespace cpu {

// The one place that decides which instruction set the NF4 kernels use (see nf4_decode.h).
bool cpu_has_avx2() {
#ifdef LORA_EXT_NF4_AVX2
  return cpu_isa() >= Isa::kAvx2;  // avx2 + fma + f16c, unless LORA_EXT_CPU_CAPABILITY lowers it
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#ifdef LORA_EXT_NF4_AVX2
  return cpu_isa() >= Isa::kAvx512;  // unless LORA_EXT_CPU_CAPABILITY lowers it
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#ifdef LORA_EXT_NF4_AVX2
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok && cpu_has_avx512();
#else
  return false;
#endif
}

namespace {

using namespace nf4_decode;

template <typename T>
inline float load_scalar(T v) {
  return static_cast<float>(v);
}

// ---------------------------------------------------------------- quantize

template <typename T>
void quantize_blocks(const T* x, int64_t n, int64_t bs, uint8_t* packed, float* absmax,
                     int64_t b0, int64_t b1) {
  float bounds[core::kNF4Codes - 1];
  core::nf4_bounds(kCode, bounds);
  uint8_t codes[4096 + 2];  // blocksize <= 4096, plus the pad code
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t first = b * bs;
    const int64_t len = std::min(bs, n - first);
    const T* xb = x + first;
    float m = 0.0f;
    for (int64_t i = 0; i < len; ++i) m = core::absmax_fold(m, load_scalar(xb[i]));
    absmax[b] = m;
    const core::NF4Scaler scale = core::nf4_scaler(m, len < bs);
    for (int64_t i = 0; i < len; ++i) codes[i] = core::nf4_encode(scale(load_scalar(xb[i])), bounds);
    if (len & 1) codes[len] = core::kNF4PadCode;
    uint8_t* out = packed + first / 2;  // blocks start at even elements
    for (int64_t i = 0; i < len; i += 2) out[i / 2] = core::nf4_pack(codes[i], codes[i + 1]);
  }
}

// ---------------------------------------------------------------- GEMV

// y[r, o] for rows [0, R) and outputs [o0, o1): one pass over each packed row.
void gemv_scalar(const float* xf, int64_t rows, int64_t in, const uint8_t* packed,
                 const float* absmax, int bs_shift, float* y, int64_t out, int64_t o0, int64_t o1) {
  std::vector<float> w(static_cast<size_t>(in));
  for (int64_t o = o0; o < o1; ++o) {
    dequant_scalar(packed, absmax, bs_shift, o * in, (o + 1) * in, w.data());
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = xf + r * in;
      double acc = 0.0;  // one long fp32 chain would lose to PyTorch's blocked sums
      for (int64_t k = 0; k < in; ++k) acc += double(xr[k]) * double(w[k]);
      y[r * out + o] = static_cast<float>(acc);
    }
  }
}

#ifdef LORA_EXT_NF4_AVX2
// Up to kRows x rows per pass over a packed row, accumulators in registers.
template <int kRows>
LORA_EXT_AVX2_FN void gemv_rows_avx2(const float* xf, int64_t in, const uint8_t* packed,
                                     const float* absmax, int bs_shift, float* y, int64_t out,
                                     int64_t o) {
  const Lut16 lut = make_lut();
  const int64_t e0 = o * in, e1 = e0 + in;
  const int64_t head_end = std::min(e1, (e0 + kGroup - 1) / kGroup * kGroup);
  float scalar[kRows] = {};
  for (int64_t e = e0; e < head_end; ++e) {
    const float w = core::nf4_value(kCode, core::nf4_code_at(packed, e), absmax[e >> bs_shift]);
    for (int r = 0; r < kRows; ++r) scalar[r] += xf[r * in + (e - e0)] * w;
  }
  __m256 acc0[kRows], acc1[kRows];
  for (int r = 0; r < kRows; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t e = head_end;
  for (; e + kGroup <= e1; e += kGroup) {
    __m256 v0, v1;
    values16(lut, packed + e / 2, absmax[e >> bs_shift], v0, v1);
    const float* xk = xf + (e - e0);
    for (int r = 0; r < kRows; ++r) {
      acc0[r] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xk + r * in), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xk + r * in + 8), acc1[r]);
    }
  }
  for (; e < e1; ++e) {
    const float w = core::nf4_value(kCode, core::nf4_code_at(packed, e), absmax[e >> bs_shift]);
    for (int r = 0; r < kRows; ++r) scalar[r] += xf[r * in + (e - e0)] * w;
  }
  for (int r = 0; r < kRows; ++r) y[r * out + o] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + scalar[r];
}

// The same with AVX-512: one 16-entry permute decodes 16 weights.
template <int kRows>
LORA_EXT_AVX512_FN void gemv_rows_avx512(const float* xf, int64_t in, const uint8_t* packed,
                                         const float* absmax, int bs_shift, float* y, int64_t out,
                                         int64_t o) {
  const __m512 lut = _mm512_loadu_ps(kCode);
  const int64_t e0 = o * in, e1 = e0 + in;
  const int64_t head_end = std::min(e1, (e0 + 2 * kGroup - 1) / (2 * kGroup) * (2 * kGroup));
  float scalar[kRows] = {};
  auto scalar_part = [&](int64_t b, int64_t e) {
    for (; b < e; ++b) {
      const float w = core::nf4_value(kCode, core::nf4_code_at(packed, b), absmax[b >> bs_shift]);
      for (int r = 0; r < kRows; ++r) scalar[r] += xf[r * in + (b - e0)] * w;
    }
  };
  scalar_part(e0, head_end);
  __m512 acc0[kRows], acc1[kRows];
  for (int r = 0; r < kRows; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  int64_t e = head_end;
  for (; e + 2 * kGroup <= e1; e += 2 * kGroup) {
    const float s = absmax[e >> bs_shift];  // a 32-aligned group lies in one block
    const __m512 v0 = values16_512(lut, packed + e / 2, s);
    const __m512 v1 = values16_512(lut, packed + e / 2 + 8, s);
    const float* xk = xf + (e - e0);
    for (int r = 0; r < kRows; ++r) {
      acc0[r] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xk + r * in), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xk + r * in + 16), acc1[r]);
    }
  }
  scalar_part(e, e1);
  for (int r = 0; r < kRows; ++r) y[r * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + scalar[r];
}

// Every row's accumulators in registers: one pass over each packed row per 4 rows of x (the
// GEMM takes more rows unless LORA_EXT_NF4_GEMV_ROWS says otherwise).
template <bool kAvx512>
void gemv_simd(const float* xf, int64_t rows, int64_t in, const uint8_t* packed,
                 const float* absmax, int bs_shift, float* y, int64_t out, int64_t o0,
                 int64_t o1) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const float* xr = xf + r0 * in;
    float* yr = y + r0 * out;
    for (int64_t o = o0; o < o1; ++o) {
      switch (std::min<int64_t>(4, rows - r0)) {
#define LORA_EXT_GEMV_CASE(n)                                                       \
  case n:                                                                           \
    if constexpr (kAvx512) {                                                        \
      gemv_rows_avx512<n>(xr, in, packed, absmax, bs_shift, yr, out, o);            \
    } else {                                                                        \
      gemv_rows_avx2<n>(xr, in, packed, absmax, bs_shift, yr, out, o);              \
    }                                                                               \
    break;
        LORA_EXT_GEMV_CASE(4)
        LORA_EXT_GEMV_CASE(3)
        LORA_EXT_GEMV_CASE(2)
        default: LORA_EXT_GEMV_CASE(1)
#undef LORA_EXT_GEMV_CASE
      }
    }
  }
}
#endif

#ifdef LORA_EXT_NF4_AVX2
// ---------------------------------------------------------------- GEMV, AVX512-BF16
// For bf16 x the reference rounds each dequantised weight to bf16 before the matmul, so the
// weights can go through the bf16 dot-product instruction exactly as rounded: 32 codes decode
// with one 16-entry permute per 16, scale by absmax in fp32, round to bf16 pairs (RNE) and
// feed vdpbf16ps (fp32 accumulation). Needs in % 32 == 0 (32-code groups inside one block).
constexpr int kBf16RowBlock = 8;

// 32 weights of elements e .. e+31 (one block), scaled in fp32 and rounded to bf16 pairs.
LORA_EXT_BF16_FN inline __m512bh weights32_bf16(const __m512 lut, const uint8_t* packed,
                                                const float* absmax, int bs_shift, int64_t e) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + e / 2));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m512 s = _mm512_set1_ps(absmax[e >> bs_shift]);
  const __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), lut), s);
  const __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), lut), s);
  return _mm512_cvtne2ps_pbh(w1, w0);  // elements 0..15 from w0, 16..31 from w1
}

// partial[r] += sum over elements [e0, e0 + len) of row o (e0 = o * in + k0) of w * x[r].
// Few rows get several accumulator chains, so that the dot product's latency is hidden.
template <int kRows>
LORA_EXT_BF16_FN inline __attribute__((always_inline)) void gemv_bf16_rows(const c10::BFloat16* x, int64_t ldx, const uint8_t* packed,
                                     const float* absmax, int bs_shift, int64_t e0, int64_t len,
                                     float* partial) {
  constexpr int kChains = kRows == 1 ? 4 : (kRows <= 4 ? 2 : 1);
  const __m512 lut = _mm512_loadu_ps(kCode);
  __m512 acc[kRows][kChains];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kChains; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 32 * kChains <= len; k += 32 * kChains) {
    for (int c = 0; c < kChains; ++c) {
      const __m512bh w = weights32_bf16(lut, packed, absmax, bs_shift, e0 + k + 32 * c);
      for (int r = 0; r < kRows; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * ldx + k + 32 * c);
        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, xv);
      }
    }
  }
  for (; k < len; k += 32) {
    const __m512bh w = weights32_bf16(lut, packed, absmax, bs_shift, e0 + k);
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w, (__m512bh)_mm512_loadu_si512(x + r * ldx + k));
    }
  }
  for (int r = 0; r < kRows; ++r) {
    __m512 sum = acc[r][0];
    for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[r][c]);
    partial[r] += _mm512_reduce_add_ps(sum);
  }
}

// One pass over this task's outputs for kRows rows of x: each instantiation gets its own
// tight loop (one function holding every row count inlined ran several times slower).
template <int kRows>
LORA_EXT_BF16_FN __attribute__((noinline)) void gemv_bf16_pass(
    const c10::BFloat16* x, int64_t ldx, int64_t in, const uint8_t* packed, const float* absmax,
    int bs_shift, float* y, int64_t out, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    float partial[kRows] = {};
    gemv_bf16_rows<kRows>(x, ldx, packed, absmax, bs_shift, o * in, in, partial);
    for (int r = 0; r < kRows; ++r) y[r * out + o] = partial[r];
  }
}

LORA_EXT_BF16_FN void gemv_bf16(const c10::BFloat16* x, int64_t ldx, int64_t rows, int64_t in,
                                const uint8_t* packed, const float* absmax, int bs_shift, float* y,
                                int64_t out, int64_t o0, int64_t o1) {
  // Row blocks outside, outputs inside: a block's x rows and this task's slice of the packed
  // weight stay in cache while every output of the slice is computed.
  for (int64_t r0 = 0; r0 < rows; r0 += kBf16RowBlock) {
    const c10::BFloat16* xb = x + r0 * ldx;
    float* yb = y + r0 * out;
    switch (std::min<int64_t>(kBf16RowBlock, rows - r0)) {
      case 1: gemv_bf16_pass<1>(xb, ldx, in, packed, absmax, bs_shift, yb, out, o0, o1); break;
      case 2: gemv_bf16_pass<2>(xb, ldx, in, packed, absmax, bs_shift, yb, out, o0, o1); break;
      case 3: gemv_bf16_pass<3>(xb, ldx, in, packed, absmax, bs_shift, yb, out, o0, o1); break;
      case 4: gemv_bf16_pass<4>(xb, ldx, in, packed, absmax, bs_shift, yb, out, o0, o1); break;
      case 5: gemv_bf16_pass<5>(xb, ldx, in, packed, absmax, bs_shift, yb, out, o0, o1); break;
      case 6: gemv_bf16_pass<6>(xb, ldx, in, packed, absmax, bs_shift, yb, out, o0, o1); break;
      case 7: gemv_bf16_pass<7>(xb, ldx, in, packed, absmax, bs_shift, yb, out, o0, o1); break;
      default: gemv_bf16_pass<8>(xb, ldx, in, packed, absmax, bs_shift, yb, out, o0, o1); break;
    }
  }
}
#endif

#ifdef LORA_EXT_NF4_AVX2
// ---------------------------------------------------------------- double-quantised absmax
// code[q] * absmax2 + offset for elements [i, end) of one block, 8 or 16 at a time (multiply
// and add rounded separately, as core::dynamic_dequantize). AVX2: a gather from the code.
// Returns the first element left for the scalar loop.
LORA_EXT_AVX2_FN int64_t absmax_run_avx2(const uint8_t* q, const float* table, float absmax2,
                                         float offset, int64_t i, int64_t end, float* o) {
  const __m256 s = _mm256_set1_ps(absmax2), off = _mm256_set1_ps(offset);
  for (; i + 8 <= end; i += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
    const __m256 v = _mm256_i32gather_ps(table, idx, 4);
    _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_mul_ps(v, s), off));
  }
  return i;
}

// AVX-512 without gathers (slow on some cores): the 256-entry code in 16 registers, one
// two-register permute per 32 entries, and the index's top 3 bits pick which permute counts.
LORA_EXT_AVX512_FN int64_t absmax_run_avx512(const uint8_t* q, const float* table, float absmax2,
                                             float offset, int64_t i, int64_t end, float* o) {
  __m512 lo[8], hi[8];
  for (int j = 0; j < 8; ++j) {
    lo[j] = _mm512_loadu_ps(table + 32 * j);
    hi[j] = _mm512_loadu_ps(table + 32 * j + 16);
  }
  const __m512 s = _mm512_set1_ps(absmax2), off = _mm512_set1_ps(offset);
  for (; i + 16 <= end; i += 16) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
    const __m512i top = _mm512_srli_epi32(idx, 5);
    __m512 v = _mm512_permutex2var_ps(lo[0], idx, hi[0]);
    for (int j = 1; j < 8; ++j) {
      const __mmask16 pick = _mm512_cmpeq_epi32_mask(top, _mm512_set1_epi32(j));
      v = _mm512_mask_mov_ps(v, pick, _mm512_permutex2var_ps(lo[j], idx, hi[j]));
    }
    _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_mul_ps(v, s), off));
  }
  return i;
}
#endif

// The three storage types of NF4 inputs and outputs (callers have checked the dtype).
template <typename F>
void dispatch_float(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "nf4: unsupported dtype ", type, "; expected float32, float16 or bfloat16");
  }
}

}  // namespace

void nf4_quantize(const at::Tensor& x, int64_t blocksize, at::Tensor& packed, at::Tensor& absmax) {
  const int64_t n = x.numel();
  const int64_t blocks = absmax.numel();
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* a = absmax.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xs = x.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      quantize_blocks(xs, n, blocksize, p, a, b0, b1);
    });
  });
}

void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                    at::Tensor& out) {
  const int64_t n = out.numel();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  constexpr int64_t kChunk = 8192;  // elements per task, a multiple of the SIMD group
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 4, [&](int64_t c0, int64_t c1) {
      const int64_t begin = c0 * kChunk, end = std::min(n, c1 * kChunk);
      dequant_range(p, a, core::log2_pow2(blocksize), begin, end, o + begin);
    });
  });
}

void nf4_dequantize_2d(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                       int64_t row_len, int64_t row0, int64_t col0, at::Tensor& out) {
  const int64_t rows = out.size(0), cols = out.size(1);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  const int shift = core::log2_pow2(blocksize);
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e0 = (row0 + r) * row_len + col0;
        dequant_range(p, a, shift, e0, e0 + cols, o + r * cols);
      }
    });
  });
}

void nf4_gemv(const at::Tensor& xf, const at::Tensor& packed, const at::Tensor& absmax,
              int64_t blocksize, at::Tensor& y) {
  const int64_t rows = xf.size(0), in = xf.size(1), out = y.size(1);
  const float* x = xf.data_ptr<float>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  // About 64 KiB of packed weight per task.
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(in, 1));
  const int shift = core::log2_pow2(blocksize);
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
#ifdef LORA_EXT_NF4_AVX2
    if (cpu_has_avx512()) return gemv_simd<true>(x, rows, in, p, a, shift, ys, out, o0, o1);
    if (cpu_has_avx2()) return gemv_simd<false>(x, rows, in, p, a, shift, ys, out, o0, o1);
#endif
    gemv_scalar(x, rows, in, p, a, shift, ys, out, o0, o1);
  });
}

bool nf4_gemv_bf16_supported(int64_t in) {
#ifdef LORA_EXT_NF4_AVX2
  return in % 32 == 0 && cpu_has_avx512bf16();
#else
  (void)in;
  return false;
#endif
}

void nf4_gemv_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                   int64_t blocksize, at::Tensor& y) {
#ifdef LORA_EXT_NF4_AVX2
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1);
  // Rows of x a multiple of 4 KiB apart share L1 sets and evict each other while the packed
  // weight streams through; a 64-byte pad between rows spreads them over the sets.
  at::Tensor xp = x;
  int64_t ldx = in;
  if (rows > 1 && (in * 2) % 4096 == 0) {
    ldx = in + 32;
    xp = at::empty({rows, ldx}, x.options());
    xp.narrow(1, 0, in).copy_(x);
  }
  const c10::BFloat16* xs = xp.data_ptr<c10::BFloat16>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const int shift = core::log2_pow2(blocksize);
  const int64_t grain = std::max<int64_t>(1, 131072 / std::max<int64_t>(in, 1));
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    gemv_bf16(xs, ldx, rows, in, p, a, shift, ys, out, o0, o1);
  });
#else
  TORCH_CHECK(false, "nf4_gemv_bf16: not built for this CPU");
#endif
}

void quantize_absmax(const at::Tensor& centred, const at::Tensor& code, int64_t blocksize,
                     at::Tensor& codes, at::Tensor& absmax2) {
  const int64_t n = centred.numel();
  const float* c = centred.data_ptr<float>();
  float mids[core::kDynamicCodes - 1];
  core::dynamic_midpoints(code.data_ptr<float>(), mids);
  uint8_t* q = codes.data_ptr<uint8_t>();
  float* a2 = absmax2.data_ptr<float>();
  at::parallel_for(0, absmax2.numel(), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * blocksize, len = std::min(blocksize, n - first);
      float m = 0.0f;
      for (int64_t i = 0; i < len; ++i) m = core::dynamic_absmax_fold(m, c[first + i]);
      a2[b] = m;
      core::dynamic_quantize_block(c + first, len, m, mids, q + first);
    }
  });
}

void dequantize_absmax(const at::Tensor& codes, const at::Tensor& absmax2, float offset,
                       const at::Tensor& code, int64_t blocksize, at::Tensor& out) {
  const int64_t n = codes.numel();
  const uint8_t* q = codes.data_ptr<uint8_t>();
  const float* a2 = absmax2.data_ptr<float>();
  const float* table = code.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 65536, [&](int64_t i0, int64_t i1) {
    // Block by block: one absmax2 per run of elements, no division per element.
    for (int64_t i = i0; i < i1;) {
      const int64_t b = i / blocksize, end = std::min(i1, (b + 1) * blocksize);
#ifdef LORA_EXT_NF4_AVX2
      if (cpu_has_avx512()) {
        i = absmax_run_avx512(q, table, a2[b], offset, i, end, o);
      } else if (cpu_has_avx2()) {
        i = absmax_run_avx2(q, table, a2[b], offset, i, end, o);
      }
#endif
      for (; i < end; ++i) o[i] = core::dynamic_dequantize(table, q[i], a2[b], offset);
    }
  });
}

}  // namespace cpu
}  // namespace lora_ext
