// Native unit tests of the DoRA core (core/dora.h): the register tile agrees with the
// one-element formula, vectors of columns (as the CPU kernel uses them) agree with scalars,
// and the direct computation keeps its accuracy where W + s·B·A nearly cancels.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/dora.h"
#include "tests/check.h"

using namespace lora_ext::core;

static int failures = 0;

// A small deterministic generator (no <random> distribution differences across libraries).
static double next_uniform(uint64_t& state) {
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<double>(state >> 11) / 9007199254740992.0 - 0.5;
}

struct Identity {
  template <typename T>
  T operator()(T v) const { return v; }
};

static void test_tile_matches_elements() {
  constexpr int R = 3, C = 5, rank = 7;
  const int n = 11;
  uint64_t s = 1;
  std::vector<float> m(R * n), p(R * rank), q(rank * n);
  for (auto& v : m) v = static_cast<float>(next_uniform(s));
  for (auto& v : p) v = static_cast<float>(next_uniform(s));
  for (auto& v : q) v = static_cast<float>(next_uniform(s));
  const int c0 = 4;  // a tile that starts inside the row
  float v[R][C];
  for (int a = 0; a < R; ++a)
    for (int c = 0; c < C; ++c) v[a][c] = m[a * n + c0 + c];
  dora_tile_update<R, C>(
      rank, [&](int a, int k) { return p[a * rank + k]; },
      [&](int k, int c) { return q[k * n + c0 + c]; }, v);
  for (int a = 0; a < R; ++a) {
    for (int c = 0; c < C; ++c) {
      const float want = dora_value(m[a * n + c0 + c], &p[a * rank], &q[c0 + c], n, rank, Identity());
      CHECK(v[a][c] == want, "tile (%d, %d): %.9g vs element %.9g", a, c, v[a][c], want);
    }
  }
  float sq[R][C] = {};
  dora_accumulate_squares(v, sq);
  dora_accumulate_squares(v, sq);
  CHECK(sq[1][2] == 2 * v[1][2] * v[1][2], "squares accumulate");
}

#if defined(__GNUC__)
typedef float f32x4 __attribute__((vector_size(16)));  // SSE: baseline ABI
static void test_vector_columns_match_scalars() {
  constexpr int R = 2, rank = 4, L = 4;
  uint64_t s = 7;
  float m[R][L], p[R][rank], q[rank][L];
  for (auto& row : m) for (float& v : row) v = static_cast<float>(next_uniform(s));
  for (auto& row : p) for (float& v : row) v = static_cast<float>(next_uniform(s));
  for (auto& row : q) for (float& v : row) v = static_cast<float>(next_uniform(s));
  f32x4 vec[R][1];
  for (int a = 0; a < R; ++a) std::memcpy(&vec[a][0], m[a], sizeof(f32x4));
  dora_tile_update<R, 1>(
      rank, [&](int a, int k) { return p[a][k]; },
      [&](int k, int) {
        f32x4 out;
        std::memcpy(&out, q[k], sizeof out);
        return out;
      },
      vec);
  for (int a = 0; a < R; ++a) {
    for (int l = 0; l < L; ++l) {
      const float want = dora_value(m[a][l], p[a], &q[0][l], L, rank, Identity());
      CHECK(vec[a][0][l] == want, "lane %d of row %d: %.9g vs %.9g", l, a, vec[a][0][l], want);
    }
  }
}
#endif

static void test_cancellation_keeps_relative_accuracy() {
  // One row with W = -s·B·A + tiny: forming each element directly in float keeps the norm to
  // about float epsilon relative to |W| per element, i.e. well below 1e-3 relative here.
  const int n = 512, rank = 4;
  const double s = 2.0;
  uint64_t st = 11;
  std::vector<double> a(rank * n), b(rank), w(n), tiny(n);
  for (auto& v : a) v = next_uniform(st);
  for (auto& v : b) v = next_uniform(st);
  for (auto& v : tiny) v = 1e-3 * next_uniform(st);
  std::vector<float> af(rank * n), bf(rank), wf(n);
  for (int k = 0; k < rank; ++k) bf[k] = static_cast<float>(s * b[k]);
  for (int i = 0; i < rank * n; ++i) af[i] = static_cast<float>(a[i]);
  double exact = 0;
  for (int j = 0; j < n; ++j) {
    double delta = 0;
    for (int k = 0; k < rank; ++k) delta += static_cast<double>(bf[k]) * af[k * n + j];
    wf[j] = static_cast<float>(-delta + tiny[j]);
    const double e = static_cast<double>(wf[j]) + delta;
    exact += e * e;
  }
  float sum = 0;
  for (int j = 0; j < n; ++j) {
    const float e = dora_value(wf[j], bf.data(), &af[j], n, rank, Identity());
    sum += e * e;
  }
  const double rel = std::fabs(std::sqrt(static_cast<double>(sum)) - std::sqrt(exact)) / std::sqrt(exact);
  CHECK(rel < 1e-3, "relative error %.3g of the cancelled norm", rel);
}

int main() {
  test_tile_matches_elements();
#if defined(__GNUC__)
  test_vector_columns_match_scalars();
#endif
  test_cancellation_keeps_relative_accuracy();
  if (failures == 0) std::printf("test_dora_core: all passed\n");
  return failures == 0 ? 0 : 1;
}
