// The emulation's own arithmetic against independent host references: float to half and
// bfloat16 rounding (including ties, subnormals, overflow and NaN), the reverse, the _rn
// intrinsics and __umulhi. The kernel tests rely on these being CUDA's bit for bit.
#include "tests/emu/emu_testing.h"

static int failures = 0;

// Round to nearest even by picking the closer of the two neighbouring bfloat16 values in
// double precision: a different construction from the emulator's integer rounding.
static uint16_t bf16_reference(float f) {
  const uint32_t u = cuda_emu::float_bits(f);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double x = f, a = cuda_emu::bfloat16_to_float(lo);
  if ((u & 0xFFFFu) == 0) return lo;
  const double b = (lo & 0x7F80u) == 0x7F00u && (hi & 0x7FFFu) == 0x7F80u
                       ? std::ldexp(1.0, 128) * (f < 0 ? -1 : 1)  // rounding up overflows to inf
                       : static_cast<double>(cuda_emu::bfloat16_to_float(hi));
  const double da = std::fabs(x - a), db = std::fabs(b - x);
  if (da < db) return lo;
  if (db < da) return hi;
  return (lo & 1u) ? hi : lo;
}

static void check_float(float f) {
  if (std::isnan(f)) {
    CHECK(__float2half_rn(f).__x == 0x7FFF, "half(NaN)");
    CHECK(__float2bfloat16_rn(f).__x == 0x7FFF, "bf16(NaN)");
    return;
  }
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t hb;
  std::memcpy(&hb, &h, 2);
  CHECK(__float2half_rn(f).__x == hb, "half(%a) = %04x, want %04x", f, __float2half_rn(f).__x, hb);
  CHECK(__half2float(__half{hb}) == static_cast<float>(h), "float(half %04x)", hb);
  CHECK(__float2bfloat16_rn(f).__x == bf16_reference(f), "bf16(%a) = %04x, want %04x", f,
        __float2bfloat16_rn(f).__x, bf16_reference(f));
}

static void test_conversions() {
  // A stride through every float bit pattern, then the neighbourhoods of every boundary.
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 9973) check_float(cuda_emu::bits_float(static_cast<uint32_t>(u)));
  const float edges[] = {65504.0f, 65520.0f, 65536.0f, 6.103515625e-05f /* 2^-14 */,
                         5.960464477539063e-08f /* 2^-24 */, 2.9802322387695312e-08f /* 2^-25 */,
                         3.3895313892515355e+38f /* bf16 max */, 1.0f, 3.0f, 1.0e-40f, 0.0f,
                         INFINITY, 3.4028234663852886e+38f};
  for (float e : edges) {
    for (float s : {1.0f, -1.0f}) {
      uint32_t u = cuda_emu::float_bits(s * e);
      for (int d = -70; d <= 70; ++d) check_float(cuda_emu::bits_float(u + d));
    }
  }
  // Ties of both kinds for half (mantissa bit 13) and bfloat16 (bit 16).
  for (uint32_t m = 0; m < 4096; ++m) {
    check_float(cuda_emu::bits_float(0x3F800000u | (m << 13) | 0x1000u));
    check_float(cuda_emu::bits_float(0x3F800000u | (m << 16) | 0x8000u));
  }
  // Every half and bfloat16 converts to float exactly and back to itself.
  for (uint32_t b = 0; b < 65536; ++b) {
    const float fh = __half2float(__half{static_cast<uint16_t>(b)});
    const float fb = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(b)});
    if (!std::isnan(fh)) CHECK(__float2half_rn(fh).__x == b, "half round trip %04x", b);
    if (!std::isnan(fb)) CHECK(__float2bfloat16_rn(fb).__x == b, "bf16 round trip %04x", b);
    _Float16 h;
    std::memcpy(&h, &b, 2);
    if (!std::isnan(fh)) CHECK(fh == static_cast<float>(h), "half %04x to float", b);
  }
}

static void test_arithmetic() {
  emu_test::Rng rng(7);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t a = static_cast<uint32_t>(rng.next()), b = static_cast<uint32_t>(rng.next());
    CHECK(__umulhi(a, b) == static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32), "umulhi");
    const float x = static_cast<float>(rng.uniform() * 1e3), y = static_cast<float>(rng.uniform()),
                z = static_cast<float>(rng.uniform() * 1e-3);
    const double exact = static_cast<double>(x) * y + z;  // exact in double: 24+24 bits
    CHECK(__fmaf_rn(x, y, z) == static_cast<float>(exact), "fma %a %a %a", x, y, z);
    CHECK(__fmul_rn(x, y) == static_cast<float>(static_cast<double>(x) * y), "mul");
    CHECK(__fadd_rn(x, z) == static_cast<float>(static_cast<double>(x) + z), "add");
  }
  CHECK(__umulhi(0xFFFFFFFFu, 0xFFFFFFFFu) == 0xFFFFFFFEu, "umulhi max");
}

int main() {
  test_conversions();
  test_arithmetic();
  if (failures == 0) std::printf("emu_intrinsics: all passed\n");
  return failures == 0 ? 0 : 1;
}
