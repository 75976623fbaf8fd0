// Native unit tests of csrc/cpu/isa.h: LORA_EXT_CPU_CAPABILITY lowers the level, never raises
// it above the CPU's, and a value that names no level is an error naming the variable.
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "cpu/isa.h"
#include "tests/check.h"

using lora_ext::cpu::Isa;
using lora_ext::cpu::resolve_isa;

static int failures = 0;

// A vectorisable body: every clone must give the dispatcher's bits.
static inline __attribute__((always_inline)) float scaled_sum(const float* x, int n, float s) {
  float total = 0.0f;
  for (int i = 0; i < n; ++i) total += x[i] * s;
  return total;
}
LORA_EXT_ISA_CLONES(float, cloned_sum, (const float* x, int n, float s), (x, n, s), scaled_sum)

static void test_unset_is_best() {
  const Isa levels[] = {Isa::kDefault, Isa::kAvx2, Isa::kAvx512};
  for (Isa best : levels) {
    CHECK(resolve_isa(nullptr, best) == best, "unset on %s", lora_ext::cpu::isa_name(best));
    CHECK(resolve_isa("", best) == best, "empty on %s", lora_ext::cpu::isa_name(best));
  }
}

static void test_lowers_never_raises() {
  CHECK(resolve_isa("avx2", Isa::kAvx512) == Isa::kAvx2, "avx2 on an AVX-512 CPU");
  CHECK(resolve_isa("default", Isa::kAvx512) == Isa::kDefault, "default on an AVX-512 CPU");
  CHECK(resolve_isa("avx512", Isa::kAvx512) == Isa::kAvx512, "avx512 on an AVX-512 CPU");
  CHECK(resolve_isa("avx512", Isa::kAvx2) == Isa::kAvx2, "avx512 on an AVX2 CPU");
  CHECK(resolve_isa("avx2", Isa::kDefault) == Isa::kDefault, "avx2 on a baseline CPU");
}

static void test_bad_value_names_the_variable() {
  const char* bad[] = {"avx", "AVX2", "avx512bf16", " avx2", "sse4"};
  for (const char* value : bad) {
    bool threw = false;
    try {
      resolve_isa(value, Isa::kAvx512);
    } catch (const std::invalid_argument& error) {
      threw = std::strstr(error.what(), "LORA_EXT_CPU_CAPABILITY") != nullptr &&
              std::strstr(error.what(), value) != nullptr &&
              std::strstr(error.what(), "avx512, avx2, default") != nullptr;
    }
    CHECK(threw, "'%s' must raise invalid_argument naming the variable, value and levels", value);
  }
}

static void test_clones_run_one_body() {
  using lora_ext::cpu::cpu_best_isa;
  CHECK(lora_ext::cpu::cpu_isa() <= cpu_best_isa(), "effective level above the CPU's");
  float x[37];
  for (int i = 0; i < 37; ++i) x[i] = 0.1f * static_cast<float>(i) - 1.3f;
  const float expected = scaled_sum(x, 37, 0.7f);
  CHECK(cloned_sum(x, 37, 0.7f) == expected, "dispatcher");
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // Only the clones this CPU can execute.
  CHECK(cloned_sum_default(x, 37, 0.7f) == expected, "default clone");
  if (cpu_best_isa() >= Isa::kAvx2) CHECK(cloned_sum_avx2(x, 37, 0.7f) == expected, "avx2 clone");
  if (cpu_best_isa() >= Isa::kAvx512) {
    CHECK(cloned_sum_avx512(x, 37, 0.7f) == expected, "avx512 clone");
  }
#endif
}

int main() {
  test_unset_is_best();
  test_lowers_never_raises();
  test_bad_value_names_the_variable();
  test_clones_run_one_body();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("isa: all tests passed\n");
  return 0;
}
