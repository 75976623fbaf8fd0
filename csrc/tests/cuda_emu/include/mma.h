// cuda_emu stand-in for <mma.h>: the warp matrix functions of nvcuda::wmma, for 16 x 16 x 16
// tiles of __half or __nv_bfloat16 with a float accumulator (what the kernels use).
//
// How lanes share a fragment's elements is unspecified in CUDA (kernels may only touch x[]
// element-wise), so here every lane holds the whole tile and computes the whole product.
// What is checked as a GPU would fault or misbehave: every lane of the warp takes part in each
// call (a converged warp), pointers are 256-bit aligned and ldm is a multiple of 16 bytes.
// The product is exact per term and summed in fp32 in k order, then added to c: the tensor
// cores' own order and rounding inside one step differ, within the tolerance the tests allow.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../cuda_emu_fp16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu models the 16 x 16 x 16 shape only");
  static constexpr int kRows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int kCols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = kRows * kCols;
  T x[num_elements];  // row-major (i, j) -> x[i * kCols + j]
};

namespace detail {
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
void check_access(const T* p, unsigned ldm, const char* call) {
  __syncwarp();  // every lane of the warp calls together
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::cuda_emu::fail("%s: pointer %p not 256-bit aligned", call, (const void*)p);
  if (ldm * sizeof(T) % 16 != 0) ::cuda_emu::fail("%s: ldm %u is not a multiple of 16 bytes", call, ldm);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  __syncwarp();
  for (auto& e : f.x) e = value;
}

// matrix_a / matrix_b from memory laid out as the fragment's Layout says.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load names its layout");
  detail::check_access(p, ldm, "load_matrix_sync");
  constexpr bool kRowMajor = std::is_same<Layout, row_major>::value;
  for (int i = 0; i < F::kRows; ++i) {
    for (int j = 0; j < F::kCols; ++j) f.x[i * F::kCols + j] = kRowMajor ? p[i * ldm + j] : p[j * ldm + i];
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  detail::check_access(p, ldm, "store_matrix_sync");
  for (int i = 0; i < F::kRows; ++i) {
    for (int j = 0; j < F::kCols; ++j) {
      (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * F::kCols + j];
    }
  }
}

template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  __syncwarp();
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = 0.0f;
      for (int k = 0; k < K; ++k) sum += detail::to_float(a.x[i * K + k]) * detail::to_float(b.x[k * N + j]);
      out[i * N + j] = c.x[i * N + j] + sum;
    }
  }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
