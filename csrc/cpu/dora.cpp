// The 64-byte vectors of the tile loops stay inside this file (every helper is internal and
// inlined), so GCC's note that passing them changes the ABI is noise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "dora.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>

#include "../core/dora.h"
#include "../core/dropout.h"  // LORA_EXT_FORCE_INLINE
#include "isa.h"

namespace lora_ext {
namespace cpu {
namespace {

// A tile is 4 rows by one 64-byte vector of columns (16 floats or 8 doubles): 4 AVX-512
// (8 AVX2) accumulators; each Q vector load feeds four FMAs, each P broadcast one.
constexpr int kRows = 4;
constexpr int kColumnChunks = 4;  // column-sum mode: 4 vectors of columns per task
constexpr int64_t kElementsPerTask = 1 << 15;

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// GCC vector extensions: each per-ISA clone lowers them to its widest registers.
typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

template <typename Acc>
struct Simd {
  using type = f32x16;
  static constexpr int lanes = 16;
};
template <>
struct Simd<double> {
  using type = f64x8;
  static constexpr int lanes = 8;
};

template <typename T>
struct Load {
  acc_t<T> operator()(T v) const { return static_cast<acc_t<T>>(v); }
};
template <>
struct Load<c10::BFloat16> {
  float operator()(c10::BFloat16 v) const {  // exact widening
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};

// One vector of consecutive elements, widened to the accumulation type.
template <typename T>
LORA_EXT_FORCE_INLINE typename Simd<acc_t<T>>::type load_vector(const T* src) {
  using Acc = acc_t<T>;
  using V = typename Simd<Acc>::type;
  V v;
  if constexpr (std::is_same<T, Acc>::value) {
    std::memcpy(&v, src, sizeof v);
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    u16x16 raw;
    std::memcpy(&raw, src, sizeof raw);
    const u32x16 wide = __builtin_convertvector(raw, u32x16) << 16;
    std::memcpy(&v, &wide, sizeof v);
  } else {
    Acc tmp[Simd<Acc>::lanes];
    for (int l = 0; l < Simd<Acc>::lanes; ++l) tmp[l] = static_cast<Acc>(src[l]);
    std::memcpy(&v, tmp, sizeof v);
  }
  return v;
}

template <typename V>
LORA_EXT_FORCE_INLINE V load_acc(const void* src) {
  V v;
  std::memcpy(&v, src, sizeof v);
  return v;
}

// Σ over a tile of R rows at row0 and the vector of columns at c0: v = M + P·Q, then v².
template <int R, typename T>
LORA_EXT_FORCE_INLINE void tile(const T* m, int64_t ldm, int64_t n, const acc_t<T>* p,
                                const acc_t<T>* q, int rank, int64_t row0, int64_t c0,
                                typename Simd<acc_t<T>>::type (&sq)[R][1]) {
  using V = typename Simd<acc_t<T>>::type;
  V v[R][1];
  for (int a = 0; a < R; ++a) v[a][0] = load_vector(m + (row0 + a) * ldm + c0);
  core::dora_tile_update<R, 1>(
      rank, [&](int a, int k) { return p[(row0 + a) * rank + k]; },
      [&](int k, int) { return load_acc<V>(q + k * n + c0); }, v);
  core::dora_accumulate_squares(v, sq);
}

template <typename V>
LORA_EXT_FORCE_INLINE auto lane_sum(const V& v) {
  auto total = v[0];
  for (int l = 1; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l) total += v[l];
  return total;
}

// Row sums for the row tiles [tile0, tile1) of M, all columns each.
template <typename T>
LORA_EXT_FORCE_INLINE void row_sums(const T* m, int64_t ldm, int64_t n, const acc_t<T>* p,
                                    const acc_t<T>* q, int rank, acc_t<T>* sums, int64_t tile0,
                                    int64_t tile1, int64_t rows) {
  using Acc = acc_t<T>;
  using V = typename Simd<Acc>::type;
  constexpr int L = Simd<Acc>::lanes;
  const Load<T> load;
  const int64_t full_cols = n - n % L;
  auto tail = [&](int64_t i, Acc total) {
    for (int64_t j = full_cols; j < n; ++j) {
      const Acc e = core::dora_value(m[i * ldm + j], p + i * rank, q + j, n, rank, load);
      total += e * e;
    }
    sums[i] = total;
  };
  for (int64_t t = tile0; t < tile1; ++t) {
    const int64_t r0 = t * kRows;
    if (r0 + kRows <= rows) {
      V sq[kRows][1] = {};
      for (int64_t c0 = 0; c0 < full_cols; c0 += L) tile<kRows>(m, ldm, n, p, q, rank, r0, c0, sq);
      for (int a = 0; a < kRows; ++a) tail(r0 + a, lane_sum(sq[a][0]));
    } else {
      for (int64_t i = r0; i < rows; ++i) {
        V sq[1][1] = {};
        for (int64_t c0 = 0; c0 < full_cols; c0 += L) tile<1>(m, ldm, n, p, q, rank, i, c0, sq);
        tail(i, lane_sum(sq[0][0]));
      }
    }
  }
}

// Column sums for the column blocks [block0, block1) (kColumnChunks vectors each), reading
// the block's part of every row tile, top to bottom.
template <typename T>
LORA_EXT_FORCE_INLINE void column_sums(const T* m, int64_t ldm, int64_t rows, int64_t n,
                                       const acc_t<T>* p, const acc_t<T>* q, int rank,
                                       acc_t<T>* sums, int64_t block0, int64_t block1) {
  using Acc = acc_t<T>;
  using V = typename Simd<Acc>::type;
  constexpr int L = Simd<Acc>::lanes;
  constexpr int64_t kBlock = kColumnChunks * L;
  const Load<T> load;
  const int64_t full_rows = rows - rows % kRows;
  for (int64_t block = block0; block < block1; ++block) {
    const int64_t c_begin = block * kBlock;
    const int64_t c_end = std::min(c_begin + kBlock, n);
    const int64_t chunks = (c_end - c_begin) / L;  // full vectors; the rest element-wise
    V sq[kColumnChunks][kRows][1] = {};
    for (int64_t r0 = 0; r0 < full_rows; r0 += kRows) {
      for (int64_t ch = 0; ch < chunks; ++ch) {
        tile<kRows>(m, ldm, n, p, q, rank, r0, c_begin + ch * L, sq[ch]);
      }
    }
    for (int64_t ch = 0; ch < chunks; ++ch) {
      V total = sq[ch][0][0];
      for (int a = 1; a < kRows; ++a) total += sq[ch][a][0];
      for (int l = 0; l < L; ++l) {
        const int64_t j = c_begin + ch * L + l;
        Acc s = total[l];
        for (int64_t i = full_rows; i < rows; ++i) {
          const Acc e = core::dora_value(m[i * ldm + j], p + i * rank, q + j, n, rank, load);
          s += e * e;
        }
        sums[j] = s;
      }
    }
    for (int64_t j = c_begin + chunks * L; j < c_end; ++j) {
      Acc s = 0;
      for (int64_t i = 0; i < rows; ++i) {
        const Acc e = core::dora_value(m[i * ldm + j], p + i * rank, q + j, n, rank, load);
        s += e * e;
      }
      sums[j] = s;
    }
  }
}

// Wheels target baseline x86-64; the clones let the tile loops use AVX2/AVX-512 registers
// where the machine has them (and LORA_EXT_CPU_CAPABILITY allows). The vectors are 16 lanes
// wide in every clone and a*b+c is never contracted, so every clone gives the same bits.
#define LORA_EXT_DEFINE_DORA(T, SUFFIX)                                                      \
  LORA_EXT_ISA_CLONES(void, row_sums_##SUFFIX,                                               \
                      (const T* m, int64_t ldm, int64_t n, const acc_t<T>* p,                \
                       const acc_t<T>* q, int rank, acc_t<T>* sums, int64_t t0, int64_t t1,  \
                       int64_t rows),                                                        \
                      (m, ldm, n, p, q, rank, sums, t0, t1, rows), row_sums<T>)              \
  LORA_EXT_ISA_CLONES(void, column_sums_##SUFFIX,                                            \
                      (const T* m, int64_t ldm, int64_t rows, int64_t n, const acc_t<T>* p,  \
                       const acc_t<T>* q, int rank, acc_t<T>* sums, int64_t b0, int64_t b1), \
                      (m, ldm, rows, n, p, q, rank, sums, b0, b1), column_sums<T>)
LORA_EXT_DEFINE_DORA(float, f32)
LORA_EXT_DEFINE_DORA(double, f64)
LORA_EXT_DEFINE_DORA(c10::BFloat16, bf16)
LORA_EXT_DEFINE_DORA(c10::Half, f16)
#undef LORA_EXT_DEFINE_DORA

template <typename T>
void run_rows(const T* m, int64_t ldm, int64_t n, const acc_t<T>* p, const acc_t<T>* q, int rank,
              acc_t<T>* sums, int64_t t0, int64_t t1, int64_t rows) {
  if constexpr (std::is_same_v<T, float>) row_sums_f32(m, ldm, n, p, q, rank, sums, t0, t1, rows);
  else if constexpr (std::is_same_v<T, double>) row_sums_f64(m, ldm, n, p, q, rank, sums, t0, t1, rows);
  else if constexpr (std::is_same_v<T, c10::BFloat16>) row_sums_bf16(m, ldm, n, p, q, rank, sums, t0, t1, rows);
  else row_sums_f16(m, ldm, n, p, q, rank, sums, t0, t1, rows);
}

template <typename T>
void run_columns(const T* m, int64_t ldm, int64_t rows, int64_t n, const acc_t<T>* p,
                 const acc_t<T>* q, int rank, acc_t<T>* sums, int64_t b0, int64_t b1) {
  if constexpr (std::is_same_v<T, float>) column_sums_f32(m, ldm, rows, n, p, q, rank, sums, b0, b1);
  else if constexpr (std::is_same_v<T, double>) column_sums_f64(m, ldm, rows, n, p, q, rank, sums, b0, b1);
  else if constexpr (std::is_same_v<T, c10::BFloat16>) column_sums_bf16(m, ldm, rows, n, p, q, rank, sums, b0, b1);
  else column_sums_f16(m, ldm, rows, n, p, q, rank, sums, b0, b1);
}

}  // namespace

void dora_sum_squares(const at::Tensor& m, const at::Tensor& p, const at::Tensor& q,
                      bool column_sums, at::Tensor& sums) {
  const int64_t rows = m.size(0), n = m.size(1);
  const int64_t ldm = m.stride(0);
  const int rank = static_cast<int>(p.size(1));
  if (rows == 0 || n == 0) {
    sums.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "lora_ext_dora_norm", [&] {
    using Acc = acc_t<scalar_t>;
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const Acc* pp = p.data_ptr<Acc>();
    const Acc* qp = q.data_ptr<Acc>();
    Acc* out = sums.data_ptr<Acc>();
    const int64_t work = (rank + 1) * n;  // per row
    if (!column_sums) {
      const int64_t tiles = (rows + kRows - 1) / kRows;
      const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (kRows * work));
      at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
        run_rows<scalar_t>(mp, ldm, n, pp, qp, rank, out, t0, t1, rows);
      });
    } else {
      const int64_t kBlock = kColumnChunks * Simd<Acc>::lanes;
      const int64_t blocks = (n + kBlock - 1) / kBlock;
      const int64_t per_block = (rank + 1) * rows * kBlock;
      const int64_t grain = std::max<int64_t>(1, kElementsPerTask / per_block);
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        run_columns<scalar_t>(mp, ldm, rows, n, pp, qp, rank, out, b0, b1);
      });
    }
  });
}

}  // namespace cpu
}  // namespace lora_ext
