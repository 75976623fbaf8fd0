// The Embedding LoRA kernels of csrc/cuda/embedding.cu, executed in the CUDA emulation against
// exact (long double) references by the tolerance rule: every dtype pair (fp32 adapters over
// a half table included); repeated indices; out-of-range indices (zero rows, no out-of-bounds
// read); non-contiguous lora_A and a table row stride; ranks at the shared-memory limit;
// segment sums into A's columns and W's rows with padding (-1) entries skipped.
#include "cuda_emu.h"

namespace lora_ext {
namespace cuda {
namespace {
CUDA_EMU_DYNAMIC_SHARED(unsigned char, smem_raw)
}  // namespace
}  // namespace cuda
}  // namespace lora_ext

#include <algorithm>
#include <numeric>

#include "cuda/embedding.cu"
#include "tests/emu/emu_testing.h"

using namespace lora_ext;
using namespace emu_test;

static int failures = 0;

// forward: table [V, ldw] (rows of `out` used), A [r, V] stored with strides (sa0, sa1).
// identity: no index array, row t reads row t (the merged conv weight W + s·B·A), rows = V.
template <typename TW, typename TA>
static void test_forward(int64_t rows, int64_t V, int64_t out, int64_t r, bool strided, bool identity = false) {
  if (identity) rows = V;
  using Acc = AccOf<TW>;
  const int64_t ldw = strided ? out + 3 : out;
  const int64_t sa0 = strided ? 1 : V, sa1 = strided ? r : 1;  // strided: A stored transposed
  const std::vector<TW> W = random_vector<TW>(V * ldw, 11 + out);
  const std::vector<TA> A = random_vector<TA>(r * V, 12 + r);
  const std::vector<TA> bt = random_vector<TA>(r * out, 13 + out, 1.0 / std::sqrt(double(r)));
  std::vector<int64_t> idx(rows);
  Rng rng(rows + 7);
  for (int64_t t = 0; t < rows; ++t) idx[t] = static_cast<int64_t>(rng.next() % V);
  if (identity) {
    for (int64_t t = 0; t < rows; ++t) idx[t] = t;
  } else {
    if (rows > 2) idx[1] = idx[0];  // a repeated token
    if (rows > 3) idx[2] = V;       // out of range: a zero row
    if (rows > 4) idx[3] = -5;
  }
  const double s = 0.75;
  std::vector<TW> y(rows * out, Storage<TW>::to(99.0));
  const cudaError_t err = cuda::launch_embedding_lora_forward(
      dtype_of<TW>(), dtype_of<TA>(), identity ? nullptr : idx.data(), W.data(), ldw, A.data(), sa0, sa1, bt.data(), s,
      y.data(), rows, V, out, r, nullptr);
  CHECK(err == cudaSuccess, "forward launch: %s", cudaGetErrorString(err));
  ToleranceRule rule;
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t v = idx[t];
    for (int64_t o = 0; o < out; ++o) {
      const double got = Storage<TW>::from(y[t * out + o]);
      if (v < 0 || v >= V) {
        CHECK(got == 0.0, "row %lld with index %lld: y = %g, expected 0", (long long)t, (long long)v, got);
        continue;
      }
      long double exact = 0, magnitude = 0;
      Acc naive = 0;
      for (int64_t j = 0; j < r; ++j) {
        const double a = Storage<TA>::from(A[j * sa0 + v * sa1]), b = Storage<TA>::from(bt[j * out + o]);
        exact += static_cast<long double>(a) * b;
        magnitude += std::fabs(static_cast<long double>(a) * b);
        naive += static_cast<Acc>(a) * static_cast<Acc>(b);
      }
      const double w = Storage<TW>::from(W[v * ldw + o]);
      // PyTorch (PEFT): the adapter term rounded to the adapters' dtype, scaled, added, rounded
      const Acc term = static_cast<Acc>(Storage<TA>::from(Storage<TA>::to(naive)));
      const Acc naive_y = static_cast<Acc>(w) + static_cast<Acc>(Storage<TA>::from(Storage<TA>::to(static_cast<Acc>(s) * term)));
      rule.add(got, Storage<TW>::from(Storage<TW>::to(naive_y)), w + s * exact, std::fabs(w) + s * magnitude);
    }
  }
  CHECK(rule.holds(Storage<TW>::eps), "forward rows=%lld V=%lld out=%lld r=%lld: error %g, naive %g",
        (long long)rows, (long long)V, (long long)out, (long long)r, rule.ours, rule.naive);
}

// segment sums of src [count, cols] (TS) into dst (TD) laid out as A's columns ([cols, V]) or as
// W's rows ([V, cols]); sorted holds -1 entries (padding) first.
template <typename TS, typename TD>
static void test_segment_sums(int64_t count, int64_t V, int64_t cols, bool columns) {
  using Acc = AccOf<TD>;
  const std::vector<TS> src = random_vector<TS>(count * cols, 21 + cols);
  std::vector<int64_t> idx(count);
  Rng rng(count + 3);
  for (int64_t t = 0; t < count; ++t) {
    const uint64_t pick = rng.next() % static_cast<uint64_t>(V + 1);
    idx[t] = pick == static_cast<uint64_t>(V) ? -1 : static_cast<int64_t>(pick % std::max<int64_t>(1, V / 2));
  }
  std::vector<int64_t> perm(count);
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return idx[a] < idx[b]; });
  std::vector<int64_t> sorted(count);
  for (int64_t q = 0; q < count; ++q) sorted[q] = idx[perm[q]];
  const int64_t stride_v = columns ? 1 : cols, stride_c = columns ? V : 1;
  const double scale = 1.25;
  const TD sentinel = Storage<TD>::to(-7.0);
  std::vector<TD> dst(V * cols, sentinel);
  const cudaError_t err = cuda::launch_embedding_segment_sums(
      dtype_of<TS>(), dtype_of<TD>(), src.data(), cols, sorted.data(), perm.data(), count, V, scale,
      dst.data(), stride_v, stride_c, nullptr);
  CHECK(err == cudaSuccess, "segment sums launch: %s", cudaGetErrorString(err));
  ToleranceRule rule;
  for (int64_t v = 0; v < V; ++v) {
    const bool present = std::find(idx.begin(), idx.end(), v) != idx.end();
    for (int64_t c = 0; c < cols; ++c) {
      const TD got_raw = dst[v * stride_v + c * stride_c];
      if (!present) {
        CHECK(same_bits(&got_raw, &sentinel, sizeof(TD)), "index %lld absent but written", (long long)v);
        continue;
      }
      long double exact = 0, magnitude = 0;
      Acc naive = 0;
      for (int64_t t = 0; t < count; ++t) {
        if (idx[t] != v) continue;
        const double x = Storage<TS>::from(src[t * cols + c]);
        exact += x;
        magnitude += std::fabs(static_cast<long double>(x));
        naive = static_cast<Acc>(Storage<TD>::from(Storage<TD>::to(naive + static_cast<Acc>(x))));  // index_add_ in TD
      }
      rule.add(Storage<TD>::from(got_raw), Storage<TD>::from(Storage<TD>::to(static_cast<Acc>(scale) * naive)),
               scale * exact, scale * magnitude);
    }
  }
  CHECK(rule.holds(Storage<TD>::eps), "segment sums count=%lld V=%lld cols=%lld columns=%d: error %g, naive %g",
        (long long)count, (long long)V, (long long)cols, columns, rule.ours, rule.naive);
}

template <typename TW, typename TA>
static void test_pair() {
  for (int64_t rows : {1, 5, 37}) {
    for (int64_t r : {1, 4, 16}) {
      for (int64_t out : {1, 255, 257}) test_forward<TW, TA>(rows, 23, out, r, rows == 5);
    }
  }
  for (int64_t V : {1, 7, 40}) test_forward<TW, TA>(0, V, 45, 3, V == 7, /*identity=*/true);
  for (int64_t count : {1, 9, 64}) {
    for (int64_t cols : {1, 16, 300}) {
      test_segment_sums<TA, TA>(count, 10, cols, true);
      test_segment_sums<TW, TW>(count, 10, cols, false);
      // grad_A of half adapters: fp32 grad_z summed into the half columns
      if (!std::is_same<TW, float>::value && !is_double<TW>) test_segment_sums<float, TW>(count, 10, cols, true);
    }
  }
}

// Empty launches succeed and do nothing; a rank whose A column exceeds 48 KiB of shared memory
// is refused by CUDA's launch check; unsupported dtype pairs are refused.
static void test_limits() {
  CHECK(cuda::launch_embedding_lora_forward(cuda::DType::kFloat32, cuda::DType::kFloat32, nullptr, nullptr, 4, nullptr, 4, 1, nullptr, 1.0, nullptr, 0, 4, 4, 4, nullptr) == cudaSuccess, "empty forward");
  CHECK(cuda::launch_embedding_segment_sums(cuda::DType::kFloat32, cuda::DType::kFloat32, nullptr, 4, nullptr, nullptr, 0, 4, 1.0, nullptr, 1, 4, nullptr) == cudaSuccess, "empty sums");
  const int64_t r_max = cuda_emu::kMaxDynamicShared / sizeof(float);
  test_forward<float, float>(2, 3, 5, r_max, false);
  std::vector<float> W(3), A(r_max + 1), bt(r_max + 1), y(1);
  const int64_t idx = 0;
  const cudaError_t err = cuda::launch_embedding_lora_forward(cuda::DType::kFloat32, cuda::DType::kFloat32, &idx, W.data(), 1, A.data(), 1, 1, bt.data(), 1.0, y.data(), 1, 1, 1, r_max + 1, nullptr);
  CHECK(err == cudaErrorInvalidValue, "rank past 48 KiB: %s", cudaGetErrorString(err));
  CHECK(cudaGetLastError() == cudaSuccess, "launch errors are not sticky");
  CHECK(cuda::launch_embedding_lora_forward(cuda::DType::kFloat32, cuda::DType::kFloat16, &idx, W.data(), 1, A.data(), 1, 1, bt.data(), 1.0, y.data(), 1, 1, 1, 1, nullptr) == cudaErrorInvalidValue, "half adapters over fp32");
  CHECK(cuda::launch_embedding_segment_sums(cuda::DType::kFloat16, cuda::DType::kFloat32, W.data(), 1, &idx, &idx, 1, 1, 1.0, y.data(), 1, 1, nullptr) == cudaErrorInvalidValue, "half into fp32");
}

int main() {
  for (uint64_t seed : kScheduleSeeds) {
    cuda_emu::set_schedule_seed(seed);
    test_pair<float, float>();
    test_pair<double, double>();
    test_pair<__half, __half>();
    test_pair<__nv_bfloat16, __nv_bfloat16>();
    test_pair<__half, float>();
    test_pair<__nv_bfloat16, float>();
  }
  test_limits();
  if (failures == 0) std::printf("emu_embedding: all passed\n");
  return failures == 0 ? 0 : 1;
}
