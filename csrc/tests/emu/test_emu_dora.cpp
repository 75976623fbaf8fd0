// The DoRA norm kernels of csrc/cuda/dora.cu, executed in the CUDA emulation: row and column
// sums of (M + P·Q)² against exact (long double) references by the tolerance rule, for every
// dtype, with small, dominant and cancelling adapters, tile tails in both directions, a
// leading dimension wider than the row, rank 0 and ranks across the 16-wide chunks, empty
// inputs, and the grid.y limit of the row-tile grid.
#include "cuda/dora.cu"
#include "tests/emu/emu_testing.h"

using namespace lora_ext;
using namespace emu_test;

static int failures = 0;

enum class Adapter { kSmall, kDominant, kCancelling };

template <typename T>
static void test_sums(int64_t rows, int64_t n, int64_t ldm, int rank, Adapter kind, bool column_sums) {
  using Acc = AccOf<T>;
  Rng rng(rows * 131 + n * 7 + rank);
  std::vector<Acc> p(rows * rank), q(static_cast<size_t>(rank) * n);
  const double adapter_scale = kind == Adapter::kSmall ? 1e-3 : kind == Adapter::kDominant ? 30.0 : 1.0;
  for (auto& v : p) v = static_cast<Acc>(rng.uniform() * adapter_scale);
  for (auto& v : q) v = static_cast<Acc>(rng.uniform());
  std::vector<T> m(rows * ldm, Storage<T>::to(77.0));  // the gap past n must not be read
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double v = rng.uniform();
      if (kind == Adapter::kCancelling) {  // M = -P·Q + small: the sum is a small difference
        double pq = 0;
        for (int k = 0; k < rank; ++k) pq += double(p[i * rank + k]) * q[k * n + j];
        v = -pq + 1e-3 * v;
      }
      m[i * ldm + j] = Storage<T>::to(v);
    }
  }
  const int64_t len = column_sums ? n : rows;
  std::vector<Acc> scratch(std::max<int64_t>(1, cuda::dora_partial_count(rows, n, column_sums) * len), Acc(-1));
  std::vector<Acc> sums(len, Acc(-1));
  const cudaError_t err = cuda::launch_dora_sum_squares(dtype_of<T>(), m.data(), rows, n, ldm, p.data(),
                                                        q.data(), rank, column_sums, scratch.data(),
                                                        sums.data(), nullptr);
  CHECK(err == cudaSuccess, "launch: %s", cudaGetErrorString(err));
  std::vector<long double> exact(len, 0), magnitude(len, 0);
  std::vector<Acc> naive(len, 0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      long double v = Storage<T>::from(m[i * ldm + j]);
      Acc vn = static_cast<Acc>(Storage<T>::from(m[i * ldm + j]));
      long double mag = std::fabs(v);
      for (int k = 0; k < rank; ++k) {
        v += static_cast<long double>(p[i * rank + k]) * q[k * n + j];
        vn += p[i * rank + k] * q[k * n + j];
        mag += std::fabs(static_cast<long double>(p[i * rank + k]) * q[k * n + j]);
      }
      const int64_t o = column_sums ? j : i;
      exact[o] += v * v;
      // A rounding of each summed term (|v| up to mag) costs about 2·mag·|v|·eps.
      magnitude[o] += mag * mag;
      naive[o] += vn * vn;
    }
  }
  ToleranceRule rule;
  for (int64_t o = 0; o < len; ++o) rule.add(sums[o], naive[o], exact[o], magnitude[o]);
  CHECK(rule.holds(Storage<Acc>::eps), "%s sums rows=%lld n=%lld ldm=%lld rank=%d kind=%d sizeof=%zu: error %g, naive %g",
        column_sums ? "column" : "row", (long long)rows, (long long)n, (long long)ldm, rank,
        static_cast<int>(kind), sizeof(T), rule.ours, rule.naive);
}

template <typename T>
static void test_dtype() {
  for (bool column_sums : {false, true}) {
    for (Adapter kind : {Adapter::kSmall, Adapter::kDominant, Adapter::kCancelling}) {
      for (int rank : {0, 1, 16, 17, 40}) test_sums<T>(33, 129, 129, rank, kind, column_sums);
    }
    // Tiles: rows around 32 per block, columns around 128 per step and 512 per block.
    for (int64_t rows : {1, 31, 32, 70}) {
      for (int64_t n : {1, 127, 128, 513, 1100}) test_sums<T>(rows, n, n, 8, Adapter::kSmall, column_sums);
    }
    test_sums<T>(9, 200, 263, 5, Adapter::kDominant, column_sums);  // strided rows
  }
}

static void test_empty_and_limits() {
  // rows or n zero: the sums along the empty direction are zero.
  std::vector<float> sums(5, -1.0f), scratch(8, -1.0f);
  CHECK(cuda::launch_dora_sum_squares(cuda::DType::kFloat32, nullptr, 0, 5, 5, nullptr, nullptr, 3, true,
                                      scratch.data(), sums.data(), nullptr) == cudaSuccess, "rows 0");
  for (float s : sums) CHECK(s == 0.0f, "column sums of an empty M are zero");
  CHECK(cuda::launch_dora_sum_squares(cuda::DType::kFloat32, nullptr, 0, 0, 0, nullptr, nullptr, 3, false,
                                      scratch.data(), sums.data(), nullptr) == cudaSuccess, "nothing to do");
  // Row tiles fill grid.y up to CUDA's 65535; one more tile is refused before launching.
  const int64_t rows_at_limit = int64_t{65535} * cuda::kDoraBlockRows;
  cuda_emu::stats() = cuda_emu::Stats{};
  test_sums<float>(rows_at_limit, 1, 1, 1, Adapter::kSmall, true);  // column sums: fewer switches
  CHECK(cuda_emu::stats().max_grid[1] == 65535u, "grid.y %u", cuda_emu::stats().max_grid[1]);
  CHECK(cuda::launch_dora_sum_squares(cuda::DType::kFloat32, nullptr, rows_at_limit + 1, 1, 1, nullptr,
                                      nullptr, 1, false, nullptr, nullptr, nullptr) == cudaErrorInvalidConfiguration,
        "grid.y past 65535");
}

int main() {
  for (uint64_t seed : kScheduleSeeds) {
    cuda_emu::set_schedule_seed(seed);
    test_dtype<float>();
    test_dtype<double>();
    test_dtype<__half>();
    test_dtype<__nv_bfloat16>();
  }
  test_empty_and_limits();
  if (failures == 0) std::printf("emu_dora: all passed\n");
  return failures == 0 ? 0 : 1;
}
