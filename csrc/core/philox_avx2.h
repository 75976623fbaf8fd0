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

// Twice the groups of the AVX2 version per call: the Philox rounds are what dropout costs on
// the CPU, and with native bf16 GEMMs they are a large part of a LoRA layer's time.
LORA_EXT_AVX512_TARGET inline void dropout_keep_bits_x16_avx512(uint64_t seed, uint64_t offset,
                                                                 uint32_t threshold,
                                                                 uint64_t first_group,
                                                                 unsigned* keep) {
  alignas(64) uint32_t lo[16], hi[16];
  for (int j = 0; j < 16; ++j) {
    const uint64_t group = first_group + static_cast<uint64_t>(j);
    lo[j] = static_cast<uint32_t>(group);
    hi[j] = static_cast<uint32_t>(group >> 32);
  }
  __m512i c0 = _mm512_load_si512(lo);
  __m512i c1 = _mm512_load_si512(hi);
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo_avx512(c0, m0, hi0, lo0);
    mulhilo_avx512(c2, m1, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
  const unsigned b0 = _mm512_cmpge_epu32_mask(c0, t), b1 = _mm512_cmpge_epu32_mask(c1, t);
  const unsigned b2 = _mm512_cmpge_epu32_mask(c2, t), b3 = _mm512_cmpge_epu32_mask(c3, t);
  for (int j = 0; j < 16; ++j) {
    keep[j] = ((b0 >> j) & 1u) | (((b1 >> j) & 1u) << 1) | (((b2 >> j) & 1u) << 2) |
              (((b3 >> j) & 1u) << 3);
  }
}
#pragma GCC diagnostic pop
#undef LORA_EXT_AVX512_TARGET

}  // namespace core
}  // namespace lora_ext
#endif
