// Native unit tests of csrc/core/bgmv.h: row grouping, segment lookup, the slot rule, and
// the grouped shrink/expand against naive loops (padding with zeros changes nothing).
#include <cmath>
#include <cstdio>
#include <vector>

#include "core/bgmv.h"
#include "tests/check.h"

using namespace lora_ext::core;

static int failures = 0;

static uint32_t state = 12345u;
static double next_value() {  // deterministic values in [-1, 1)
  state = state * 1664525u + 1013904223u;
  return static_cast<double>(state >> 8) / 8388608.0 - 1.0;
}

static void test_slot_rule() {
  CHECK(bgmv_slot(-1, 4) == -1, "-1");
  CHECK(bgmv_slot(0, 4) == 0 && bgmv_slot(3, 4) == 3, "in range");
  CHECK(bgmv_slot(4, 4) == -1 && bgmv_slot(-7, 4) == -1 && bgmv_slot(0, 0) == -1, "out of range");
}

static void test_group_rows() {
  const std::vector<int64_t> slots = {2, -1, 0, 2, 2, 1, -1, 0};
  std::vector<int64_t> offsets(5), order(slots.size(), -9);
  bgmv_group_rows(slots.data(), static_cast<int64_t>(slots.size()), 4, offsets.data(), order.data());
  const std::vector<int64_t> want_offsets = {0, 2, 3, 6, 6};
  const std::vector<int64_t> want_order = {2, 7, 5, 0, 3, 4};
  for (int a = 0; a < 5; ++a) CHECK(offsets[a] == want_offsets[a], "offsets[%d] = %lld", a, (long long)offsets[a]);
  for (int i = 0; i < 6; ++i) CHECK(order[i] == want_order[i], "order[%d] = %lld", i, (long long)order[i]);
}

static void test_segment_of_row() {
  const int64_t starts[] = {2, 5, 5, 9};  // segments [2,5), [5,5), [5,9)
  CHECK(sgmv_segment_of_row(starts, 3, 0) == -1 && sgmv_segment_of_row(starts, 3, 1) == -1, "before");
  for (int64_t t = 2; t < 5; ++t) CHECK(sgmv_segment_of_row(starts, 3, t) == 0, "row %lld", (long long)t);
  for (int64_t t = 5; t < 9; ++t) CHECK(sgmv_segment_of_row(starts, 3, t) == 2, "row %lld", (long long)t);
  CHECK(sgmv_segment_of_row(starts, 3, 9) == -1, "after");
  CHECK(sgmv_segment_of_row(starts, 0, 2) == -1, "no segments");
}

static void test_shrink_expand_against_naive() {
  const int64_t rows = 7, in = 37, out = 21, r = 5, n = 3;
  const int64_t ranks[n] = {5, 2, 3};  // padded to r with zeros
  std::vector<double> x(rows * in), A(n * r * in), B(n * out * r), y(rows * out);
  for (auto& v : x) v = next_value();
  for (auto& v : y) v = next_value();
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t j = 0; j < r; ++j)
      for (int64_t k = 0; k < in; ++k) A[(a * r + j) * in + k] = j < ranks[a] ? next_value() : 0.0;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < r; ++j) B[(a * out + o) * r + j] = j < ranks[a] ? next_value() : 0.0;
  }
  const float scale[n] = {0.5f, 2.0f, 1.25f};
  const std::vector<int64_t> slots = {1, -1, 0, 2, 1, 0, -1};
  std::vector<int64_t> offsets(n + 1), order(rows);
  bgmv_group_rows(slots.data(), rows, n, offsets.data(), order.data());
  std::vector<double> z(rows * r, 0.0), y2 = y, scratch(bgmv_expand_scratch(out, r));
  auto id = [](double v) { return v; };
  for (int64_t a = 0; a < n; ++a) {
    const int64_t count = offsets[a + 1] - offsets[a];
    bgmv_shrink_rows(x.data(), in, A.data() + a * r * in, r, order.data() + offsets[a], count, z.data(), id, id);
    bgmv_expand_rows(y2.data(), out, z.data(), r, B.data() + a * out * r, scale[a], order.data() + offsets[a],
                     count, scratch.data(), id, id);
  }
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t a = slots[t];
    for (int64_t o = 0; o < out; ++o) {
      double want = y[t * out + o];
      if (a >= 0) {
        double delta = 0.0;
        for (int64_t j = 0; j < ranks[a]; ++j) {
          double zj = 0.0;
          for (int64_t k = 0; k < in; ++k) zj += x[t * in + k] * A[(a * r + j) * in + k];
          delta += zj * B[(a * out + o) * r + j];
        }
        want += scale[a] * delta;
      }
      CHECK(std::fabs(y2[t * out + o] - want) <= 1e-12, "row %lld out %lld: %g vs %g", (long long)t,
            (long long)o, y2[t * out + o], want);
    }
    if (a < 0) {
      for (int64_t j = 0; j < r; ++j) CHECK(z[t * r + j] == 0.0, "z of a row without adapter");
    }
  }
  // the strided dot (what a CUDA thread team computes) sums to the same value
  double sum = 0.0;
  for (int64_t lane = 0; lane < 4; ++lane) sum += bgmv_dot<double>(x.data(), A.data(), in, lane, 4, id);
  const double direct = bgmv_dot<double>(x.data(), A.data(), in, 0, 1, id);
  CHECK(std::fabs(sum - direct) <= 1e-12, "strided %g vs direct %g", sum, direct);
}

int main() {
  test_slot_rule();
  test_group_rows();
  test_segment_of_row();
  test_shrink_expand_against_naive();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("bgmv core: all tests passed\n");
  return 0;
}
