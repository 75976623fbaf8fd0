// Philox-4x32-10 keep bits for eight consecutive groups at once with AVX2, and sixteen with
// AVX-512, for the CPU kernels. Both compute exactly core::dropout_keep_bits for each group (a
// native unit test compares them); callers check cpu::cpu_isa() (csrc/cpu/isa.h) before use.
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "philox.h"

#define LORA_EXT_HAVE_AVX2_PHILOX 1

namespace lora_ext {
namespace core {

// 32x32->64 products of the eight 32-bit lanes of a with the constant m, split into the
// high and low words. mul_epu32 multiplies even lanes only, so odd lanes are shifted down.
__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i m, __m256i& hi,
                                                          __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Bit j set when lane j of w is >= t as unsigned (max(w, t) == w).
__attribute__((target("avx2"))) inline unsigned kept_bits_avx2(__m256i w, __m256i t) {
  return static_cast<unsigned>(
      _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(w, t), w))));
}

__attribute__((target("avx2"))) inline void dropout_keep_bits_x8_avx2(
    uint64_t seed, uint64_t offset, uint32_t threshold, uint64_t first_group, unsigned* keep) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int j = 0; j < 8; ++j) {
    const uint64_t group = first_group + static_cast<uint64_t>(j);
    lo[j] = static_cast<uint32_t>(group);
    hi[j] = static_cast<uint32_t>(group >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo_avx2(c0, m0, hi0, lo0);
    mulhilo_avx2(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m256i t = _mm256_set1_epi32(static_cast<int>(threshold));
  const unsigned b0 = kept_bits_avx2(c0, t), b1 = kept_bits_avx2(c1, t);
  const unsigned b2 = kept_bits_avx2(c2, t), b3 = kept_bits_avx2(c3, t);
  for (int j = 0; j < 8; ++j) {
    keep[j] = ((b0 >> j) & 1u) | (((b1 >> j) & 1u) << 1) | (((b2 >> j) & 1u) << 2) |
              (((b3 >> j) & 1u) << 3);
  }
}

#define LORA_EXT_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2")))
// GCC 12's AVX-512 intrinsics initialise their "undefined" operand with itself, which it then
// reports as uninitialised (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// As mulhilo_avx2, on sixteen lanes.
LORA_EXT_AVX512_TARGET inline void mulhilo_avx512(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// The Philox rounds of sixteen consecutive groups: c0..c3 hold word i of group j in lane j.
LORA_EXT_AVX512_TARGET inline void philox_x16_avx512(uint64_t seed, uint64_t offset,
                                                     uint64_t first_group, __m512i& c0, __m512i& c1,
                                                     __m512i& c2, __m512i& c3) {
  const uint32_t lo0 = static_cast<uint32_t>(first_group);
  if (lo0 <= 0xFFFFFFFFu - 15u) {  // the common case: no carry into the high word
    c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo0)),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_group >> 32)));
  } else {
    alignas(64) uint32_t lo[16], hi[16];
    for (int j = 0; j < 16; ++j) {
      const uint64_t group = first_group + static_cast<uint64_t>(j);
      lo[j] = static_cast<uint32_t>(group);
      hi[j] = static_cast<uint32_t>(group >> 32);
    }
    c0 = _mm512_load_si512(lo);
    c1 = _mm512_load_si512(hi);
  }
  c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0v, hi1, lo1v;
    mulhilo_avx512(c0, m0, hi0, lo0v);
    mulhilo_avx512(c2, m1, hi1, lo1v);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1v;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0v;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Twice the groups of the AVX2 version per call: the Philox rounds are what dropout costs on
// the CPU, and with native bf16 GEMMs they are a large part of a LoRA layer's time.
LORA_EXT_AVX512_TARGET inline void dropout_keep_bits_x16_avx512(uint64_t seed, uint64_t offset,
                                                                 uint32_t threshold,
                                                                 uint64_t first_group,
                                                                 unsigned* keep) {
  __m512i c0, c1, c2, c3;
  philox_x16_avx512(seed, offset, first_group, c0, c1, c2, c3);
  const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
  const unsigned b0 = _mm512_cmpge_epu32_mask(c0, t), b1 = _mm512_cmpge_epu32_mask(c1, t);
  const unsigned b2 = _mm512_cmpge_epu32_mask(c2, t), b3 = _mm512_cmpge_epu32_mask(c3, t);
  for (int j = 0; j < 16; ++j) {
    keep[j] = ((b0 >> j) & 1u) | (((b1 >> j) & 1u) << 1) | (((b2 >> j) & 1u) << 2) |
              (((b3 >> j) & 1u) << 3);
  }
}

// The float multipliers (scale where kept, 0 where dropped) of the 64 elements of sixteen
// consecutive groups, element 4j + i being word i of group j: the four words are transposed
// into element order in registers, so no per-element loop runs.
LORA_EXT_AVX512_TARGET inline void dropout_multipliers_x64_avx512(uint64_t seed, uint64_t offset,
                                                                   uint32_t threshold,
                                                                   uint64_t first_group,
                                                                   float scale, float* m) {
  __m512i c0, c1, c2, c3;
  philox_x16_avx512(seed, offset, first_group, c0, c1, c2, c3);
  // In each 128-bit lane L (groups 4L..4L+3): u_k = the four words of group 4L + k.
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  // Then a 4x4 transpose of 128-bit lanes: output vector v holds groups 4v..4v+3.
  const __m512i a = _mm512_shuffle_i32x4(u0, u1, 0x44), b = _mm512_shuffle_i32x4(u2, u3, 0x44);
  const __m512i c = _mm512_shuffle_i32x4(u0, u1, 0xEE), d = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  const __m512i v[4] = {_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD),
                        _mm512_shuffle_i32x4(c, d, 0x88), _mm512_shuffle_i32x4(c, d, 0xDD)};
  const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 s = _mm512_set1_ps(scale);
  for (int k = 0; k < 4; ++k) {
    _mm512_storeu_ps(m + 16 * k, _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(v[k], t), s));
  }
}
#pragma GCC diagnostic pop
#undef LORA_EXT_AVX512_TARGET

}  // namespace core
}  // namespace lora_ext
#endif
