// Decoding packed NF4 codes into floats on the CPU, shared by nf4.cpp (dequantise, GEMV) and
// nf4_gemm.cpp (blocked GEMM): a portable loop, an AVX2 path (two 8-entry permutes per 8
// values) and an AVX-512 path (one 16-entry permute per 16 values). All three round exactly
// as core/nf4.h and c10 do, so every path gives the same bits. Which path runs is decided only
// by the ISA predicates declared here and defined in nf4.cpp.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../core/nf4.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LORA_EXT_NF4_AVX2 1
#define LORA_EXT_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define LORA_EXT_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define LORA_EXT_BF16_FN \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#endif

namespace lora_ext {
namespace cpu {

// The instruction sets the NF4 kernels may use: each implies the one before it, so lowering
// cpu_has_avx2() turns every SIMD path off (defined in nf4.cpp, the one place that decides).
bool cpu_has_avx2();
bool cpu_has_avx512();
bool cpu_has_avx512bf16();

namespace nf4_decode {

inline constexpr float kCode[core::kNF4Codes] = {LORA_EXT_NF4_CODE_VALUES};

// Blocksizes are multiples of 32, so a 32-aligned group of elements never straddles blocks.
constexpr int64_t kGroup = 16;

template <typename T>
inline T store_scalar(float v) {
  return static_cast<T>(v);  // c10 rounds to nearest even (bf16 NaN -> 0x7FC0)
}

template <typename T>
inline void dequant_scalar(const uint8_t* packed, const float* absmax, int bs_shift, int64_t e0,
                           int64_t e1, T* out) {
  for (int64_t e = e0; e < e1; ++e) {
    out[e - e0] = store_scalar<T>(core::nf4_value(kCode, core::nf4_code_at(packed, e), absmax[e >> bs_shift]));
  }
}

#ifdef LORA_EXT_NF4_AVX2
// ---------------------------------------------------------------- AVX2
// The sum of the eight lanes (the GEMV and the GEMM share it).
LORA_EXT_AVX2_FN inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Lut16 {
  __m256 lo, hi;
};

LORA_EXT_AVX2_FN inline Lut16 make_lut() {
  return {_mm256_loadu_ps(kCode), _mm256_loadu_ps(kCode + 8)};
}

LORA_EXT_AVX2_FN inline __m256 lookup8(const Lut16& lut, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lut.lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(lut.hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The 16 codes of 8 packed bytes in element order (high nibble first), one per byte.
LORA_EXT_AVX2_FN inline __m128i nibbles16(const uint8_t* bytes) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

// 16 dequantised fp32 values of elements e .. e+15 (e a multiple of 16).
LORA_EXT_AVX2_FN inline void values16(const Lut16& lut, const uint8_t* bytes, float scale,
                                      __m256& v0, __m256& v1) {
  const __m128i nib = nibbles16(bytes);
  const __m256 s = _mm256_set1_ps(scale);
  v0 = _mm256_mul_ps(lookup8(lut, _mm256_cvtepu8_epi32(nib)), s);
  v1 = _mm256_mul_ps(lookup8(lut, _mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8))), s);
}

LORA_EXT_AVX2_FN inline __m128i bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

template <typename T>
LORA_EXT_AVX2_FN inline void store8(T* out, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(out, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bf16x8(v));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <typename T>
LORA_EXT_AVX2_FN void dequant_avx2(const uint8_t* packed, const float* absmax, int bs_shift,
                                   int64_t e0, int64_t e1, T* out) {
  int64_t e = std::min(e1, (e0 + kGroup - 1) / kGroup * kGroup);
  dequant_scalar(packed, absmax, bs_shift, e0, e, out);
  const Lut16 lut = make_lut();
  for (; e + kGroup <= e1; e += kGroup) {
    __m256 v0, v1;
    values16(lut, packed + e / 2, absmax[e >> bs_shift], v0, v1);
    store8(out + (e - e0), v0);
    store8(out + (e - e0) + 8, v1);
  }
  dequant_scalar(packed, absmax, bs_shift, e, e1, out + (e - e0));
}

// ---------------------------------------------------------------- AVX-512
// The whole codebook fits one register: a 16-value group is one permute and one multiply.

LORA_EXT_AVX512_FN inline __m512 values16_512(__m512 lut, const uint8_t* bytes, float scale) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
  return _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nib), lut), _mm512_set1_ps(scale));
}

// bf16 with c10's rounding (nearest even, every NaN -> 0x7FC0); vcvtneps2bf16 keeps NaN signs.
LORA_EXT_AVX512_FN inline __m256i bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

template <typename T>
LORA_EXT_AVX512_FN inline void store16(T* out, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(out, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bf16x16(v));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <typename T>
LORA_EXT_AVX512_FN void dequant_avx512(const uint8_t* packed, const float* absmax, int bs_shift,
                                       int64_t e0, int64_t e1, T* out) {
  int64_t e = std::min(e1, (e0 + kGroup - 1) / kGroup * kGroup);
  dequant_scalar(packed, absmax, bs_shift, e0, e, out);
  const __m512 lut = _mm512_loadu_ps(kCode);
  for (; e + 2 * kGroup <= e1; e += 2 * kGroup) {
    const __m512 v0 = values16_512(lut, packed + e / 2, absmax[e >> bs_shift]);
    const __m512 v1 = values16_512(lut, packed + e / 2 + 8, absmax[(e + kGroup) >> bs_shift]);
    store16(out + (e - e0), v0);
    store16(out + (e - e0) + kGroup, v1);
  }
  for (; e + kGroup <= e1; e += kGroup) {
    store16(out + (e - e0), values16_512(lut, packed + e / 2, absmax[e >> bs_shift]));
  }
  dequant_scalar(packed, absmax, bs_shift, e, e1, out + (e - e0));
}

// bf16 output on AVX512-BF16 CPUs: vcvtne2ps2bf16 rounds 32 values to nearest even in one
// instruction; NaNs are then set to c10's 0x7FC0 (the instruction keeps their sign).
LORA_EXT_BF16_FN inline void dequant_avx512bf16(const uint8_t* packed, const float* absmax, int bs_shift,
                                                int64_t e0, int64_t e1, c10::BFloat16* out) {
  int64_t e = std::min(e1, (e0 + 2 * kGroup - 1) / (2 * kGroup) * (2 * kGroup));
  dequant_scalar(packed, absmax, bs_shift, e0, e, out);
  const __m512 lut = _mm512_loadu_ps(kCode);
  const __m512i nan_bits = _mm512_set1_epi16(0x7FC0);
  for (; e + 2 * kGroup <= e1; e += 2 * kGroup) {
    const float scale = absmax[e >> bs_shift];  // a 32-aligned group lies in one block
    const __m512 v0 = values16_512(lut, packed + e / 2, scale);
    const __m512 v1 = values16_512(lut, packed + e / 2 + 8, scale);
    const __mmask32 nan = static_cast<__mmask32>(_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q)) |
                          (static_cast<__mmask32>(_mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q)) << 16);
    const __m512i r = _mm512_mask_mov_epi16((__m512i)_mm512_cvtne2ps_pbh(v1, v0), nan, nan_bits);
    _mm512_storeu_si512(out + (e - e0), r);
  }
  dequant_scalar(packed, absmax, bs_shift, e, e1, out + (e - e0));
}
#endif

// out[0 .. e1 - e0) = elements e0 .. e1 of the NF4 tensor, by the widest path the CPU has.
template <typename T>
void dequant_range(const uint8_t* packed, const float* absmax, int bs_shift, int64_t e0, int64_t e1,
                   T* out) {
#ifdef LORA_EXT_NF4_AVX2
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu_has_avx512bf16()) return dequant_avx512bf16(packed, absmax, bs_shift, e0, e1, out);
  }
  if (cpu_has_avx512()) return dequant_avx512(packed, absmax, bs_shift, e0, e1, out);
  if (cpu_has_avx2()) return dequant_avx2(packed, absmax, bs_shift, e0, e1, out);
#endif
  dequant_scalar(packed, absmax, bs_shift, e0, e1, out);
}

}  // namespace nf4_decode
}  // namespace cpu
}  // namespace lora_ext
