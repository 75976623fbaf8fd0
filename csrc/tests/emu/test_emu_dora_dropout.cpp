// The DoRA-with-dropout kernels of csrc/cuda/dora_dropout.cu, executed in the CUDA emulation:
// the dropped-element bits equal the host Philox batch bit for bit (rows that start inside a
// Philox group, words cut by the row end); the forward's hd and y and the backward's
// corrected grad_x follow exact (long double) references of PEFT's dense formulas by the
// tolerance rule, for every dtype, with and without bias, at dropout 0.05, 0.5 and 0.9 (lists
// that fill a whole chunk), across the 256-element chunks, the 512-column blocks, rows not a
// multiple of 8, the grid-stride loops; kept elements of grad_x are left bit for bit.
#include "cuda/dora_dropout.cu"
#include "tests/emu/emu_testing.h"

using namespace lora_ext;
using namespace emu_test;

static int failures = 0;

// Host reference of the dropped elements from the batched Philox: dropped[t * in + k].
static std::vector<uint8_t> host_dropped(int64_t rows, int64_t in, const core::DropoutParams& p) {
  const int64_t numel = rows * in, groups = (numel + 3) / 4;
  std::vector<uint8_t> dropped(numel);
  for (int64_t g0 = 0; g0 < groups; g0 += core::kDropoutBatch) {
    unsigned keep[core::kDropoutBatch];
    core::dropout_keep_bits_batch(p.seed, p.offset, p.threshold, g0, keep);
    for (int j = 0; j < core::kDropoutBatch && g0 + j < groups; ++j) {
      for (int lane = 0; lane < 4 && (g0 + j) * 4 + lane < numel; ++lane) {
        dropped[(g0 + j) * 4 + lane] = !((keep[j] >> lane) & 1u);
      }
    }
  }
  return dropped;
}

static std::vector<uint32_t> launch_bits(int64_t rows, int64_t in, const core::DropoutParams& params) {
  const int64_t words = cuda::dora_dropped_words(in);
  std::vector<uint32_t> bits(std::max<int64_t>(1, rows * words), 0xDEADBEEFu);
  const cudaError_t err = cuda::launch_dora_dropped_bits(bits.data(), rows, in, params, nullptr);
  CHECK(err == cudaSuccess, "bits launch: %s", cudaGetErrorString(err));
  return bits;
}

static void test_bits(int64_t rows, int64_t in, double p) {
  const auto params = core::make_dropout_params(p, 0x5EEDull * (rows + 3 * in), 11 * in + 1);
  const std::vector<uint32_t> bits = launch_bits(rows, in, params);
  const std::vector<uint8_t> want = host_dropped(rows, in, params);
  const int64_t words = cuda::dora_dropped_words(in);
  int64_t wrong = 0;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t k = 0; k < words * 32; ++k) {
      const bool bit = (bits[t * words + k / 32] >> (k % 32)) & 1u;
      wrong += bit != (k < in && want[t * in + k]);  // bits past the row end stay clear
    }
  }
  CHECK(wrong == 0, "bits rows=%lld in=%lld p=%g: %lld bits differ", (long long)rows, (long long)in, p,
        (long long)wrong);
}

template <typename T>
static void test_outputs(int64_t rows, int64_t in, int64_t out, double p, bool with_bias) {
  using Acc = AccOf<T>;
  const auto params = core::make_dropout_params(p, 0xD0A11ull + rows * 7 + in, out);
  const double q = 1.0 - p;
  const std::vector<T> x = random_vector<T>(rows * in, 1 + rows + in);
  const std::vector<T> wt = random_vector<T>(in * out, 2 + in + out);
  const std::vector<T> low_rank = random_vector<T>(rows * out, 3 + out, 0.5);
  const std::vector<T> bias = random_vector<T>(out, 4 + out);
  std::vector<Acc> gm1(out);
  Rng rng(5 + out);
  for (auto& v : gm1) v = static_cast<Acc>(0.3 * rng.uniform());
  const std::vector<uint8_t> dropped = host_dropped(rows, in, params);
  // base = x·Wᵀ as cuBLAS returns it: the exact product rounded to T.
  std::vector<T> base(rows * out);
  std::vector<long double> exact_base(rows * out), exact_dw(rows * out), magnitude(rows * out);
  std::vector<Acc> naive_dw(rows * out);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      long double b = 0, d = 0, mag = 0;
      Acc dn = 0;
      for (int64_t k = 0; k < in; ++k) {
        const long double prod = static_cast<long double>(Storage<T>::from(x[t * in + k])) *
                                 Storage<T>::from(wt[k * out + o]);
        b += prod;
        mag += std::fabs(prod);
        if (!dropped[t * in + k]) {
          d += prod / q;
          // PyTorch's dense path: drop(x) rounded to T, then a GEMM accumulating in Acc.
          const Acc dk = static_cast<Acc>(Storage<T>::from(Storage<T>::to(Storage<T>::from(x[t * in + k]) / q)));
          dn += dk * static_cast<Acc>(Storage<T>::from(wt[k * out + o]));
        }
      }
      base[t * out + o] = Storage<T>::to(static_cast<double>(b));
      exact_base[t * out + o] = b;
      exact_dw[t * out + o] = d;
      naive_dw[t * out + o] = dn;
      magnitude[t * out + o] = mag / q;
    }
  }
  std::vector<T> y = base, hd(rows * out, Storage<T>::to(-7.0));
  const cudaError_t err = cuda::launch_dora_dropout_outputs(
      dtype_of<T>(), x.data(), wt.data(), y.data(), low_rank.data(), gm1.data(),
      with_bias ? bias.data() : nullptr, hd.data(), launch_bits(rows, in, params).data(), rows, in, out, q,
      nullptr);
  CHECK(err == cudaSuccess, "outputs launch: %s", cudaGetErrorString(err));
  ToleranceRule rule_hd, rule_y;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      const int64_t i = t * out + o;
      const long double lr = Storage<T>::from(low_rank[i]), bv = with_bias ? Storage<T>::from(bias[o]) : 0.0;
      const long double hd_exact = exact_dw[i] + lr;
      const long double y_exact = exact_base[i] + lr + gm1[o] * hd_exact + bv;
      // PEFT in T: each module's output rounded to T, then the sums.
      const Acc hd_naive = static_cast<Acc>(Storage<T>::from(Storage<T>::to(
          Storage<T>::from(Storage<T>::to(naive_dw[i])) + static_cast<Acc>(lr))));
      const Acc y_naive = static_cast<Acc>(Storage<T>::from(Storage<T>::to(
          static_cast<Acc>(Storage<T>::from(base[i])) + static_cast<Acc>(lr) + gm1[o] * hd_naive +
          static_cast<Acc>(bv))));
      rule_hd.add(Storage<T>::from(hd[i]), hd_naive, hd_exact, magnitude[i] + std::fabs(lr));
      rule_y.add(Storage<T>::from(y[i]), y_naive, y_exact,
                 magnitude[i] * (1 + std::fabs(gm1[o])) + 2 * std::fabs(lr) + std::fabs(bv));
    }
  }
  CHECK(rule_hd.holds(Storage<T>::eps), "hd rows=%lld in=%lld out=%lld p=%g sizeof=%zu: error %g, naive %g",
        (long long)rows, (long long)in, (long long)out, p, sizeof(T), rule_hd.ours, rule_hd.naive);
  CHECK(rule_y.holds(Storage<T>::eps), "y rows=%lld in=%lld out=%lld p=%g bias=%d sizeof=%zu: error %g, naive %g",
        (long long)rows, (long long)in, (long long)out, p, with_bias, sizeof(T), rule_y.ours, rule_y.naive);
}

template <typename T>
static void test_dots(int64_t rows, int64_t in, int64_t out, double p) {
  using Acc = AccOf<T>;
  const auto params = core::make_dropout_params(p, 0xD075ull + rows + 5 * in, 3 * out + 2);
  const double factor = 1.0 / (1.0 - p);
  const std::vector<T> gy = random_vector<T>(rows * out, 6 + rows + out);
  const std::vector<T> wt = random_vector<T>(in * out, 7 + in + out);
  const std::vector<T> grad0 = random_vector<T>(rows * in, 8 + rows + in, 4.0);
  const std::vector<uint8_t> dropped = host_dropped(rows, in, params);
  std::vector<T> grad = grad0;
  const cudaError_t err = cuda::launch_dora_subtract_dropped_dots(
      dtype_of<T>(), grad.data(), gy.data(), wt.data(), launch_bits(rows, in, params).data(), rows, in, out,
      factor, nullptr);
  CHECK(err == cudaSuccess, "dots launch: %s", cudaGetErrorString(err));
  ToleranceRule rule;
  int64_t kept_changed = 0;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t k = 0; k < in; ++k) {
      const int64_t i = t * in + k;
      if (!dropped[i]) {
        kept_changed += !same_bits(&grad[i], &grad0[i], sizeof(T));
        continue;
      }
      long double dot = 0, mag = 0;
      Acc naive = 0;
      for (int64_t o = 0; o < out; ++o) {
        const long double prod = static_cast<long double>(Storage<T>::from(gy[t * out + o])) *
                                 Storage<T>::from(wt[k * out + o]);
        dot += prod;
        mag += std::fabs(prod);
        naive += static_cast<Acc>(Storage<T>::from(gy[t * out + o])) * static_cast<Acc>(Storage<T>::from(wt[k * out + o]));
      }
      const long double e = Storage<T>::from(grad0[i]);
      const Acc naive_value = static_cast<Acc>(Storage<T>::from(Storage<T>::to(
          static_cast<Acc>(e) - static_cast<Acc>(factor) * static_cast<Acc>(Storage<T>::from(Storage<T>::to(naive))))));
      rule.add(Storage<T>::from(grad[i]), naive_value, e - factor * dot, std::fabs(e) + factor * mag);
    }
  }
  CHECK(kept_changed == 0, "dots: %lld kept elements changed", (long long)kept_changed);
  CHECK(rule.holds(Storage<T>::eps), "dots rows=%lld in=%lld out=%lld p=%g sizeof=%zu: error %g, naive %g",
        (long long)rows, (long long)in, (long long)out, p, sizeof(T), rule.ours, rule.naive);
}

template <typename T>
static void test_dtype() {
  for (double p : {0.05, 0.5, 0.9}) {
    test_outputs<T>(11, 37, 45, p, true);
    test_outputs<T>(8, 300, 520, p, false);  // a second chunk of 256 and a second column block
    test_dots<T>(11, 37, 45, p);
    test_dots<T>(9, 70, 1100, p);            // rows past one block, words past one warp's 32
  }
  test_outputs<T>(1, 1, 1, 0.5, true);
  test_dots<T>(3, 1, 1, 0.5);
  test_dots<T>(2, 1030, 3, 0.3);             // a row of 33 words: two rounds of 32
}

static void test_empty_and_limits() {
  CHECK(cuda::launch_dora_dropped_bits(nullptr, 0, 5, core::make_dropout_params(0.5, 1, 0), nullptr) ==
            cudaSuccess, "no rows");
  CHECK(cuda::launch_dora_dropout_outputs(cuda::DType::kFloat32, nullptr, nullptr, nullptr, nullptr, nullptr,
                                          nullptr, nullptr, nullptr, 0, 4, 4, 0.5, nullptr) == cudaSuccess,
        "outputs without rows");
  CHECK(cuda::launch_dora_subtract_dropped_dots(cuda::DType::kFloat32, nullptr, nullptr, nullptr, nullptr, 4, 0,
                                                4, 2.0, nullptr) == cudaSuccess, "dots without columns");
  // in = 0 with rows: no dropped element, so y = base + low_rank + (g - 1)·low_rank.
  test_outputs<float>(3, 0, 5, 0.5, true);
  // Past the grid caps: 8192 blocks of dots (rows of 8 warps) and 65535 row blocks of outputs.
  cuda_emu::stats() = cuda_emu::Stats{};
  test_dots<float>(8192 * 8 + 9, 2, 1, 0.5);
  CHECK(cuda_emu::stats().max_grid[0] == 8192u, "dots grid.x %u", cuda_emu::stats().max_grid[0]);
  test_outputs<float>(65535 * 8 + 9, 1, 1, 0.5, false);
  CHECK(cuda_emu::stats().max_grid[1] == 65535u, "outputs grid.y %u", cuda_emu::stats().max_grid[1]);
}

int main() {
  for (int64_t rows : {1, 3, 8}) {
    for (int64_t in : {1, 5, 31, 32, 33, 64, 101}) {
      for (double p : {0.05, 0.5, 0.95}) test_bits(rows, in, p);
    }
  }
  test_bits(70000, 3, 0.5);  // past the grid-stride cap of 8192 blocks of 256 words
  for (uint64_t seed : kScheduleSeeds) {
    cuda_emu::set_schedule_seed(seed);
    test_dtype<float>();
    test_dtype<double>();
    test_dtype<__half>();
    test_dtype<__nv_bfloat16>();
  }
  test_empty_and_limits();
  if (failures == 0) std::printf("emu_dora_dropout: all passed\n");
  return failures == 0 ? 0 : 1;
}
