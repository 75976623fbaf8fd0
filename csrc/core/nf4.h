// NF4 (4-bit NormalFloat) arithmetic of lora-ext, bit-compatible with bitsandbytes 0.50.
//
// Torch-free and usable from host and device code: the CPU kernels, the CUDA kernels and the
// native unit tests all run these functions, and lora_ext/reference/_nf4.py writes the same
// rules in PyTorch. Layout: a tensor of n elements, flattened row-major, is cut into blocks of
// `blocksize` elements with one fp32 absmax each; element 2k goes in the high nibble of byte
// k, element 2k+1 in its low nibble; an odd n pads code 7 (zero) in the last low nibble.
//
// Every product and sum below is rounded on its own (no fused multiply-add) except where
// bitsandbytes itself fuses one: the results must equal bitsandbytes' to the bit, so the
// helpers force the rounding on the device, where nvcc would otherwise contract.
#pragma once
#include <math.h>
#include <stdint.h>

#include "philox.h"  // LORA_EXT_HD

namespace lora_ext {
namespace core {

// The 16 NF4 values, as bitsandbytes' decimal literals rounded to fp32.
#define LORA_EXT_NF4_CODE_VALUES                                                            \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,           \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,                    \
      0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                     \
      0.7229568362236023f, 1.0f

constexpr int kNF4Codes = 16;
constexpr uint8_t kNF4PadCode = 7;  // the code of 0.0, padding an odd element count

// The blocksizes bitsandbytes accepts for 4-bit quantisation.
LORA_EXT_HD bool nf4_blocksize_ok(int64_t blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

// log2 of a power-of-two blocksize: kernels index absmax with e >> shift (a 64-bit division
// per element group costs more than the rest of the dequantisation).
LORA_EXT_HD int log2_pow2(int64_t v) {
  int shift = 0;
  while ((int64_t{1} << shift) < v) ++shift;
  return shift;
}

LORA_EXT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // the build passes -ffp-contract=off
#endif
}

LORA_EXT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

LORA_EXT_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LORA_EXT_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return fmaf(a, b, c);
#endif
}

// torch.clamp semantics: NaN stays NaN.
LORA_EXT_HD float clamp_unit(float v) {
  return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
}

// Decision thresholds between neighbouring codes, (c[i] + c[i+1]) / 2 in fp32; `code` is
// the 16-entry table. A value equal to a threshold takes the lower code.
LORA_EXT_HD void nf4_bounds(const float* code, float* bounds) {
  for (int i = 0; i < kNF4Codes - 1; ++i) bounds[i] = mul_rn(add_rn(code[i], code[i + 1]), 0.5f);
}

// The code of a scaled value s: the number of thresholds not >= s (torch.bucketize with
// right=False: thresholds strictly below s, and all 15 for NaN).
LORA_EXT_HD uint8_t nf4_encode(float s, const float* bounds) {
  int q = 0;
  for (int i = 0; i < kNF4Codes - 1; ++i) q += !(bounds[i] >= s);
  return static_cast<uint8_t>(q);
}

// The clamp bitsandbytes puts under absmax before dividing by it (torch's
// clamp(min=1e-38): the Python double 1e-38 converted to fp32; NaN stays NaN).
LORA_EXT_HD float nf4_safe_absmax(float absmax) {
  const float floor_value = static_cast<float>(1e-38);
  return absmax < floor_value ? floor_value : absmax;
}

// Scaled value of element v in its block. bitsandbytes multiplies by the reciprocal in full
// blocks but divides in the trailing partial block; both are reproduced.
struct NF4Scaler {
  float inv;      // 1 / safe_absmax, for full blocks
  float divisor;  // safe_absmax, for the partial block
  bool partial;
  LORA_EXT_HD float operator()(float v) const {
    return clamp_unit(partial ? div_rn(v, divisor) : mul_rn(v, inv));
  }
};

LORA_EXT_HD NF4Scaler nf4_scaler(float absmax, bool partial_block) {
  NF4Scaler s;
  s.divisor = nf4_safe_absmax(absmax);
  s.inv = div_rn(1.0f, s.divisor);
  s.partial = partial_block;
  return s;
}

// |v| folded into a running absmax with torch.amax semantics: NaN propagates.
LORA_EXT_HD float absmax_fold(float running, float v) {
  const float a = fabsf(v);
  return (a > running || a != a) ? a : running;
}

LORA_EXT_HD uint8_t nf4_pack(uint8_t first, uint8_t second) {
  return static_cast<uint8_t>((first << 4) | second);
}

// Code of element e (flat index) in packed bytes.
LORA_EXT_HD uint8_t nf4_code_at(const uint8_t* packed, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return (e & 1) ? (byte & 15) : (byte >> 4);
}

// Dequantised value in fp32: code * absmax, one rounding.
LORA_EXT_HD float nf4_value(const float* code, uint8_t q, float absmax) {
  return mul_rn(code[q], absmax);
}

// ---------------------------------------------------------------- 8-bit double quantisation
//
// bitsandbytes' CPU blockwise 8-bit quantiser (used for absmax with compress_statistics) maps
// a scaled value s to one of 65536 slots, trunc(fma((clamp(s) + 1) * 0.5, 65535, 0.5)) (its
// compiled code fuses this multiply-add), and slot i to the code nearest the fp32 value
// -1 + (2 * i) / 65535: the number of code midpoints 0.5 * (c[j] + c[j+1]) strictly below it.
// `mids` holds the 255 midpoints of the sorted 256-entry code.

constexpr int kDynamicCodes = 256;

LORA_EXT_HD void dynamic_midpoints(const float* code, float* mids) {
  for (int j = 0; j < kDynamicCodes - 1; ++j) mids[j] = mul_rn(0.5f, add_rn(code[j], code[j + 1]));
}

LORA_EXT_HD uint32_t dynamic_slot(float s) {
  const float t = mul_rn(add_rn(clamp_unit(s), 1.0f), 0.5f);
  const float u = fma_rn(t, 65535.0f, 0.5f);
  // The compiled truncation turns NaN into 0x80000000, whose low 16 bits are slot 0.
  return u != u ? 0u : static_cast<uint32_t>(u) & 0xFFFFu;
}

LORA_EXT_HD float dynamic_slot_value(uint32_t slot) {
  return add_rn(-1.0f, div_rn(mul_rn(2.0f, static_cast<float>(slot)), 65535.0f));
}

LORA_EXT_HD uint8_t dynamic_encode(float s, const float* mids) {
  const float val = dynamic_slot_value(dynamic_slot(s));
  int lo = 0, hi = kDynamicCodes - 1;  // first midpoint not below val (lower bound)
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (mids[mid] < val) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return static_cast<uint8_t>(lo);
}

// The absmax of one 8-bit block as bitsandbytes' CPU loop computes it: std::max from 0, so
// NaN is skipped.
LORA_EXT_HD float dynamic_absmax_fold(float running, float v) {
  const float a = fabsf(v);
  return running < a ? a : running;
}

// codes of one block of centred values c[0..len) with block absmax m (0 -> all codes 0).
LORA_EXT_HD void dynamic_quantize_block(const float* c, int64_t len, float m, const float* mids,
                                        uint8_t* codes) {
  if (m == 0.0f) {
    for (int64_t i = 0; i < len; ++i) codes[i] = 0;
    return;
  }
  const float inv = div_rn(1.0f, m);
  for (int64_t i = 0; i < len; ++i) codes[i] = dynamic_encode(mul_rn(c[i], inv), mids);
}

// absmax = code[q] * absmax2 + offset, each step rounded (bitsandbytes dequantises, then adds
// the offset as a separate tensor op).
LORA_EXT_HD float dynamic_dequantize(const float* code, uint8_t q, float absmax2, float offset) {
  return add_rn(mul_rn(code[q], absmax2), offset);
}

}  // namespace core
}  // namespace lora_ext
