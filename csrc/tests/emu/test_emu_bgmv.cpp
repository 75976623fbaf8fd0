// The BGMV/SGMV kernels of csrc/cuda/bgmv.cu, executed in the CUDA emulation against exact
// (double) references by the tolerance rule: every dtype; rows without an adapter (-1) and
// out-of-range indices; SGMV with empty segments and rows outside every segment; ranks that
// do and do not fill a warp group; expand's dynamic shared memory at CUDA's 48 KiB limit;
// and adapters placed beyond 2^31 elements of the stacked weights.
#include "cuda_emu.h"

namespace lora_ext {
namespace cuda {
namespace {
CUDA_EMU_DYNAMIC_SHARED(unsigned char, smem_raw)
}  // namespace
}  // namespace cuda
}  // namespace lora_ext

#include "cuda/bgmv.cu"
#include "tests/emu/emu_testing.h"

using namespace lora_ext;
using namespace emu_test;

static int failures = 0;

struct Routing {
  std::vector<int64_t> idx, seg_starts, seg_adapter;
  bool sgmv = false;
  int64_t num_adapters = 0;
  cuda::RowAdapters view() const {
    cuda::RowAdapters a;
    a.idx = sgmv ? nullptr : idx.data();
    a.seg_starts = sgmv ? seg_starts.data() : nullptr;
    a.seg_adapter = sgmv ? seg_adapter.data() : nullptr;
    a.num_segments = sgmv ? static_cast<int64_t>(seg_adapter.size()) : -1;
    a.num_adapters = num_adapters;
    return a;
  }
  int64_t slot(int64_t t) const {
    int64_t index = -1;
    if (sgmv) {
      const int64_t s = core::sgmv_segment_of_row(seg_starts.data(), static_cast<int64_t>(seg_adapter.size()), t);
      index = s < 0 ? -1 : seg_adapter[s];
    } else {
      index = idx[t];
    }
    return core::bgmv_slot(index, num_adapters);
  }
};

// BGMV: every row picks an index from {-1, out of range, -7, 0..n-1}.
static Routing bgmv_routing(int64_t rows, int64_t n, uint64_t seed) {
  Routing r;
  r.num_adapters = n;
  Rng rng(seed);
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t pick = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(n + 3));
    r.idx.push_back(pick < n ? pick : pick == n ? -1 : pick == n + 1 ? n : -7);
  }
  return r;
}

// SGMV: rows before the first segment, an empty segment, an out-of-range adapter, and rows
// after the last segment.
static Routing sgmv_routing(int64_t rows, int64_t n) {
  Routing r;
  r.sgmv = true;
  r.num_adapters = n;
  const int64_t a = rows / 5, b = rows / 2, c = rows - rows / 6;
  r.seg_starts = {a, b, b, c};
  r.seg_adapter = {n - 1, 0, n};
  return r;
}

template <typename T>
static void test_shrink(int64_t rows, int64_t in, int64_t r, const Routing& routing) {
  using Acc = AccOf<T>;
  const int64_t n = routing.num_adapters;
  const std::vector<T> x = random_vector<T>(rows * in, 10 + in);
  const std::vector<T> A = random_vector<T>(n * r * in, 20 + r);
  std::vector<T> z(rows * r, Storage<T>::to(123.0));
  const cudaError_t err = cuda::launch_bgmv_shrink(dtype_of<T>(), x.data(), A.data(), z.data(), rows,
                                                   in, r, routing.view(), nullptr);
  CHECK(err == cudaSuccess, "shrink launch: %s", cudaGetErrorString(err));
  ToleranceRule rule;
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t slot = routing.slot(t);
    for (int64_t j = 0; j < r; ++j) {
      long double exact = 0, magnitude = 0;
      Acc naive = 0;
      if (slot >= 0) {
        for (int64_t k = 0; k < in; ++k) {
          const double xv = Storage<T>::from(x[t * in + k]), av = Storage<T>::from(A[(slot * r + j) * in + k]);
          exact += static_cast<long double>(xv) * av;
          magnitude += std::fabs(static_cast<long double>(xv) * av);
          naive += static_cast<Acc>(xv) * static_cast<Acc>(av);
        }
      }
      const double got = Storage<T>::from(z[t * r + j]);
      if (slot < 0) CHECK(got == 0.0, "row %lld without adapter: z = %g", (long long)t, got);
      rule.add(got, Storage<T>::from(Storage<T>::to(naive)), exact, magnitude);
    }
  }
  CHECK(rule.holds(Storage<T>::eps), "shrink rows=%lld in=%lld r=%lld sgmv=%d: error %g, naive %g",
        (long long)rows, (long long)in, (long long)r, routing.sgmv, rule.ours, rule.naive);
}

template <typename T>
static void test_expand(int64_t rows, int64_t out, int64_t r, const Routing& routing) {
  using Acc = AccOf<T>;
  const int64_t n = routing.num_adapters;
  const std::vector<T> z = random_vector<T>(rows * r, 30 + r);
  const std::vector<T> B = random_vector<T>(n * out * r, 40 + out);
  const std::vector<T> y0 = random_vector<T>(rows * out, 50 + rows);
  std::vector<float> scale(n);
  for (int64_t a = 0; a < n; ++a) scale[a] = 0.5f + static_cast<float>(a);
  std::vector<T> y = y0;
  const cudaError_t err = cuda::launch_bgmv_expand(dtype_of<T>(), y.data(), z.data(), B.data(),
                                                   scale.data(), rows, out, r, routing.view(), nullptr);
  CHECK(err == cudaSuccess, "expand launch: %s", cudaGetErrorString(err));
  ToleranceRule rule;
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t slot = routing.slot(t);
    for (int64_t o = 0; o < out; ++o) {
      const double before = Storage<T>::from(y0[t * out + o]), got = Storage<T>::from(y[t * out + o]);
      if (slot < 0) {
        CHECK(same_bits(&y[t * out + o], &y0[t * out + o], sizeof(T)), "row %lld without adapter changed",
              (long long)t);
        continue;
      }
      long double exact = 0, magnitude = 0;
      Acc naive = 0;
      for (int64_t j = 0; j < r; ++j) {
        const double zv = Storage<T>::from(z[t * r + j]), bv = Storage<T>::from(B[(slot * out + o) * r + j]);
        exact += static_cast<long double>(zv) * bv;
        magnitude += std::fabs(static_cast<long double>(zv) * bv);
        naive += static_cast<Acc>(zv) * static_cast<Acc>(bv);
      }
      exact = before + scale[slot] * exact;
      magnitude = std::fabs(static_cast<long double>(before)) + scale[slot] * magnitude;
      const Acc naive_y = static_cast<Acc>(before) + static_cast<Acc>(scale[slot]) * naive;
      rule.add(got, Storage<T>::from(Storage<T>::to(naive_y)), exact, magnitude);
    }
  }
  CHECK(rule.holds(Storage<T>::eps), "expand rows=%lld out=%lld r=%lld sgmv=%d: error %g, naive %g",
        (long long)rows, (long long)out, (long long)r, routing.sgmv, rule.ours, rule.naive);
}

template <typename T>
static void test_dtype() {
  const int64_t n = 3;
  for (int64_t rows : {1, 6, 13}) {
    for (bool sgmv : {false, true}) {
      const Routing routing = sgmv ? sgmv_routing(rows, n) : bgmv_routing(rows, n, 7 + rows);
      for (int64_t r : {1, 3, 4, 5, 16}) {
        for (int64_t in : {1, 7, 32, 33, 100}) test_shrink<T>(rows, in, r, routing);
        for (int64_t out : {1, 255, 256, 257}) test_expand<T>(rows, out, r, routing);
      }
    }
  }
}

// Empty launches do nothing and succeed; expand's z row lives in dynamic shared memory, so a
// rank whose row exceeds 48 KiB is refused by CUDA's launch check, not run.
static void test_limits() {
  const Routing none = bgmv_routing(0, 2, 1);
  CHECK(cuda::launch_bgmv_shrink(cuda::DType::kFloat32, nullptr, nullptr, nullptr, 0, 4, 4, none.view(), nullptr) == cudaSuccess, "empty shrink");
  CHECK(cuda::launch_bgmv_expand(cuda::DType::kFloat32, nullptr, nullptr, nullptr, nullptr, 0, 4, 4, none.view(), nullptr) == cudaSuccess, "empty expand");
  const Routing one = bgmv_routing(1, 1, 3);
  const int64_t r_max = cuda_emu::kMaxDynamicShared / sizeof(float);
  test_expand<float>(1, 3, r_max, one);  // exactly 48 KiB of z row
  std::vector<float> y(3), z(r_max + 1), B(3 * (r_max + 1));
  const float scale = 1.0f;
  const cudaError_t err = cuda::launch_bgmv_expand(cuda::DType::kFloat32, y.data(), z.data(), B.data(),
                                                   &scale, 1, 3, r_max + 1, one.view(), nullptr);
  CHECK(err == cudaErrorInvalidValue, "rank %lld past 48 KiB of shared memory: %s", (long long)(r_max + 1),
        cudaGetErrorString(err));
  CHECK(cudaGetLastError() == cudaSuccess, "launch errors are not sticky");
}

// Adapter slot n-1 of a stack whose element offsets pass 2^31: index arithmetic in 64 bits.
static void test_offsets_beyond_2_31() {
  const int64_t n = 1 << 20, r = 8, in = 320, out = 300, rows = 2;
  SparseBuffer A_buf(static_cast<size_t>(n) * r * in * sizeof(float));
  SparseBuffer B_buf(static_cast<size_t>(n) * out * r * sizeof(float));
  float* A = A_buf.as<float>();
  float* B = B_buf.as<float>();
  const int64_t slot = n - 1;
  Rng rng(99);
  for (int64_t e = 0; e < r * in; ++e) A[slot * r * in + e] = static_cast<float>(rng.uniform());
  for (int64_t e = 0; e < out * r; ++e) B[slot * out * r + e] = static_cast<float>(rng.uniform());
  Routing routing;
  routing.num_adapters = n;
  routing.idx = {slot, slot};
  const std::vector<float> x = random_vector<float>(rows * in, 5);
  std::vector<float> z(rows * r), y(rows * out, 0.0f);
  const float one = 1.0f;
  std::vector<float> scale(n, one);  // host copy: scale[slot] is read
  CHECK(cuda::launch_bgmv_shrink(cuda::DType::kFloat32, x.data(), A, z.data(), rows, in, r, routing.view(), nullptr) == cudaSuccess, "shrink");
  CHECK(cuda::launch_bgmv_expand(cuda::DType::kFloat32, y.data(), z.data(), B, scale.data(), rows, out, r, routing.view(), nullptr) == cudaSuccess, "expand");
  double worst = 0;
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t j = 0; j < r; ++j) {
      double exact = 0;
      for (int64_t k = 0; k < in; ++k) exact += double(x[t * in + k]) * A[(slot * r + j) * in + k];
      worst = worse(worst, std::fabs(exact - z[t * r + j]));
    }
    for (int64_t o = 0; o < out; ++o) {
      double exact = 0;
      for (int64_t j = 0; j < r; ++j) exact += double(z[t * r + j]) * B[(slot * out + o) * r + j];
      worst = worse(worst, std::fabs(exact - y[t * out + o]));
    }
  }
  CHECK(worst < 1e-4, "adapter at element offset %lld: error %g", (long long)(slot * r * in), worst);
}

int main() {
  for (uint64_t seed : kScheduleSeeds) {
    cuda_emu::set_schedule_seed(seed);
    test_dtype<float>();
    test_dtype<double>();
    test_dtype<__half>();
    test_dtype<__nv_bfloat16>();
  }
  test_limits();
  test_offsets_beyond_2_31();
  if (failures == 0) std::printf("emu_bgmv: all passed\n");
  return failures == 0 ? 0 : 1;
}
