// Native tests of csrc/cpu/skinny_gemm.h: every micro-kernel at every level this CPU can run,
// against an fp64 reference, over ranks with and without vector tails, odd feature counts and
// row counts that are not a multiple of the register blocks, with and without a dropout mask,
// for each storage type. The bound is twice the worst-case error of an fp32 (fp64) sum of the
// same products (the tolerance rule's 2x), plus the rounding of a bf16 output.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/isa.h"
#include "cpu/skinny_gemm.h"
#include "tests/check.h"

using lora_ext::cpu::acc_of;
using lora_ext::cpu::Bf16;
using lora_ext::cpu::F16;
using lora_ext::cpu::Isa;
using lora_ext::cpu::padded_cols;

static int failures = 0;

static const int64_t kRanks[] = {1, 3, 8, 16, 17, 64, 256};

// Values i/64 with |i| <= 128: exact in bf16 and fp16, so every storage type holds the same
// numbers and the reference sees exactly what the kernels load.
static std::vector<double> values(size_t n, std::mt19937& rng) {
  std::uniform_int_distribution<int> dist(-128, 128);
  std::vector<double> v(n);
  for (double& e : v) e = dist(rng) / 64.0;
  return v;
}

// Dropout multipliers: 0 (dropped) or 1/(1 - 0.2) = 1.25.
static std::vector<double> multipliers(size_t n, std::mt19937& rng) {
  std::bernoulli_distribution keep(0.8);
  std::vector<double> m(n);
  for (double& e : m) e = keep(rng) ? 1.25 : 0.0;
  return m;
}

template <typename T>
T stored(double v);
template <>
float stored<float>(double v) { return static_cast<float>(v); }
template <>
double stored<double>(double v) { return v; }
template <>
Bf16 stored<Bf16>(double v) {
  const float f = static_cast<float>(v);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return Bf16{static_cast<uint16_t>(bits >> 16)};  // exact for our values
}
template <>
F16 stored<F16>(double v) {
  if (v == 0.0) return F16{0};
  int exponent;
  const double mantissa = std::frexp(std::fabs(v), &exponent);  // v = mantissa · 2^exponent
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  const uint16_t bits = static_cast<uint16_t>(((exponent - 1 + 15) << 10) |
                                              static_cast<uint16_t>((mantissa * 2.0 - 1.0) * 1024.0));
  return F16{static_cast<uint16_t>(sign | bits)};
}

template <typename T>
std::vector<T> store_all(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = stored<T>(v[i]);
  return out;
}
template <typename Acc>
std::vector<Acc> to_acc(const std::vector<double>& v) {
  return std::vector<Acc>(v.begin(), v.end());
}
// A packed [rows, cols] copy: row stride padded_cols(cols), zeros beyond.
template <typename Acc>
std::vector<Acc> packed(const std::vector<double>& v, int64_t rows, int64_t cols) {
  const int64_t ld = padded_cols<Acc>(cols);
  std::vector<Acc> out(static_cast<size_t>(rows * ld), Acc(0));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[i * ld + j] = static_cast<Acc>(v[i * cols + j]);
  }
  return out;
}

template <typename Acc>
double unit_roundoff() {
  return std::is_same_v<Acc, double> ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
}
// Twice the worst-case error of a sum of n products whose magnitudes sum to `magnitude`.
template <typename Acc>
double bound(int64_t n, double magnitude) {
  const double u = unit_roundoff<Acc>(), gamma = (n + 2) * u / (1.0 - (n + 2) * u);
  return 2.0 * gamma * magnitude + 1e-300;
}

static const char* type_name(float*) { return "fp32"; }
static const char* type_name(double*) { return "fp64"; }
static const char* type_name(Bf16*) { return "bf16"; }
static const char* type_name(F16*) { return "fp16"; }

template <typename T>
void test_rows_by_rank(Isa level, int64_t rows, int64_t K, int64_t r, bool masked, std::mt19937& rng) {
  using Acc = acc_of<T>;
  const std::vector<double> x = values(rows * K, rng), p = values(K * r, rng);
  const std::vector<double> m = masked ? multipliers(rows * K, rng) : std::vector<double>();
  const std::vector<T> xs = store_all<T>(x);
  const std::vector<Acc> ms = to_acc<Acc>(m), ps = packed<Acc>(p, K, r);
  const int64_t ldy = r + 3;  // the 3 columns past r must stay untouched
  std::vector<Acc> y(static_cast<size_t>(rows * ldy), Acc(-7));
  const double scale = 0.5;
  lora_ext::cpu::rows_by_rank(xs.data(), K, masked ? ms.data() : nullptr, K, ps.data(),
                              padded_cols<Acc>(r), rows, K, r, static_cast<Acc>(scale), y.data(),
                              ldy, level);
  int bad = 0;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t j = 0; j < ldy; ++j) {
      if (j >= r) {
        bad += y[t * ldy + j] != Acc(-7);
        continue;
      }
      double ref = 0, magnitude = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double term = x[t * K + k] * (masked ? m[t * K + k] : 1.0) * p[k * r + j];
        ref += term;
        magnitude += std::fabs(term);
      }
      bad += !(std::fabs(y[t * ldy + j] - scale * ref) <= scale * bound<Acc>(K, magnitude));
    }
  }
  CHECK(bad == 0, "rows_by_rank %s at %s: rows %lld, K %lld, r %lld, mask %d: %d bad elements",
        type_name(static_cast<T*>(nullptr)), lora_ext::cpu::isa_name(level),
        static_cast<long long>(rows), static_cast<long long>(K), static_cast<long long>(r),
        masked, bad);
}

template <typename T>
void test_rank_by_cols(Isa level, int64_t rows, int64_t K, int64_t r, bool masked, std::mt19937& rng) {
  using Acc = acc_of<T>;
  const std::vector<double> z = values(rows * r, rng), x = values(rows * K, rng);
  const std::vector<double> g0 = values(r * K, rng);  // it accumulates onto g
  const std::vector<double> m = masked ? multipliers(rows * K, rng) : std::vector<double>();
  const std::vector<T> xs = store_all<T>(x);
  const std::vector<Acc> zs = to_acc<Acc>(z), ms = to_acc<Acc>(m);
  std::vector<Acc> g = packed<Acc>(g0, r, K);
  const int64_t ldg = padded_cols<Acc>(K);
  lora_ext::cpu::rank_by_cols(zs.data(), r, xs.data(), K, masked ? ms.data() : nullptr, K, rows,
                              K, r, g.data(), ldg, level);
  int bad = 0;
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < ldg; ++k) {
      if (k >= K) {
        bad += g[j * ldg + k] != Acc(0);  // padding: zeros added to zeros
        continue;
      }
      double ref = g0[j * K + k], magnitude = std::fabs(ref);
      for (int64_t t = 0; t < rows; ++t) {
        const double term = z[t * r + j] * x[t * K + k] * (masked ? m[t * K + k] : 1.0);
        ref += term;
        magnitude += std::fabs(term);
      }
      bad += !(std::fabs(g[j * ldg + k] - ref) <= bound<Acc>(rows + 1, magnitude));
    }
  }
  CHECK(bad == 0, "rank_by_cols %s at %s: rows %lld, K %lld, r %lld, mask %d: %d bad elements",
        type_name(static_cast<T*>(nullptr)), lora_ext::cpu::isa_name(level),
        static_cast<long long>(rows), static_cast<long long>(K), static_cast<long long>(r),
        masked, bad);
}

static double as_double(float v) { return v; }
static double as_double(double v) { return v; }
static double as_double(Bf16 v) { return lora_ext::cpu::to_float(v); }

template <typename Out>
void test_rank_to_cols(Isa level, int64_t rows, int64_t K, int64_t r, bool masked, std::mt19937& rng) {
  using Acc = acc_of<Out>;
  const std::vector<double> z = values(rows * r, rng), a = values(r * K, rng);
  const std::vector<double> m = masked ? multipliers(rows * K, rng) : std::vector<double>();
  const std::vector<Acc> zs = to_acc<Acc>(z), as = packed<Acc>(a, r, K), ms = to_acc<Acc>(m);
  const int64_t ldo = K + 5;  // the 5 columns past K must stay untouched
  const Out sentinel = stored<Out>(-7.0);
  std::vector<Out> out(static_cast<size_t>(rows * ldo), sentinel);
  lora_ext::cpu::rank_to_cols(zs.data(), r, as.data(), padded_cols<Acc>(K),
                              masked ? ms.data() : nullptr, K, rows, K, r, out.data(), ldo, level);
  // A bf16 output adds its own rounding: half a unit in the last of its 8 bits.
  const double out_rounding = std::is_same_v<Out, Bf16> ? std::ldexp(1.0, -8) : 0.0;
  int bad = 0;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t k = 0; k < ldo; ++k) {
      const double got = as_double(out[t * ldo + k]);
      if (k >= K) {
        bad += got != -7.0;
        continue;
      }
      double ref = 0, magnitude = 0;
      for (int64_t j = 0; j < r; ++j) {
        ref += z[t * r + j] * a[j * K + k];
        magnitude += std::fabs(z[t * r + j] * a[j * K + k]);
      }
      const double mk = masked ? m[t * K + k] : 1.0;
      ref *= mk;
      magnitude *= mk;
      bad += !(std::fabs(got - ref) <= bound<Acc>(r + 1, magnitude) + 2.0 * out_rounding * std::fabs(ref));
    }
  }
  CHECK(bad == 0, "rank_to_cols %s at %s: rows %lld, K %lld, r %lld, mask %d: %d bad elements",
        type_name(static_cast<Out*>(nullptr)), lora_ext::cpu::isa_name(level),
        static_cast<long long>(rows), static_cast<long long>(K), static_cast<long long>(r),
        masked, bad);
}

template <typename T>
void test_type(Isa level, std::mt19937& rng) {
  // 77 rows: past the 64-row block of rank_by_cols and not a multiple of any register block;
  // 301 features: past a column block of every kernel, with a vector tail at every level.
  for (int64_t r : kRanks) {
    for (bool masked : {false, true}) {
      test_rows_by_rank<T>(level, 77, 301, r, masked, rng);
      test_rank_by_cols<T>(level, 77, 301, r, masked, rng);
    }
  }
  // Degenerate and tiny shapes: no rows, no features, one of each.
  for (int64_t r : {int64_t{1}, int64_t{17}}) {
    test_rows_by_rank<T>(level, 0, 5, r, true, rng);
    test_rows_by_rank<T>(level, 3, 0, r, false, rng);
    test_rows_by_rank<T>(level, 1, 1, r, true, rng);
    test_rank_by_cols<T>(level, 0, 5, r, true, rng);
    test_rank_by_cols<T>(level, 1, 1, r, false, rng);
  }
}

template <typename Out>
void test_out_type(Isa level, std::mt19937& rng) {
  for (int64_t r : kRanks) {
    for (bool masked : {false, true}) test_rank_to_cols<Out>(level, 77, 301, r, masked, rng);
  }
  test_rank_to_cols<Out>(level, 0, 5, 3, true, rng);
  test_rank_to_cols<Out>(level, 1, 1, 1, false, rng);
  test_rank_to_cols<Out>(level, 9, 7, 16, true, rng);  // fewer features than one vector
}

// Every level gives the same bits (same summation order, no contraction), for one storage
// type of each kernel's with a mask, at a rank with a vector tail.
static void test_levels_agree() {
  const int64_t rows = 37, K = 301, r = 17;
  std::mt19937 rng(99);
  const std::vector<double> x = values(rows * K, rng), m = multipliers(rows * K, rng);
  const std::vector<double> p = values(K * r, rng), z = values(rows * r, rng);
  const std::vector<Bf16> xs = store_all<Bf16>(x);
  const std::vector<float> ms = to_acc<float>(m), zs = to_acc<float>(z);
  const std::vector<float> ps = packed<float>(p, K, r), as = packed<float>(p, r, K);
  std::vector<float> first_y, first_g;
  std::vector<Bf16> first_out;
  const Isa levels[] = {Isa::kDefault, Isa::kAvx2, Isa::kAvx512};
  for (Isa level : levels) {
    if (level > lora_ext::cpu::cpu_best_isa()) break;
    std::vector<float> y(rows * r), g(r * padded_cols<float>(K), 0.0f);
    std::vector<Bf16> out(rows * K);
    lora_ext::cpu::rows_by_rank(xs.data(), K, ms.data(), K, ps.data(), padded_cols<float>(r), rows,
                                K, r, 0.5f, y.data(), r, level);
    lora_ext::cpu::rank_by_cols(zs.data(), r, xs.data(), K, ms.data(), K, rows, K, r, g.data(),
                                padded_cols<float>(K), level);
    lora_ext::cpu::rank_to_cols(zs.data(), r, as.data(), padded_cols<float>(K), ms.data(), K, rows,
                                K, r, out.data(), K, level);
    if (level == Isa::kDefault) {
      first_y = y, first_g = g, first_out = out;
      continue;
    }
    const char* name = lora_ext::cpu::isa_name(level);
    CHECK(std::memcmp(y.data(), first_y.data(), y.size() * sizeof(float)) == 0, "rows_by_rank at %s", name);
    CHECK(std::memcmp(g.data(), first_g.data(), g.size() * sizeof(float)) == 0, "rank_by_cols at %s", name);
    CHECK(std::memcmp(out.data(), first_out.data(), out.size() * sizeof(Bf16)) == 0, "rank_to_cols at %s", name);
  }
}

// The element conversions: fp16 against its definition for every bit pattern, bf16 rounding
// to nearest even, and NaN staying NaN.
static void test_conversions() {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint32_t e = (h >> 10) & 0x1F, mant = h & 0x3FF;
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    const float got = lora_ext::cpu::to_float(F16{static_cast<uint16_t>(h)});
    if (e == 31) {
      bad += mant == 0 ? !(std::isinf(got) && std::signbit(got) == (sign < 0)) : !std::isnan(got);
    } else {
      const double want = e == 0 ? sign * std::ldexp(mant, -24) : sign * std::ldexp(1024 + mant, int(e) - 25);
      bad += static_cast<double>(got) != want || std::signbit(got) != (sign < 0);
    }
  }
  CHECK(bad == 0, "to_float(F16): %d bit patterns wrong", bad);
  const float one_and_half_ulp = 1.0f + std::ldexp(1.0f, -8);  // a tie: to even (1.0)
  CHECK(lora_ext::cpu::to_bf16(one_and_half_ulp).bits == 0x3F80, "tie to even down");
  const float tie_up = 1.0f + 3 * std::ldexp(1.0f, -8);  // a tie: to even (1 + 2^-6)
  CHECK(lora_ext::cpu::to_bf16(tie_up).bits == 0x3F82, "tie to even up");
  CHECK(lora_ext::cpu::to_bf16(1.0f + std::ldexp(1.0f, -9)).bits == 0x3F80, "below half: down");
  CHECK(lora_ext::cpu::to_bf16(std::nanf("")).bits == 0x7FC0, "NaN");
  CHECK(lora_ext::cpu::to_float(Bf16{0xC0A0}) == -5.0f, "bf16 load");
}

int main() {
  test_conversions();
  test_levels_agree();
  std::mt19937 rng(1234);
  const Isa levels[] = {Isa::kDefault, Isa::kAvx2, Isa::kAvx512};
  for (Isa level : levels) {
    if (level > lora_ext::cpu::cpu_best_isa()) {
      std::printf("skinny_gemm: level %s skipped, above this CPU's\n", lora_ext::cpu::isa_name(level));
      continue;
    }
    test_type<float>(level, rng);
    test_type<double>(level, rng);
    test_type<Bf16>(level, rng);
    test_type<F16>(level, rng);
    test_out_type<float>(level, rng);
    test_out_type<double>(level, rng);
    test_out_type<Bf16>(level, rng);
  }
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("skinny_gemm: all tests passed\n");
  return 0;
}
