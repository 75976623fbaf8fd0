// The dropout kernels of csrc/cuda/lora_linear.cu, executed in the CUDA emulation: the keep
// mask equals the host Philox batch bit for bit (the device path computes the high words
// with __umulhi, the batch with 64-bit products), and drop(x) and the in-place masked
// gradient equal the core's group function bit for bit, for every dtype, every tail and
// across the grid-stride cap.
#include "cuda/lora_linear.cu"
#include "tests/emu/emu_testing.h"

using namespace lora_ext;
using emu_test::Storage;

static int failures = 0;

// Host reference mask from the batched Philox (64-bit products, no __umulhi).
static std::vector<uint8_t> host_mask(int64_t numel, const core::DropoutParams& p) {
  std::vector<uint8_t> mask(numel);
  const int64_t groups = (numel + 3) / 4;
  for (int64_t g0 = 0; g0 < groups; g0 += core::kDropoutBatch) {
    unsigned keep[core::kDropoutBatch];
    core::dropout_keep_bits_batch(p.seed, p.offset, p.threshold, g0, keep);
    for (int j = 0; j < core::kDropoutBatch && g0 + j < groups; ++j) {
      for (int lane = 0; lane < 4 && (g0 + j) * 4 + lane < numel; ++lane) {
        mask[(g0 + j) * 4 + lane] = (keep[j] >> lane) & 1u;
      }
    }
  }
  return mask;
}

static void test_mask(int64_t numel, double p, int64_t seed, int64_t offset) {
  const core::DropoutParams params = core::make_dropout_params(p, seed, offset);
  const std::vector<uint8_t> want = host_mask(numel, params);
  // bool buffer of exactly numel elements: an overrun is an ASan error.
  bool* mask = numel > 0 ? new bool[numel] : nullptr;
  for (int64_t i = 0; i < numel; ++i) mask[i] = (i % 3) == 0;
  const cudaError_t err = cuda::launch_dropout_mask(mask, numel, params, nullptr);
  CHECK(err == cudaSuccess, "mask launch: %s", cudaGetErrorString(err));
  int64_t wrong = 0;
  for (int64_t i = 0; i < numel; ++i) wrong += static_cast<uint8_t>(mask[i]) != want[i];
  CHECK(wrong == 0, "mask numel=%lld p=%g: %lld elements differ", (long long)numel, p, (long long)wrong);
  delete[] mask;
}

template <typename T>
static void test_apply(int64_t numel, double p, bool with_dropped, bool with_grad) {
  using Acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  const core::DropoutParams params = core::make_dropout_params(p, 0x1234567890ll + numel, 77);
  const std::vector<T> x = emu_test::random_vector<T>(numel, 1 + numel);
  const std::vector<T> grad0 = emu_test::random_vector<T>(numel, 2 + numel, 3.0);
  std::vector<T> dropped(numel, Storage<T>::to(-5.0)), grad = grad0;
  std::vector<T> want_dropped = dropped, want_grad = grad0;
  const int64_t groups = (numel + 3) / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const unsigned keep = core::dropout_keep_bits(params.seed, params.offset, params.threshold, g);
    core::dropout_apply_group(
        keep, static_cast<uint64_t>(g), numel, static_cast<Acc>(params.scale), x.data(),
        with_dropped ? want_dropped.data() : static_cast<T*>(nullptr),
        with_grad ? want_grad.data() : static_cast<T*>(nullptr),
        [](T v) { return static_cast<Acc>(Storage<T>::from(v)); },
        [](Acc v) { return Storage<T>::to(v); });
  }
  const cuda::DType dtype = std::is_same<T, float>::value    ? cuda::DType::kFloat32
                            : std::is_same<T, double>::value ? cuda::DType::kFloat64
                            : std::is_same<T, __half>::value ? cuda::DType::kFloat16
                                                             : cuda::DType::kBFloat16;
  const cudaError_t err = cuda::launch_dropout_apply(
      dtype, x.data(), with_dropped ? dropped.data() : nullptr, with_grad ? grad.data() : nullptr,
      numel, params, nullptr);
  CHECK(err == cudaSuccess, "apply launch: %s", cudaGetErrorString(err));
  CHECK(emu_test::same_bits(dropped.data(), want_dropped.data(), numel * sizeof(T)),
        "drop(x) bits, numel=%lld sizeof=%zu", (long long)numel, sizeof(T));
  CHECK(emu_test::same_bits(grad.data(), want_grad.data(), numel * sizeof(T)),
        "masked grad bits, numel=%lld sizeof=%zu", (long long)numel, sizeof(T));
}

template <typename T>
static void test_apply_all_sizes() {
  for (int64_t numel : {0, 1, 2, 3, 4, 5, 7, 1023, 1024, 1025, 4 * 256 + 3, 4 * 256 * 3 + 1}) {
    test_apply<T>(numel, 0.3, true, false);
    test_apply<T>(numel, 0.05, false, true);
    test_apply<T>(numel, 0.5, true, true);
  }
}

// drop(x)[t, k] as the contract defines it, exactly (long double), from the host Philox.
template <typename T>
static std::vector<long double> dropped_exact(const std::vector<T>& x, const core::DropoutParams& p) {
  const std::vector<uint8_t> mask = host_mask(static_cast<int64_t>(x.size()), p);
  std::vector<long double> d(x.size());
  for (size_t i = 0; i < x.size(); ++i) d[i] = mask[i] ? Storage<T>::from(x[i]) * static_cast<long double>(p.scale) : 0.0L;
  return d;
}

// The fused shrink z = drop(x)·Aᵀ against the exact product, by the tolerance rule; the naive
// same-precision loop first rounds drop(x) to the storage type, as the unfused path stores it.
template <typename T>
static void test_fused_shrink(int64_t rows, int64_t in, int64_t r, double p) {
  using Acc = emu_test::AccOf<T>;
  const core::DropoutParams params = core::make_dropout_params(p, 1000 + rows * in, 3);
  const std::vector<T> x = emu_test::random_vector<T>(rows * in, 7 + in);
  const std::vector<T> A = emu_test::random_vector<T>(r * in, 8 + r);
  std::vector<T> z(rows * r, Storage<T>::to(55.0));
  const cudaError_t err = cuda::launch_lora_shrink_dropout(emu_test::dtype_of<T>(), x.data(), A.data(),
                                                           z.data(), rows, in, r, params, nullptr);
  CHECK(err == cudaSuccess, "fused shrink launch: %s", cudaGetErrorString(err));
  const std::vector<long double> d = dropped_exact(x, params);
  emu_test::ToleranceRule rule;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t j = 0; j < r; ++j) {
      long double exact = 0, magnitude = 0;
      Acc naive = 0;
      for (int64_t k = 0; k < in; ++k) {
        const long double a = Storage<T>::from(A[j * in + k]);
        exact += d[t * in + k] * a;
        magnitude += std::fabs(d[t * in + k] * a);
        naive += static_cast<Acc>(Storage<T>::from(Storage<T>::to(static_cast<double>(d[t * in + k])))) * static_cast<Acc>(a);
      }
      rule.add(Storage<T>::from(z[t * r + j]), Storage<T>::from(Storage<T>::to(naive)), exact, magnitude);
    }
  }
  CHECK(rule.holds(Storage<T>::eps), "fused shrink rows=%lld in=%lld r=%lld p=%g sizeof=%zu: error %g, naive %g",
        (long long)rows, (long long)in, (long long)r, p, sizeof(T), rule.ours, rule.naive);
}

// The fused weight gradient grad_A = grad_zᵀ·drop(x), likewise.
template <typename T>
static void test_fused_grad_a(int64_t rows, int64_t in, int64_t r, double p) {
  using Acc = emu_test::AccOf<T>;
  const core::DropoutParams params = core::make_dropout_params(p, 2000 + rows + in, 9);
  const std::vector<T> x = emu_test::random_vector<T>(rows * in, 11 + in);
  const std::vector<T> grad_z = emu_test::random_vector<T>(rows * r, 12 + r);
  std::vector<T> grad_A(r * in, Storage<T>::to(66.0));
  std::vector<Acc> scratch(cuda::lora_grad_a_scratch(rows, in, r), Acc(-9));
  const cudaError_t err = cuda::launch_lora_grad_a_dropout(emu_test::dtype_of<T>(), grad_z.data(), x.data(),
                                                           grad_A.data(), scratch.data(), rows, in, r, params,
                                                           nullptr);
  CHECK(err == cudaSuccess, "fused grad_A launch: %s", cudaGetErrorString(err));
  const std::vector<long double> d = dropped_exact(x, params);
  emu_test::ToleranceRule rule;
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = 0; k < in; ++k) {
      long double exact = 0, magnitude = 0;
      Acc naive = 0;
      for (int64_t t = 0; t < rows; ++t) {
        const long double g = Storage<T>::from(grad_z[t * r + j]);
        exact += g * d[t * in + k];
        magnitude += std::fabs(g * d[t * in + k]);
        naive += static_cast<Acc>(g) * static_cast<Acc>(Storage<T>::from(Storage<T>::to(static_cast<double>(d[t * in + k]))));
      }
      rule.add(Storage<T>::from(grad_A[j * in + k]), Storage<T>::from(Storage<T>::to(naive)), exact, magnitude);
    }
  }
  CHECK(rule.holds(Storage<T>::eps), "fused grad_A rows=%lld in=%lld r=%lld p=%g sizeof=%zu: error %g, naive %g",
        (long long)rows, (long long)in, (long long)r, p, sizeof(T), rule.ours, rule.naive);
}

template <typename T>
static void test_fused_all_shapes() {
  // in not a multiple of 4: Philox groups straddle rows; r around the 16-wide chunks.
  for (int64_t in : {1, 3, 4, 37, 130}) {
    for (int64_t r : {1, 8, 16, 17, 33}) {
      test_fused_shrink<T>(9, in, r, 0.1);
      test_fused_grad_a<T>(9, in, r, 0.1);
    }
  }
  test_fused_shrink<T>(0, 8, 4, 0.1);
  test_fused_grad_a<T>(0, 8, 4, 0.1);  // no rows: grad_A is zero
  test_fused_shrink<T>(5, 0, 4, 0.1);  // no features: z is zero
  test_fused_shrink<T>(70, 64, 16, 0.5);
  test_fused_grad_a<T>(600, 33, 16, 0.05);  // several row tiles
}

int main() {
  for (uint64_t seed : emu_test::kScheduleSeeds) {
    cuda_emu::set_schedule_seed(seed);
    for (int64_t numel : {0, 1, 3, 4, 5, 255, 1024, 1027, 4099}) {
      test_mask(numel, 0.25, 42, 0);
      test_mask(numel, 0.0, 9, 3);
    }
    // The high words of seed and offset reach the counter and the key.
    test_mask(777, 0.5, 0x7000000000000001ll, 0x500000000ll);
    test_apply_all_sizes<float>();
    test_apply_all_sizes<double>();
    test_apply_all_sizes<__half>();
    test_apply_all_sizes<__nv_bfloat16>();
    test_fused_all_shapes<float>();
    test_fused_all_shapes<double>();
    test_fused_all_shapes<__half>();
    test_fused_all_shapes<__nv_bfloat16>();
  }
  // The row tiles of the weight gradient stop at kGradAMaxTiles: more rows per tile beyond.
  test_fused_grad_a<float>(256 * 64 + 300, 5, 3, 0.2);
  test_fused_shrink<float>(int64_t{8} * cuda::kMaxGridStrideBlocks + 13, 3, 2, 0.2);  // past the grid cap
  // The grid is capped and a grid-stride loop covers the rest: one launch past the cap.
  cuda_emu::stats() = cuda_emu::Stats{};
  const int64_t past_cap = int64_t{4} * 256 * cuda::kMaxGridStrideBlocks + 4 * 300 + 2;
  test_mask(past_cap, 0.1, 5, 6);
  CHECK(cuda_emu::stats().max_grid[0] == cuda::kMaxGridStrideBlocks, "grid %u, cap %u",
        cuda_emu::stats().max_grid[0], cuda::kMaxGridStrideBlocks);
  // CUDA's rejection of an invalid configuration comes back as its error code.
  if (failures == 0) std::printf("emu_lora_linear: all passed\n");
  return failures == 0 ? 0 : 1;
}
