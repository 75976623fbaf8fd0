// Helpers of the emulated CUDA tests (ctest -R emu): deterministic data, the storage types
// the launchers accept, a seed loop, and checks of launcher results.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include <sys/mman.h>

#include "cuda_emu.h"
#include "cuda/lora_linear.cuh"  // DType
#include "cuda_fp16.h"
#include "tests/check.h"

namespace emu_test {

// The schedules every test runs under: a missing barrier shows under some of them.
constexpr uint64_t kScheduleSeeds[] = {1, 2, 3};

struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
  double uniform() { return static_cast<double>(next() >> 11) / 9007199254740992.0 * 2.0 - 1.0; }
};

// Storage type <-> float, the way the kernels convert (checked bit for bit in emu_intrinsics).
template <typename T>
struct Storage;
template <>
struct Storage<float> {
  static float to(float v) { return v; }
  static double from(float v) { return v; }
  static constexpr double eps = 1.1920928955078125e-07;
};
template <>
struct Storage<double> {
  static double to(double v) { return v; }
  static double from(double v) { return v; }
  static constexpr double eps = 2.220446049250313e-16;
};
template <>
struct Storage<__half> {
  static __half to(double v) { return __float2half_rn(static_cast<float>(v)); }
  static double from(__half v) { return __half2float(v); }
  static constexpr double eps = 9.765625e-04;
};
template <>
struct Storage<__nv_bfloat16> {
  static __nv_bfloat16 to(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
  static double from(__nv_bfloat16 v) { return __bfloat162float(v); }
  static constexpr double eps = 7.8125e-03;
};

template <typename T>
std::vector<T> random_vector(size_t n, uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<T> v(n);
  for (auto& e : v) e = Storage<T>::to(rng.uniform() * scale);
  return v;
}

inline bool same_bits(const void* a, const void* b, size_t bytes) {
  return bytes == 0 || std::memcmp(a, b, bytes) == 0;
}

// A large, mostly untouched address range (pages appear on first touch): lets a test place
// data at element offsets beyond 2^31 without allocating gigabytes.
struct SparseBuffer {
  void* base = nullptr;
  size_t bytes = 0;
  explicit SparseBuffer(size_t n) : bytes(n) {
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
      std::fprintf(stderr, "cannot map %zu bytes\n", bytes);
      std::abort();
    }
  }
  ~SparseBuffer() { munmap(base, bytes); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(base);
  }
};

}  // namespace emu_test

namespace emu_test {

template <typename T>
constexpr bool is_double = std::is_same<T, double>::value;
// The accumulation type of a storage type: double for double, float otherwise.
template <typename T>
using AccOf = typename std::conditional<is_double<T>, double, float>::type;

template <typename T>
constexpr lora_ext::cuda::DType dtype_of() {
  return std::is_same<T, float>::value    ? lora_ext::cuda::DType::kFloat32
         : std::is_same<T, double>::value ? lora_ext::cuda::DType::kFloat64
         : std::is_same<T, __half>::value ? lora_ext::cuda::DType::kFloat16
                                          : lora_ext::cuda::DType::kBFloat16;
}

// The project's tolerance rule, natively: our largest error against an exact reference
// (long double) is at most twice that of a naive loop in the same precision (what PyTorch's
// own kernels would do), plus a floor of one rounding of the magnitude of the summed terms.
// The larger of a running error and a new one; NaN counts as infinitely wrong (std::max
// would drop it).
inline double worse(double running, double error) {
  return std::isnan(error) ? INFINITY : std::max(running, error);
}

struct ToleranceRule {
  double ours = 0, naive = 0, scale = 0;
  void add(double ours_value, double naive_value, long double exact, long double magnitude = 0) {
    ours = worse(ours, static_cast<double>(std::fabs(ours_value - exact)));
    naive = worse(naive, static_cast<double>(std::fabs(naive_value - exact)));
    scale = std::max(scale, static_cast<double>(std::max(std::fabs(exact), magnitude)));
  }
  bool holds(double eps) const { return ours <= 2 * naive + eps * scale + 1e-300; }
};

}  // namespace emu_test
