// Native unit tests of core/nf4.h: the NF4 codebook and its decision rule (ties to the lower
// code, NaN to the top code), nibble packing, the full/partial block scalers, and the 8-bit
// slot arithmetic of the double quantisation.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/nf4.h"
#include "tests/check.h"

using namespace lora_ext::core;

static int failures = 0;

static const float kCode[kNF4Codes] = {LORA_EXT_NF4_CODE_VALUES};

static void test_codebook() {
  CHECK(kCode[0] == -1.0f && kCode[7] == 0.0f && kCode[15] == 1.0f, "endpoints");
  for (int i = 0; i + 1 < kNF4Codes; ++i) CHECK(kCode[i] < kCode[i + 1], "sorted at %d", i);
  CHECK(kCode[kNF4PadCode] == 0.0f, "pad code is zero");
}

static void test_encode_rule() {
  float bounds[kNF4Codes - 1];
  nf4_bounds(kCode, bounds);
  for (int i = 0; i < kNF4Codes; ++i) CHECK(nf4_encode(kCode[i], bounds) == i, "code %d", i);
  for (int i = 0; i < kNF4Codes - 1; ++i) {
    CHECK(bounds[i] == (kCode[i] + kCode[i + 1]) / 2, "midpoint %d", i);
    // A value on the threshold takes the lower code; one ulp above takes the upper.
    CHECK(nf4_encode(bounds[i], bounds) == i, "tie %d -> %d", i, nf4_encode(bounds[i], bounds));
    CHECK(nf4_encode(std::nextafter(bounds[i], 2.0f), bounds) == i + 1, "above tie %d", i);
    CHECK(nf4_encode(std::nextafter(bounds[i], -2.0f), bounds) == i, "below tie %d", i);
  }
  CHECK(nf4_encode(NAN, bounds) == 15, "NaN -> 15 (torch.bucketize)");
  CHECK(nf4_encode(clamp_unit(-7.0f), bounds) == 0 && nf4_encode(clamp_unit(7.0f), bounds) == 15,
        "clamped ends");
  CHECK(std::isnan(clamp_unit(NAN)), "clamp keeps NaN");
}

static void test_packing() {
  const uint8_t codes[5] = {3, 14, 0, 15, 9};
  uint8_t packed[3];
  packed[0] = nf4_pack(codes[0], codes[1]);
  packed[1] = nf4_pack(codes[2], codes[3]);
  packed[2] = nf4_pack(codes[4], kNF4PadCode);
  CHECK(packed[0] == 0x3E && packed[1] == 0x0F && packed[2] == 0x97, "high nibble first");
  for (int e = 0; e < 5; ++e) CHECK(nf4_code_at(packed, e) == codes[e], "element %d", e);
  CHECK(nf4_value(kCode, 15, 2.5f) == 2.5f && nf4_value(kCode, 7, 3.0f) == 0.0f, "values");
}

static void test_scalers() {
  // Full blocks multiply by the reciprocal, the partial block divides: find a value where
  // the two roundings differ and check that each scaler gives its own.
  const float absmax = 3.0f;
  const NF4Scaler full = nf4_scaler(absmax, false), part = nf4_scaler(absmax, true);
  int differing = 0;
  for (int i = 1; i < 2000; ++i) {
    const float v = 0.001f * i;
    const float by_mul = v * (1.0f / absmax), by_div = v / absmax;
    CHECK(full(v) == by_mul && part(v) == by_div, "v=%g", v);
    differing += by_mul != by_div;
  }
  CHECK(differing > 0, "the two rules never differ on the sample: the test proves nothing");
  // An all-zero block: absmax 0 is floored before dividing, so zeros encode as code 7.
  float bounds[kNF4Codes - 1];
  nf4_bounds(kCode, bounds);
  CHECK(nf4_encode(nf4_scaler(0.0f, false)(0.0f), bounds) == 7, "zero block");
  CHECK(nf4_safe_absmax(0.0f) == static_cast<float>(1e-38), "floor");
  CHECK(std::isnan(nf4_safe_absmax(NAN)), "NaN absmax stays NaN (torch.clamp)");
  CHECK(std::isnan(absmax_fold(1.0f, NAN)) && absmax_fold(1.0f, -2.0f) == 2.0f, "fold");
  CHECK(nf4_blocksize_ok(32) && nf4_blocksize_ok(4096) && !nf4_blocksize_ok(16) &&
            !nf4_blocksize_ok(48) && !nf4_blocksize_ok(8192),
        "blocksizes");
}

static void test_dynamic() {
  // A sorted 256-entry code in [-1, 1] with a dense cluster near 0, like the dynamic map.
  std::vector<float> code(kDynamicCodes);
  for (int j = 0; j < kDynamicCodes; ++j) {
    const float t = -1.0f + 2.0f * j / (kDynamicCodes - 1);
    code[j] = t * t * t;
  }
  std::vector<float> mids(kDynamicCodes - 1);
  dynamic_midpoints(code.data(), mids.data());
  CHECK(dynamic_slot(-1.0f) == 0 && dynamic_slot(1.0f) == 65535, "end slots");
  CHECK(dynamic_slot(NAN) == 0, "NaN slot");
  CHECK(dynamic_slot_value(0) == -1.0f && dynamic_slot_value(65535) == 1.0f, "slot values");
  CHECK(dynamic_encode(-1.0f, mids.data()) == 0 && dynamic_encode(1.0f, mids.data()) == 255,
        "end codes");
  // Codes are nondecreasing in s, and each is the nearest code to its slot's value.
  int previous = 0;
  for (int i = 0; i <= 20000; ++i) {
    const float s = -1.0f + 2.0f * i / 20000;
    const int q = dynamic_encode(s, mids.data());
    CHECK(q >= previous, "monotone at %g", s);
    previous = q;
    const float val = dynamic_slot_value(dynamic_slot(s));
    for (int j = 0; j < kDynamicCodes; ++j) {
      if (std::fabs(code[j] - val) < std::fabs(code[q] - val)) {
        CHECK(false, "s=%g: code %d is nearer than %d", s, j, q);
        break;
      }
    }
  }
  // The slot's multiply-add is fused (one rounding), as bitsandbytes' compiled code does.
  const float t = 0.3f;
  CHECK(dynamic_slot(2 * t - 1) == static_cast<uint32_t>(std::fma(t, 65535.0f, 0.5f)), "fma slot");
  std::vector<float> c = {0.5f, -0.25f, 0.0f, 0.125f};
  uint8_t q[4];
  dynamic_quantize_block(c.data(), 4, 0.5f, mids.data(), q);
  CHECK(q[0] == 255, "absmax element -> top code");
  dynamic_quantize_block(c.data(), 4, 0.0f, mids.data(), q);
  CHECK(q[0] == 0 && q[1] == 0 && q[2] == 0 && q[3] == 0, "zero block -> codes 0");
  CHECK(dynamic_dequantize(code.data(), 255, 2.0f, 0.5f) == 2.5f, "dequantize");
}

int main() {
  test_codebook();
  test_encode_rule();
  test_packing();
  test_scalers();
  test_dynamic();
  if (failures == 0) std::printf("test_nf4: all passed\n");
  return failures == 0 ? 0 : 1;
}
