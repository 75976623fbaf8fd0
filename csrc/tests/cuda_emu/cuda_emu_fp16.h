// __half and __nv_bfloat16 for cuda_emu, with CUDA's conversions bit for bit: float to half
// and to bfloat16 round to nearest even, overflow to infinity, keep subnormals, and turn
// every NaN into the canonical 0x7FFF as cuda_fp16.hpp and cuda_bf16.hpp do.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_emu.h"

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

namespace cuda_emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline unsigned short float_to_half_rn(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return 0x7FFFu;                    // NaN
  if (abs >= 0x477FF000u) return static_cast<unsigned short>(sign | 0x7C00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // Below the smallest normal half (2^-14): a subnormal in units of 2^-24, rounded to
    // nearest even; values under half of 2^-24 round to zero.
    if (abs < 0x33000000u) return static_cast<unsigned short>(sign);
    const uint32_t exponent = abs >> 23;                      // 102 .. 112
    const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;  // 24 significant bits
    const uint32_t shift = 126u - exponent;                   // 14 .. 24
    uint32_t q = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (q & 1u))) ++q;
    return static_cast<unsigned short>(sign | q);
  }
  // Normal: rebias the exponent (127 -> 15) and round 13 mantissa bits away.
  uint32_t h = ((abs >> 13) - ((127u - 15u) << 10));
  const uint32_t rest = abs & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
  return static_cast<unsigned short>(sign | h);
}

inline float half_to_float(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return bits_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float v = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline unsigned short float_to_bfloat16_rn(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;  // NaN
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);  // ties to even; overflow to inf
  return static_cast<unsigned short>((u + rounding) >> 16);
}

inline float bfloat16_to_float(unsigned short b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace cuda_emu

inline __half __float2half_rn(float f) { return __half{::cuda_emu::float_to_half_rn(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return ::cuda_emu::half_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{::cuda_emu::float_to_bfloat16_rn(f)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::cuda_emu::bfloat16_to_float(b.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
