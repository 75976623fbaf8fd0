// Native unit tests of the torch-free core: Philox-4x32-10 against Random123's published
// known-answer vectors, the dropout mask's contract, and the SIMD Philox against the scalar.
#include <cmath>
#include <cstdio>
#include <vector>

#include "core/dropout.h"
#include "core/philox_avx2.h"
#include "tests/check.h"

using namespace lora_ext::core;

static int failures = 0;

static void test_philox_known_answers() {
  struct Case {
    uint32_t ctr[4], key[2], out[4];
  };
  const Case cases[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Case& c : cases) {
    Philox4 counter{{c.ctr[0], c.ctr[1], c.ctr[2], c.ctr[3]}};
    const Philox4 got = philox4x32_10(counter, c.key[0], c.key[1]);
    for (int i = 0; i < 4; ++i) {
      CHECK(got.v[i] == c.out[i], "word %d: got %08x want %08x", i, got.v[i], c.out[i]);
    }
  }
}

static void test_thresholds() {
  CHECK(make_dropout_params(0.0, 1, 2).threshold == 0u, "p=0");
  CHECK(make_dropout_params(0.5, 1, 2).threshold == 0x80000000u, "p=0.5");
  CHECK(make_dropout_params(0.05, 1, 2).threshold == static_cast<uint32_t>(0.05 * 4294967296.0),
        "p=0.05");
  CHECK(std::fabs(make_dropout_params(0.25, 1, 2).scale - 1.0 / 0.75) < 1e-15, "scale");
  const DropoutParams neg = make_dropout_params(0.1, -1, -2);
  CHECK(neg.seed == ~0ull && neg.offset == ~0ull - 1, "negative seed/offset wrap to uint64");
}

static void test_keep_bits_contract() {
  // p = 0 keeps everything.
  for (uint64_t g = 0; g < 1000; ++g) {
    CHECK(dropout_keep_bits(7, 3, 0u, g) == 0xFu, "p=0 dropped something in group %llu",
          static_cast<unsigned long long>(g));
  }
  // Kept fraction within 5 sigma of 1 - p.
  const double ps[] = {0.05, 0.5, 0.9};
  for (double p : ps) {
    const DropoutParams params = make_dropout_params(p, 1234, 99);
    const uint64_t groups = 1 << 20;
    uint64_t kept = 0;
    for (uint64_t g = 0; g < groups; ++g) {
      kept += __builtin_popcount(dropout_keep_bits(params.seed, params.offset, params.threshold, g));
    }
    const double n = 4.0 * groups;
    const double sigma = std::sqrt(n * p * (1 - p));
    CHECK(std::fabs(kept - n * (1 - p)) < 5 * sigma, "p=%g kept %llu of %.0f", p,
          static_cast<unsigned long long>(kept), n);
  }
  // Different seeds or offsets give different masks; the same arguments the same mask.
  int same_seed = 0, diff_seed = 0, diff_offset = 0;
  for (uint64_t g = 0; g < 256; ++g) {
    const uint32_t t = 0x80000000u;
    same_seed += dropout_keep_bits(5, 6, t, g) == dropout_keep_bits(5, 6, t, g);
    diff_seed += dropout_keep_bits(5, 6, t, g) == dropout_keep_bits(5ull | (1ull << 40), 6, t, g);
    diff_offset += dropout_keep_bits(5, 6, t, g) == dropout_keep_bits(5, 6ull << 33, t, g);
  }
  CHECK(same_seed == 256, "not a pure function");
  CHECK(diff_seed < 64, "high seed word ignored (%d of 256 groups equal)", diff_seed);
  CHECK(diff_offset < 64, "high offset word ignored (%d of 256 groups equal)", diff_offset);
}

static void test_batch_matches_scalar() {
  const DropoutParams params = make_dropout_params(0.3, 0x123456789abcdefll, 42);
  // Crosses the 2^32 group boundary, where the counter's high word changes.
  const uint64_t starts[] = {0, 1000, (1ull << 32) - 16, (1ull << 32) - 15, (1ull << 32) - 5, (7ull << 32) + 3};
  for (uint64_t first : starts) {
    unsigned batch[kDropoutBatch];
    dropout_keep_bits_batch(params.seed, params.offset, params.threshold, first, batch);
    for (int j = 0; j < kDropoutBatch; ++j) {
      CHECK(batch[j] == dropout_keep_bits(params.seed, params.offset, params.threshold, first + j),
            "batch lane %d from %llu", j, static_cast<unsigned long long>(first));
    }
#ifdef LORA_EXT_HAVE_AVX2_PHILOX
    if (__builtin_cpu_supports("avx2")) {
      unsigned simd[8];
      dropout_keep_bits_x8_avx2(params.seed, params.offset, params.threshold, first, simd);
      for (int j = 0; j < 8; ++j) {
        CHECK(simd[j] == dropout_keep_bits(params.seed, params.offset, params.threshold, first + j),
              "avx2 lane %d from %llu", j, static_cast<unsigned long long>(first));
      }
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      unsigned simd[16];
      dropout_keep_bits_x16_avx512(params.seed, params.offset, params.threshold, first, simd);
      for (int j = 0; j < 16; ++j) {
        CHECK(simd[j] == dropout_keep_bits(params.seed, params.offset, params.threshold, first + j),
              "avx512 lane %d from %llu", j, static_cast<unsigned long long>(first));
      }
      float m[64];
      dropout_multipliers_x64_avx512(params.seed, params.offset, params.threshold, first, 2.5f, m);
      for (int e = 0; e < 64; ++e) {
        const unsigned keep = dropout_keep_bits(params.seed, params.offset, params.threshold, first + e / 4);
        CHECK(m[e] == (((keep >> (e % 4)) & 1u) ? 2.5f : 0.0f), "avx512 multiplier %d from %llu", e,
              static_cast<unsigned long long>(first));
      }
    }
#endif
  }
}

static void test_apply_group() {
  const DropoutParams params = make_dropout_params(0.5, 11, 0);
  const unsigned keep = dropout_keep_bits(params.seed, params.offset, params.threshold, 0);
  const float x[4] = {1.f, 2.f, 3.f, 4.f};
  float dropped[4] = {-9.f, -9.f, -9.f, -9.f};
  float grad[4] = {10.f, 20.f, 30.f, 40.f};
  auto load = [](float v) { return v; };
  // numel 3: the fourth lane is past the end and must stay untouched.
  dropout_apply_group(keep, 0, 3, 2.0f, x, dropped, grad, load, load);
  for (int i = 0; i < 3; ++i) {
    const bool kept = (keep >> i) & 1u;
    CHECK(dropped[i] == (kept ? 2.f * x[i] : 0.f), "dropped[%d]", i);
    CHECK(grad[i] == (kept ? 20.f * (i + 1) : 0.f), "grad[%d]", i);
  }
  CHECK(dropped[3] == -9.f && grad[3] == 40.f, "wrote past numel");
}

int main() {
  test_philox_known_answers();
  test_thresholds();
  test_keep_bits_contract();
  test_batch_matches_scalar();
  test_apply_group();
  if (failures == 0) std::printf("all core tests passed\n");
  return failures == 0 ? 0 : 1;
}
