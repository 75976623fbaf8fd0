// The skinny GEMM micro-kernels (see skinny_gemm.h). Each keeps a block of RB rows (or ranks)
// by NC vectors of accumulators in registers and streams the other operand past them:
//   (1) rows_by_rank: per k, NC vectors of p's row k and RB broadcasts of x·m;
//   (2) rank_by_cols: per row t, NC vectors of x·m and RB broadcasts of z[t, j];
//   (3) rank_to_cols: per rank j, NC vectors of a's row j and RB broadcasts of z[t, j].
// x·m is first packed (converted to Acc, multiplied by the mask) into a buffer that stays in
// L1, a few rows by a block of columns at a time; the broadcasts then read it.
// The vectors are GCC's generic vector extension at the level's register width, so one body
// gives every level its own registers (isa.h); the block sizes keep the accumulators within
// the level's register file.
// Every level gives the same bits: each output element is summed in the same order whatever
// the vector width, and the build does not contract a·b + c into an FMA (the portable level
// has none). Contraction was measured not to pay here: the kernels are bound by loads.
#include "skinny_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/dropout.h"  // LORA_EXT_FORCE_INLINE

// The loops over a block's registers must unroll fully, or the accumulators live on the stack.
#define LORA_EXT_UNROLL _Pragma("GCC unroll 16")

namespace lora_ext {
namespace cpu {
namespace {

template <Isa L>
constexpr int kVecBytes = L == Isa::kAvx512 ? 64 : (L == Isa::kAvx2 ? 32 : 16);

// Accumulator registers a block may hold: half of AVX-512's 32, half of the 16 of AVX2 and
// SSE, leaving room for the streamed vectors and broadcasts. Blocks of AVX2 and SSE are at
// most 2 vectors wide: 4 rows of 2 ran at twice the speed of 2 rows of 4 (measured at r = 64).
template <Isa L>
constexpr int kAccRegs = L == Isa::kAvx512 ? 16 : 8;
template <Isa L>
constexpr int kMaxCols = L == Isa::kAvx512 ? 4 : 2;  // NC: vectors per row of a block
constexpr int kMaxRows = 8;                          // RB: rows (or ranks) of a block

// The rows of a block of nc vectors: a power of two (the tails are taken by halves).
template <Isa L>
constexpr int block_rows(int nc) {
  int rows = kMaxRows;
  while (rows > 1 && rows * nc > kAccRegs<L>) rows /= 2;
  return rows;
}

// Calls block(c0, std::integral_constant<int, NC>()) for the blocks of up to kMaxCols<L>
// vectors that cover `regs` vectors, c0 being a block's first vector.
template <Isa L, typename Block>
LORA_EXT_FORCE_INLINE void column_blocks(int64_t regs, const Block& block) {
  for (int64_t c0 = 0; c0 < regs; c0 += kMaxCols<L>) {
    const int64_t nc = std::min<int64_t>(kMaxCols<L>, regs - c0);
    if constexpr (kMaxCols<L> == 2) {
      if (nc == 2) block(c0, std::integral_constant<int, 2>());
      else block(c0, std::integral_constant<int, 1>());
    } else {
      if (nc == 4) block(c0, std::integral_constant<int, 4>());
      else if (nc == 3) block(c0, std::integral_constant<int, 3>());
      else if (nc == 2) block(c0, std::integral_constant<int, 2>());
      else block(c0, std::integral_constant<int, 1>());
    }
  }
}

template <typename Acc, Isa L>
struct Vec {
  typedef Acc type __attribute__((vector_size(kVecBytes<L>)));
  static constexpr int64_t kLanes = kVecBytes<L> / sizeof(Acc);
  // By reference: a vector passed by value would change the ABI between the clones.
  static LORA_EXT_FORCE_INLINE void load(type& v, const Acc* p) { std::memcpy(&v, p, sizeof v); }
  static LORA_EXT_FORCE_INLINE void store(Acc* p, const type& v) { std::memcpy(p, &v, sizeof v); }
};

LORA_EXT_FORCE_INLINE float to_acc(float v) { return v; }
LORA_EXT_FORCE_INLINE double to_acc(double v) { return v; }
LORA_EXT_FORCE_INLINE float to_acc(Bf16 v) { return to_float(v); }
LORA_EXT_FORCE_INLINE float to_acc(F16 v) { return to_float(v); }

// dst[0:n] = x[0:n]·m[0:n] in Acc (m nullptr: ones), dst[n:width] = 0.
template <typename T, typename Acc>
LORA_EXT_FORCE_INLINE void pack_row(const T* x, const Acc* m, Acc* dst, int64_t n, int64_t width) {
  if (m != nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_acc(x[i]) * m[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_acc(x[i]);
  }
  for (int64_t i = n; i < width; ++i) dst[i] = Acc(0);
}

// ---- (1) rows_by_rank ---------------------------------------------------------------------

// acc[b, c-vectors] += Σ_{k < kn} d[b, k]·p[k, c-vectors] for RB rows and NC vectors.
template <Isa L, typename Acc, int NC, int RB>
LORA_EXT_FORCE_INLINE void rows_block(const Acc* d, int64_t ldd, const Acc* p, int64_t ldp,
                                      int64_t kn, Acc* acc, int64_t ldacc) {
  using V = Vec<Acc, L>;
  typename V::type sum[RB][NC], w[NC];
  LORA_EXT_UNROLL
  for (int b = 0; b < RB; ++b) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) V::load(sum[b][c], acc + b * ldacc + c * V::kLanes);
  }
  for (int64_t k = 0; k < kn; ++k) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) V::load(w[c], p + k * ldp + c * V::kLanes);
    LORA_EXT_UNROLL
    for (int b = 0; b < RB; ++b) {
      const Acc s = d[b * ldd + k];
      LORA_EXT_UNROLL
      for (int c = 0; c < NC; ++c) sum[b][c] += s * w[c];
    }
  }
  LORA_EXT_UNROLL
  for (int b = 0; b < RB; ++b) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) V::store(acc + b * ldacc + c * V::kLanes, sum[b][c]);
  }
}

// rows_block over n rows: blocks of RB, the rest by halves.
template <Isa L, typename Acc, int NC, int RB>
LORA_EXT_FORCE_INLINE void rows_blocks(const Acc* d, int64_t ldd, int64_t n, const Acc* p,
                                       int64_t ldp, int64_t kn, Acc* acc, int64_t ldacc) {
  int64_t b = 0;
  for (; b + RB <= n; b += RB) rows_block<L, Acc, NC, RB>(d + b * ldd, ldd, p, ldp, kn, acc + b * ldacc, ldacc);
  if constexpr (RB > 1) {
    if (b < n) rows_blocks<L, Acc, NC, RB / 2>(d + b * ldd, ldd, n - b, p, ldp, kn, acc + b * ldacc, ldacc);
  }
}

template <Isa L, typename T>
LORA_EXT_FORCE_INLINE void rows_by_rank_body(const T* x, int64_t ldx, const acc_of<T>* m,
                                             int64_t ldm, const acc_of<T>* p, int64_t ldp,
                                             int64_t rows, int64_t K, int64_t r, acc_of<T> scale,
                                             acc_of<T>* y, int64_t ldy) {
  using Acc = acc_of<T>;
  constexpr int64_t lanes = Vec<Acc, L>::kLanes;
  constexpr int64_t kBlockK = 1024 / sizeof(Acc);  // a block of x·m: kMaxRows x 1 KiB
  const int64_t regs = (r + lanes - 1) / lanes, ldacc = regs * lanes;
  // fp32 (fp64) x without dropout is read in place; anything else is packed first.
  constexpr bool kSameType = std::is_same_v<T, Acc>;
  const bool in_place = kSameType && m == nullptr;
  alignas(64) Acc d[kMaxRows * kBlockK];
  std::vector<Acc> acc(static_cast<size_t>(kMaxRows * ldacc));
  for (int64_t t0 = 0; t0 < rows; t0 += kMaxRows) {
    const int64_t n = std::min<int64_t>(kMaxRows, rows - t0);
    std::fill(acc.begin(), acc.end(), Acc(0));
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t kn = std::min(kBlockK, K - k0);
      const Acc* dp = d;
      int64_t ldd = kBlockK;
      if constexpr (kSameType) {
        if (in_place) {
          dp = x + t0 * ldx + k0;
          ldd = ldx;
        }
      }
      if (!in_place) {
        for (int64_t b = 0; b < n; ++b) {
          pack_row(x + (t0 + b) * ldx + k0, m == nullptr ? nullptr : m + (t0 + b) * ldm + k0,
                   d + b * kBlockK, kn, kn);
        }
      }
      column_blocks<L>(regs, [&](int64_t c0, auto nc) {
        rows_blocks<L, Acc, nc, block_rows<L>(nc)>(dp, ldd, n, p + k0 * ldp + c0 * lanes, ldp, kn,
                                                   acc.data() + c0 * lanes, ldacc);
      });
    }
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t j = 0; j < r; ++j) y[(t0 + b) * ldy + j] = scale * acc[b * ldacc + j];
    }
  }
}

// ---- (2) rank_by_cols ---------------------------------------------------------------------

// g[j, c-vectors] += Σ_{t < n} z[t, j]·d[t, c-vectors] for RB ranks and NC vectors.
template <Isa L, typename Acc, int NC, int RB>
LORA_EXT_FORCE_INLINE void ranks_block(const Acc* z, int64_t ldz, const Acc* d, int64_t ldd,
                                       int64_t n, Acc* g, int64_t ldg) {
  using V = Vec<Acc, L>;
  typename V::type sum[RB][NC], w[NC];
  LORA_EXT_UNROLL
  for (int j = 0; j < RB; ++j) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) V::load(sum[j][c], g + j * ldg + c * V::kLanes);
  }
  for (int64_t t = 0; t < n; ++t) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) V::load(w[c], d + t * ldd + c * V::kLanes);
    LORA_EXT_UNROLL
    for (int j = 0; j < RB; ++j) {
      const Acc s = z[t * ldz + j];
      LORA_EXT_UNROLL
      for (int c = 0; c < NC; ++c) sum[j][c] += s * w[c];
    }
  }
  LORA_EXT_UNROLL
  for (int j = 0; j < RB; ++j) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) V::store(g + j * ldg + c * V::kLanes, sum[j][c]);
  }
}

// ranks_block over r ranks: blocks of RB, the rest by halves.
template <Isa L, typename Acc, int NC, int RB>
LORA_EXT_FORCE_INLINE void ranks_blocks(const Acc* z, int64_t ldz, int64_t r, const Acc* d,
                                        int64_t ldd, int64_t n, Acc* g, int64_t ldg) {
  int64_t j = 0;
  for (; j + RB <= r; j += RB) ranks_block<L, Acc, NC, RB>(z + j, ldz, d, ldd, n, g + j * ldg, ldg);
  if constexpr (RB > 1) {
    if (j < r) ranks_blocks<L, Acc, NC, RB / 2>(z + j, ldz, r - j, d, ldd, n, g + j * ldg, ldg);
  }
}

template <Isa L, typename T>
LORA_EXT_FORCE_INLINE void rank_by_cols_body(const acc_of<T>* z, int64_t ldz, const T* x,
                                             int64_t ldx, const acc_of<T>* m, int64_t ldm,
                                             int64_t rows, int64_t K, int64_t r, acc_of<T>* g,
                                             int64_t ldg) {
  using Acc = acc_of<T>;
  constexpr int64_t lanes = Vec<Acc, L>::kLanes;
  // A packed block of x·m: 64 rows x 512 bytes (32 KiB, in L1), read once per block of ranks.
  constexpr int64_t kBlockT = 64, kBlockK = 512 / sizeof(Acc);
  alignas(64) Acc d[kBlockT * kBlockK];
  for (int64_t t0 = 0; t0 < rows; t0 += kBlockT) {
    const int64_t n = std::min(kBlockT, rows - t0);
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t kn = std::min(kBlockK, K - k0), regs = (kn + lanes - 1) / lanes;
      for (int64_t t = 0; t < n; ++t) {
        pack_row(x + (t0 + t) * ldx + k0, m == nullptr ? nullptr : m + (t0 + t) * ldm + k0,
                 d + t * kBlockK, kn, regs * lanes);
      }
      const Acc* zt = z + t0 * ldz;
      column_blocks<L>(regs, [&](int64_t c0, auto nc) {
        ranks_blocks<L, Acc, nc, block_rows<L>(nc)>(zt, ldz, r, d + c0 * lanes, kBlockK, n,
                                                    g + k0 + c0 * lanes, ldg);
      });
    }
  }
}

// ---- (3) rank_to_cols ---------------------------------------------------------------------

template <Isa L>
LORA_EXT_FORCE_INLINE void store_vec(float* out, const typename Vec<float, L>::type& v) {
  Vec<float, L>::store(out, v);
}
template <Isa L>
LORA_EXT_FORCE_INLINE void store_vec(double* out, const typename Vec<double, L>::type& v) {
  Vec<double, L>::store(out, v);
}
// to_bf16 on a vector.
template <Isa L>
LORA_EXT_FORCE_INLINE void store_vec(Bf16* out, const typename Vec<float, L>::type& v) {
  constexpr int kLanes = Vec<float, L>::kLanes;
  using Bits = typename Vec<uint32_t, L>::type;  // (a typedef here would lose its attribute)
  Bits bits;
  std::memcpy(&bits, &v, sizeof bits);
  Bits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const Bits nan = (Bits)(v != v);  // all ones where NaN
  rounded = (rounded & ~nan) | (nan & 0x7FC0u);
  for (int i = 0; i < kLanes; ++i) out[i].bits = static_cast<uint16_t>(rounded[i]);
}
LORA_EXT_FORCE_INLINE float from_acc(float v, float*) { return v; }
LORA_EXT_FORCE_INLINE double from_acc(double v, double*) { return v; }
LORA_EXT_FORCE_INLINE Bf16 from_acc(float v, Bf16*) { return to_bf16(v); }

// out[b, k] = (Σ_{j < r} z[b, j]·a[j, k])·m[b, k] for RB rows and the NC vectors of columns
// from k = 0, of which the first `valid` columns are stored.
template <Isa L, typename Acc, typename Out, int NC, int RB>
LORA_EXT_FORCE_INLINE void cols_block(const Acc* z, int64_t ldz, int64_t r, const Acc* a,
                                      int64_t lda, const Acc* m, int64_t ldm, Out* out,
                                      int64_t ldo, int64_t valid) {
  using V = Vec<Acc, L>;
  typename V::type sum[RB][NC], w[NC];
  LORA_EXT_UNROLL
  for (int b = 0; b < RB; ++b) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) sum[b][c] = typename V::type{};
  }
  for (int64_t j = 0; j < r; ++j) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) V::load(w[c], a + j * lda + c * V::kLanes);
    LORA_EXT_UNROLL
    for (int b = 0; b < RB; ++b) {
      const Acc s = z[b * ldz + j];
      LORA_EXT_UNROLL
      for (int c = 0; c < NC; ++c) sum[b][c] += s * w[c];
    }
  }
  // Through memory for the epilogue: its branches on `valid` kept the accumulators of the
  // loop above on the stack when they read them directly.
  alignas(64) Acc done[RB][NC * V::kLanes];
  LORA_EXT_UNROLL
  for (int b = 0; b < RB; ++b) {
    LORA_EXT_UNROLL
    for (int c = 0; c < NC; ++c) V::store(done[b] + c * V::kLanes, sum[b][c]);
  }
  for (int b = 0; b < RB; ++b) {
    for (int c = 0; c < NC; ++c) {
      const int64_t k = c * V::kLanes;
      if (k + V::kLanes <= valid) {
        typename V::type v, mv;
        V::load(v, done[b] + k);
        if (m != nullptr) {
          V::load(mv, m + b * ldm + k);
          v *= mv;
        }
        store_vec<L>(out + b * ldo + k, v);
      } else {
        for (int64_t i = 0; k + i < valid; ++i) {
          const Acc v = m != nullptr ? done[b][k + i] * m[b * ldm + k + i] : done[b][k + i];
          out[b * ldo + k + i] = from_acc(v, out);
        }
      }
    }
  }
}

// cols_block over n rows: blocks of RB, the rest by halves.
template <Isa L, typename Acc, typename Out, int NC, int RB>
LORA_EXT_FORCE_INLINE void cols_blocks(const Acc* z, int64_t ldz, int64_t n, int64_t r,
                                       const Acc* a, int64_t lda, const Acc* m, int64_t ldm,
                                       Out* out, int64_t ldo, int64_t valid) {
  int64_t b = 0;
  for (; b + RB <= n; b += RB) {
    cols_block<L, Acc, Out, NC, RB>(z + b * ldz, ldz, r, a, lda, m == nullptr ? nullptr : m + b * ldm,
                                    ldm, out + b * ldo, ldo, valid);
  }
  if constexpr (RB > 1) {
    if (b < n) {
      cols_blocks<L, Acc, Out, NC, RB / 2>(z + b * ldz, ldz, n - b, r, a, lda,
                                           m == nullptr ? nullptr : m + b * ldm, ldm,
                                           out + b * ldo, ldo, valid);
    }
  }
}

template <Isa L, typename Out>
LORA_EXT_FORCE_INLINE void rank_to_cols_body(const acc_of<Out>* z, int64_t ldz,
                                             const acc_of<Out>* a, int64_t lda,
                                             const acc_of<Out>* m, int64_t ldm, int64_t rows,
                                             int64_t K, int64_t r, Out* out, int64_t ldo) {
  using Acc = acc_of<Out>;
  constexpr int64_t lanes = Vec<Acc, L>::kLanes;
  const int64_t regs = (K + lanes - 1) / lanes;
  // Column blocks outside: a block's columns of a (r x NC vectors) stay in L1 for every row.
  column_blocks<L>(regs, [&](int64_t c0, auto nc) {
    const int64_t k0 = c0 * lanes;
    cols_blocks<L, Acc, Out, nc, block_rows<L>(nc)>(z, ldz, rows, r, a + k0, lda,
                                                    m == nullptr ? nullptr : m + k0, ldm,
                                                    out + k0, ldo, K - k0);
  });

}

}  // namespace

// ---- the clones, one set per storage type --------------------------------------------------
// (Outside the unnamed namespace: each set defines a dispatcher that only the tests' levels
// bypass, and an unused internal function would be a warning.)
namespace skinny_clones {

#define LORA_EXT_SKINNY_CLONES(T, SUFFIX)                                                     \
  LORA_EXT_ISA_LEVEL_CLONES(                                                                  \
      void, rows_by_rank_##SUFFIX,                                                            \
      (const T* x, int64_t ldx, const acc_of<T>* m, int64_t ldm, const acc_of<T>* p,          \
       int64_t ldp, int64_t rows, int64_t K, int64_t r, acc_of<T> scale, acc_of<T>* y,        \
       int64_t ldy),                                                                          \
      (x, ldx, m, ldm, p, ldp, rows, K, r, scale, y, ldy), rows_by_rank_body)                 \
  LORA_EXT_ISA_LEVEL_CLONES(                                                                  \
      void, rank_by_cols_##SUFFIX,                                                            \
      (const acc_of<T>* z, int64_t ldz, const T* x, int64_t ldx, const acc_of<T>* m,          \
       int64_t ldm, int64_t rows, int64_t K, int64_t r, acc_of<T>* g, int64_t ldg),           \
      (z, ldz, x, ldx, m, ldm, rows, K, r, g, ldg), rank_by_cols_body)
LORA_EXT_SKINNY_CLONES(float, f32)
LORA_EXT_SKINNY_CLONES(double, f64)
LORA_EXT_SKINNY_CLONES(Bf16, bf16)
LORA_EXT_SKINNY_CLONES(F16, f16)
#undef LORA_EXT_SKINNY_CLONES

#define LORA_EXT_RANK_TO_COLS_CLONES(T, SUFFIX)                                               \
  LORA_EXT_ISA_LEVEL_CLONES(                                                                  \
      void, rank_to_cols_##SUFFIX,                                                            \
      (const acc_of<T>* z, int64_t ldz, const acc_of<T>* a, int64_t lda, const acc_of<T>* m,  \
       int64_t ldm, int64_t rows, int64_t K, int64_t r, T* out, int64_t ldo),                 \
      (z, ldz, a, lda, m, ldm, rows, K, r, out, ldo), rank_to_cols_body)
LORA_EXT_RANK_TO_COLS_CLONES(float, f32)
LORA_EXT_RANK_TO_COLS_CLONES(double, f64)
LORA_EXT_RANK_TO_COLS_CLONES(Bf16, bf16)
#undef LORA_EXT_RANK_TO_COLS_CLONES

}  // namespace skinny_clones

#define LORA_EXT_SKINNY_ENTRIES(T, SUFFIX)                                                    \
  void rows_by_rank(const T* x, int64_t ldx, const acc_of<T>* m, int64_t ldm,                 \
                    const acc_of<T>* p, int64_t ldp, int64_t rows, int64_t K, int64_t r,       \
                    acc_of<T> scale, acc_of<T>* y, int64_t ldy, Isa level) {                   \
    skinny_clones::rows_by_rank_##SUFFIX##_at(level)(x, ldx, m, ldm, p, ldp, rows, K, r, scale, y, ldy);     \
  }                                                                                           \
  void rank_by_cols(const acc_of<T>* z, int64_t ldz, const T* x, int64_t ldx,                 \
                    const acc_of<T>* m, int64_t ldm, int64_t rows, int64_t K, int64_t r,       \
                    acc_of<T>* g, int64_t ldg, Isa level) {                                    \
    skinny_clones::rank_by_cols_##SUFFIX##_at(level)(z, ldz, x, ldx, m, ldm, rows, K, r, g, ldg);            \
  }
LORA_EXT_SKINNY_ENTRIES(float, f32)
LORA_EXT_SKINNY_ENTRIES(double, f64)
LORA_EXT_SKINNY_ENTRIES(Bf16, bf16)
LORA_EXT_SKINNY_ENTRIES(F16, f16)
#undef LORA_EXT_SKINNY_ENTRIES

#define LORA_EXT_RANK_TO_COLS_ENTRY(T, SUFFIX)                                                \
  void rank_to_cols(const acc_of<T>* z, int64_t ldz, const acc_of<T>* a, int64_t lda,         \
                    const acc_of<T>* m, int64_t ldm, int64_t rows, int64_t K, int64_t r,       \
                    T* out, int64_t ldo, Isa level) {                                          \
    skinny_clones::rank_to_cols_##SUFFIX##_at(level)(z, ldz, a, lda, m, ldm, rows, K, r, out, ldo);          \
  }
LORA_EXT_RANK_TO_COLS_ENTRY(float, f32)
LORA_EXT_RANK_TO_COLS_ENTRY(double, f64)
LORA_EXT_RANK_TO_COLS_ENTRY(Bf16, bf16)
#undef LORA_EXT_RANK_TO_COLS_ENTRY

}  // namespace cpu
}  // namespace lora_ext
