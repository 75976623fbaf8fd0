#include "dora_dropout.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../core/dora.h"
#include "isa.h"
#include "lora_linear.h"  // dropout_dropped_indices

namespace lora_ext {
namespace cpu {
namespace {

// Output columns per block: a block's accumulators stay in registers, and the block's
// columns of Wᵀ ([in] x kBlock, 256 KB in fp32 at in = 1024) stay in L2 while every row that
// drops an element reads them; one dropped element then costs kBlock FMAs from L2 per block
// instead of a whole row of Wᵀ from memory.
constexpr int64_t kBlock = 64;

// A 64-byte vector of Acc in GCC's generic vector extension: each ISA clone lowers it to its
// own registers (one zmm, two ymm or four xmm). Written this way because the plain loops were
// unrolled over elements and left scalar, with the accumulators on the stack.
template <typename Acc>
struct Vec64 {
  typedef Acc type __attribute__((vector_size(64)));
  static constexpr int64_t kLanes = 64 / sizeof(Acc);
  static constexpr int64_t kPerBlock = kBlock / kLanes;
  // By reference: a vector returned by value changes the ABI between the clones (-Wpsabi).
  static LORA_EXT_FORCE_INLINE void load(type& v, const Acc* p) { std::memcpy(&v, p, sizeof(v)); }
};

// s[t - t0, 0:width] = Σ over row t's dropped k of x[t, k] · wt[k, 0:width] for rows [t0, t1), with
// the values x[t, k] listed as the dropped elements are (vals) and wt pointing at the block's
// first column (row stride ldw).
template <typename Acc>
LORA_EXT_FORCE_INLINE void product_rows_full_body(Acc* s, int64_t lds, const Acc* vals, const Acc* wt,
                                                  int64_t ldw, const DroppedElements* d, int64_t t0,
                                                  int64_t t1, int64_t /*width == kBlock*/) {
  using V = Vec64<Acc>;
  for (int64_t t = t0; t < t1; ++t) {
    typename V::type acc[V::kPerBlock] = {};
    const int32_t* ks = d->row(t);
    const Acc* xr = vals + d->first(t);
    for (int32_t i = 0; i < d->count(t); ++i) {
      const Acc* w = wt + ks[i] * ldw;
      const typename V::type a = typename V::type{} + xr[i];
      for (int64_t j = 0; j < V::kPerBlock; ++j) {
        typename V::type wj;
        V::load(wj, w + j * V::kLanes);
        acc[j] += a * wj;
      }
    }
    std::memcpy(s + (t - t0) * lds, acc, sizeof(acc));
  }
}
template <typename Acc>
LORA_EXT_FORCE_INLINE void product_rows_tail_body(Acc* s, int64_t lds, const Acc* vals, const Acc* wt,
                                                  int64_t ldw, const DroppedElements* d, int64_t t0,
                                                  int64_t t1, int64_t width) {
  for (int64_t t = t0; t < t1; ++t) {
    Acc acc[kBlock] = {};
    const int32_t* ks = d->row(t);
    for (int32_t i = 0; i < d->count(t); ++i) {
      const Acc a = vals[d->first(t) + i];
      const Acc* w = wt + ks[i] * ldw;
      for (int64_t o = 0; o < width; ++o) acc[o] += a * w[o];
    }
    for (int64_t o = 0; o < width; ++o) s[(t - t0) * lds + o] = acc[o];
  }
}

// The lanes of a Vec64 added as a tree of halves (64 -> 32 -> 16 -> 8 bytes): four vector adds
// where a lane-by-lane loop is fifteen dependent scalar adds (the compiler may not reorder them).
template <typename Acc, int kBytes>
LORA_EXT_FORCE_INLINE Acc horizontal_sum_bytes(const void* v) {
  if constexpr (kBytes == static_cast<int>(sizeof(Acc))) {
    Acc a;
    std::memcpy(&a, v, sizeof(a));
    return a;
  } else {
    typedef Acc half_t __attribute__((vector_size(kBytes / 2)));
    half_t lo, hi;
    std::memcpy(&lo, v, sizeof(lo));
    std::memcpy(&hi, static_cast<const char*>(v) + sizeof(lo), sizeof(hi));
    lo += hi;
    return horizontal_sum_bytes<Acc, kBytes / 2>(&lo);
  }
}
template <typename Acc>
LORA_EXT_FORCE_INLINE Acc horizontal_sum(const typename Vec64<Acc>::type& v) {
  return horizontal_sum_bytes<Acc, 64>(&v);
}

// partial[j] += (gy[t, 0:width] ⊙ scale[0:width]) · wt[k_j, 0:width] for the dropped elements j
// of rows [t0, t1) (numbered from the chunk's first), gy, scale and wt at the block's first column.
template <typename Acc>
LORA_EXT_FORCE_INLINE void dots_rows_full_body(Acc* partial, const Acc* gy, int64_t ldg,
                                               const Acc* scale, const Acc* wt, int64_t ldw,
                                               const DroppedElements* d, int64_t t0, int64_t t1,
                                               int64_t /*width == kBlock*/) {
  using V = Vec64<Acc>;
  typename V::type c[V::kPerBlock];
  for (int64_t j = 0; j < V::kPerBlock; ++j) V::load(c[j], scale + j * V::kLanes);
  for (int64_t t = t0; t < t1; ++t) {
    typename V::type g[V::kPerBlock];
    for (int64_t j = 0; j < V::kPerBlock; ++j) {
      V::load(g[j], gy + t * ldg + j * V::kLanes);
      g[j] *= c[j];
    }
    const int32_t* ks = d->row(t);
    for (int32_t i = 0; i < d->count(t); ++i) {
      const Acc* w = wt + ks[i] * ldw;
      typename V::type sum = {}, wj;
      for (int64_t j = 0; j < V::kPerBlock; ++j) {
        V::load(wj, w + j * V::kLanes);
        sum += g[j] * wj;
      }
      *partial++ += horizontal_sum<Acc>(sum);
    }
  }
}
template <typename Acc>
LORA_EXT_FORCE_INLINE void dots_rows_tail_body(Acc* partial, const Acc* gy, int64_t ldg,
                                               const Acc* scale, const Acc* wt, int64_t ldw,
                                               const DroppedElements* d, int64_t t0, int64_t t1,
                                               int64_t width) {
  for (int64_t t = t0; t < t1; ++t) {
    const int32_t* ks = d->row(t);
    for (int32_t i = 0; i < d->count(t); ++i) {
      const Acc* w = wt + ks[i] * ldw;
      Acc sum = 0;
      for (int64_t o = 0; o < width; ++o) sum += (gy[t * ldg + o] * scale[o]) * w[o];
      *partial++ += sum;
    }
  }
}

#define LORA_EXT_DORA_DROPOUT_CLONES(Acc, SUFFIX)                                                  \
  LORA_EXT_ISA_CLONES(void, product_rows_full_##SUFFIX,                                            \
                      (Acc * s, int64_t lds, const Acc* vals, const Acc* wt, int64_t ldw,           \
                       const DroppedElements* d, int64_t t0, int64_t t1, int64_t width),           \
                      (s, lds, vals, wt, ldw, d, t0, t1, width), (product_rows_full_body<Acc>))   \
  LORA_EXT_ISA_CLONES(void, product_rows_tail_##SUFFIX,                                            \
                      (Acc * s, int64_t lds, const Acc* vals, const Acc* wt, int64_t ldw,           \
                       const DroppedElements* d, int64_t t0, int64_t t1, int64_t width),           \
                      (s, lds, vals, wt, ldw, d, t0, t1, width), (product_rows_tail_body<Acc>))   \
  LORA_EXT_ISA_CLONES(void, dots_rows_full_##SUFFIX,                                               \
                      (Acc * partial, const Acc* gy, int64_t ldg, const Acc* scale, const Acc* wt,  \
                       int64_t ldw, const DroppedElements* d, int64_t t0, int64_t t1, int64_t width), \
                      (partial, gy, ldg, scale, wt, ldw, d, t0, t1, width),                       \
                      (dots_rows_full_body<Acc>))                                                   \
  LORA_EXT_ISA_CLONES(void, dots_rows_tail_##SUFFIX,                                               \
                      (Acc * partial, const Acc* gy, int64_t ldg, const Acc* scale, const Acc* wt,  \
                       int64_t ldw, const DroppedElements* d, int64_t t0, int64_t t1, int64_t width), \
                      (partial, gy, ldg, scale, wt, ldw, d, t0, t1, width),                       \
                      (dots_rows_tail_body<Acc>))
LORA_EXT_DORA_DROPOUT_CLONES(float, f32)
LORA_EXT_DORA_DROPOUT_CLONES(double, f64)
#undef LORA_EXT_DORA_DROPOUT_CLONES

void product_rows(float* s, int64_t lds, const float* vals, const float* wt, int64_t ldw,
                  const DroppedElements* d, int64_t t0, int64_t t1, int64_t width) {
  (width == kBlock ? product_rows_full_f32 : product_rows_tail_f32)(s, lds, vals, wt, ldw, d, t0, t1,
                                                                    width);
}
void product_rows(double* s, int64_t lds, const double* vals, const double* wt, int64_t ldw,
                  const DroppedElements* d, int64_t t0, int64_t t1, int64_t width) {
  (width == kBlock ? product_rows_full_f64 : product_rows_tail_f64)(s, lds, vals, wt, ldw, d, t0, t1,
                                                                    width);
}
void dots_rows(float* partial, const float* gy, int64_t ldg, const float* scale, const float* wt, int64_t ldw,
               const DroppedElements* d, int64_t t0, int64_t t1, int64_t width) {
  (width == kBlock ? dots_rows_full_f32 : dots_rows_tail_f32)(partial, gy, ldg, scale, wt, ldw, d, t0, t1,
                                                              width);
}
void dots_rows(double* partial, const double* gy, int64_t ldg, const double* scale, const double* wt,
               int64_t ldw, const DroppedElements* d, int64_t t0, int64_t t1, int64_t width) {
  (width == kBlock ? dots_rows_full_f64 : dots_rows_tail_f64)(partial, gy, ldg, scale, wt, ldw, d, t0, t1,
                                                              width);
}

// The forward's epilogue on a block of rows [t0, t1) x columns [0, width), while it is in cache:
// the low-rank term lr = z[t]·sbt[:, o] (z [rows, r], sbt = s·Bᵀ [r, ldb]), then with S from s
// (rows from t0, row stride kBlock) core::dora_dropout_outputs and the bias; y is written over
// base and hd beside it, both [rows, ld] in the GEMM's dtype T. Pointers are at the block's
// first column (z at row 0).
template <typename Acc, typename T>
LORA_EXT_FORCE_INLINE void epilogue_body(const Acc* s, T* base, T* hd, const Acc* z, int64_t r,
                                         const Acc* sbt, int64_t ldb, const Acc* gm1, const Acc* bias,
                                         int64_t ld, Acc q, int64_t t0, int64_t t1, int64_t width) {
  Acc lr[kBlock];
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t o = 0; o < width; ++o) lr[o] = Acc(0);
    for (int64_t j = 0; j < r; ++j) {
      const Acc zj = z[t * r + j];
      const Acc* b = sbt + j * ldb;
      for (int64_t o = 0; o < width; ++o) lr[o] += zj * b[o];
    }
    const Acc* st = s + (t - t0) * kBlock;
    T* bt = base + t * ld;
    T* ht = hd + t * ld;
    for (int64_t o = 0; o < width; ++o) {
      Acc h, y;
      core::dora_dropout_outputs(static_cast<Acc>(bt[o]), st[o], lr[o], gm1[o], q, h, y);
      ht[o] = static_cast<T>(h);
      bt[o] = static_cast<T>(y + bias[o]);
    }
  }
}
#define LORA_EXT_EPILOGUE_CLONES(Acc, T, SUFFIX)                                                       \
  LORA_EXT_ISA_CLONES(void, epilogue_##SUFFIX,                                                         \
                      (const Acc* s, T* base, T* hd, const Acc* z, int64_t r, const Acc* sbt,          \
                       int64_t ldb, const Acc* gm1, const Acc* bias, int64_t ld, Acc q, int64_t t0,    \
                       int64_t t1, int64_t width),                                                     \
                      (s, base, hd, z, r, sbt, ldb, gm1, bias, ld, q, t0, t1, width),                  \
                      (epilogue_body<Acc, T>))
LORA_EXT_EPILOGUE_CLONES(float, float, f32)
LORA_EXT_EPILOGUE_CLONES(double, double, f64)
LORA_EXT_EPILOGUE_CLONES(float, c10::BFloat16, bf16)  // native bf16 GEMMs (base_gemm_type)
#undef LORA_EXT_EPILOGUE_CLONES

// The clone for (Acc, T); the other pairs never reach here (dropout_corrected_outputs checks).
template <typename Acc, typename T, typename... Args>
void epilogue(Args... args) {
  if constexpr (std::is_same<Acc, float>::value && std::is_same<T, float>::value) {
    epilogue_f32(args...);
  } else if constexpr (std::is_same<Acc, double>::value && std::is_same<T, double>::value) {
    epilogue_f64(args...);
  } else if constexpr (std::is_same<Acc, float>::value && std::is_same<T, c10::BFloat16>::value) {
    epilogue_bf16(args...);
  } else {
    TORCH_CHECK(false, "dora_dropout: no epilogue for this pair of dtypes");
  }
}

int64_t blocks_of(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Rows per task: a task transposes its block of W once, so the fewer row chunks the fewer
// passes over W; chunks still split the rows where the column blocks are few.
constexpr int64_t kTaskRows = 1024;
// Column blocks per task of the backward, whose dot products are partial sums per block: each
// task keeps one partial per dropped element, and the tasks' partials are added in a fixed
// order afterwards, so the result does not depend on the number of threads.
constexpr int64_t kDotsBlocksPerTask = 8;

// wtb[k * kBlock + o] = W[o0 + o, k] for o < width, k < in (W [out, in] row-major, storage type
// T), in Acc: the block of Wᵀ a task works on. Tiles of 16 k keep the reads of each W row short
// and the written lines of wtb in L1; with float accumulators, whole 16 x 16 tiles are
// transposed in registers (below).
template <typename T, typename Acc>
LORA_EXT_FORCE_INLINE void transpose_block_scalar(const T* w, int64_t in, int64_t o0, int64_t o_begin,
                                                  int64_t width, int64_t k_begin, Acc* wtb) {
  constexpr int64_t kTile = 16;
  for (int64_t k0 = 0; k0 < in; k0 += kTile) {
    const int64_t k1 = std::min(in, k0 + kTile);
    // Columns past o_begin for every k; before it, only the k from k_begin (the rest is done).
    for (int64_t o = 0; o < width; ++o) {
      if (o < o_begin && k1 <= k_begin) continue;
      const T* row = w + (o0 + o) * in;
      for (int64_t k = (o < o_begin ? std::max(k0, k_begin) : k0); k < k1; ++k) {
        wtb[k * kBlock + o] = static_cast<Acc>(row[k]);
      }
    }
  }
}

// One stage of a 16 x 16 transpose in registers: rows a and b exchange blocks of h lanes, so
// that after the stages h = 8, 4, 2, 1 row i holds column i (recursive block transpose: the
// off-diagonal blocks swap, then each block is transposed the same way).
typedef float F16x __attribute__((vector_size(64)));
#define LORA_EXT_LO(h, l) (((l) / (2 * (h))) * 2 * (h) + ((l) % (2 * (h)) < (h) ? (l) % (2 * (h)) : 16 + (l) % (2 * (h)) - (h)))
#define LORA_EXT_HI(h, l) (LORA_EXT_LO(h, l) + (h))
#define LORA_EXT_LANES(F, h)                                                                       \
  F(h, 0), F(h, 1), F(h, 2), F(h, 3), F(h, 4), F(h, 5), F(h, 6), F(h, 7), F(h, 8), F(h, 9), F(h, 10), \
      F(h, 11), F(h, 12), F(h, 13), F(h, 14), F(h, 15)
template <int kH>
LORA_EXT_FORCE_INLINE void transpose_stage(F16x (&v)[16]) {
  for (int i = 0; i < 16; ++i) {
    if (i & kH) continue;
    const F16x a = v[i], b = v[i + kH];
    v[i] = __builtin_shufflevector(a, b, LORA_EXT_LANES(LORA_EXT_LO, kH));
    v[i + kH] = __builtin_shufflevector(a, b, LORA_EXT_LANES(LORA_EXT_HI, kH));
  }
}
#undef LORA_EXT_LANES
#undef LORA_EXT_HI
#undef LORA_EXT_LO

template <typename T>
LORA_EXT_FORCE_INLINE F16x load_as_float(const T* p) {
  F16x v;
  if constexpr (std::is_same<T, c10::BFloat16>::value) {  // exact widening: the bits, shifted
    typedef uint16_t U16x __attribute__((vector_size(32)));
    typedef uint32_t U32x __attribute__((vector_size(64)));
    U16x raw;
    std::memcpy(&raw, p, sizeof(raw));
    const U32x wide = __builtin_convertvector(raw, U32x) << 16;
    std::memcpy(&v, &wide, sizeof(v));
  } else {
    float tmp[16];
    for (int l = 0; l < 16; ++l) tmp[l] = static_cast<float>(p[l]);
    std::memcpy(&v, tmp, sizeof(v));
  }
  return v;
}

template <typename T, typename Acc>
LORA_EXT_FORCE_INLINE void transpose_block_body(const T* w, int64_t in, int64_t o0, int64_t width, Acc* wtb) {
  if constexpr (std::is_same<Acc, float>::value) {
    const int64_t o_full = width / 16 * 16, k_full = in / 16 * 16;
    for (int64_t k0 = 0; k0 < k_full; k0 += 16) {
      for (int64_t ob = 0; ob < o_full; ob += 16) {
        F16x v[16];
        for (int i = 0; i < 16; ++i) v[i] = load_as_float(w + (o0 + ob + i) * in + k0);
        transpose_stage<8>(v);
        transpose_stage<4>(v);
        transpose_stage<2>(v);
        transpose_stage<1>(v);
        for (int i = 0; i < 16; ++i) std::memcpy(wtb + (k0 + i) * kBlock + ob, &v[i], sizeof(v[i]));
      }
    }
    transpose_block_scalar(w, in, o0, o_full, width, k_full, wtb);  // the tails
  } else {
    transpose_block_scalar(w, in, o0, 0, width, 0, wtb);
  }
}
#define LORA_EXT_TRANSPOSE_CLONES(T, Acc, SUFFIX)                                                   \
  LORA_EXT_ISA_CLONES(void, transpose_block_##SUFFIX,                                               \
                      (const T* w, int64_t in, int64_t o0, int64_t width, Acc* wtb),                \
                      (w, in, o0, width, wtb), (transpose_block_body<T, Acc>))
LORA_EXT_TRANSPOSE_CLONES(float, float, f32)
LORA_EXT_TRANSPOSE_CLONES(double, double, f64)
LORA_EXT_TRANSPOSE_CLONES(c10::BFloat16, float, bf16)
LORA_EXT_TRANSPOSE_CLONES(c10::Half, float, f16)
#undef LORA_EXT_TRANSPOSE_CLONES

template <typename T, typename Acc>
void transpose_block(const T* w, int64_t in, int64_t o0, int64_t width, Acc* wtb) {
  if constexpr (std::is_same<T, float>::value && std::is_same<Acc, float>::value) {
    transpose_block_f32(w, in, o0, width, wtb);
  } else if constexpr (std::is_same<T, double>::value && std::is_same<Acc, double>::value) {
    transpose_block_f64(w, in, o0, width, wtb);
  } else if constexpr (std::is_same<T, c10::BFloat16>::value && std::is_same<Acc, float>::value) {
    transpose_block_bf16(w, in, o0, width, wtb);
  } else if constexpr (std::is_same<T, c10::Half>::value && std::is_same<Acc, float>::value) {
    transpose_block_f16(w, in, o0, width, wtb);
  } else {
    transpose_block_scalar(w, in, o0, 0, width, 0, wtb);  // W and accumulators of unusual dtypes
  }
}

}  // namespace

DroppedElements::DroppedElements(int64_t rows, int64_t in, const core::DropoutParams& params)
    : start_(static_cast<size_t>(rows) + 1, 0) {
  // Chunks of rows in parallel, each into its own list, then one copy into place: the lists
  // hold a fraction p of the elements, so nothing of x's size is allocated or touched.
  constexpr int64_t kChunk = 16;
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  std::vector<std::vector<int32_t>> lists(static_cast<size_t>(chunks));
  const double p = static_cast<double>(params.threshold) / 4294967296.0;  // the expected share
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<int32_t>& list = lists[c];
      list.reserve(static_cast<size_t>(static_cast<double>(kChunk * in) * (p * 1.25 + 0.01)));
      for (int64_t t = c * kChunk; t < std::min(rows, (c + 1) * kChunk); ++t) {
        const size_t before = list.size();
        dropout_dropped_indices(t * in, in, params, t * in, list);
        start_[t + 1] = static_cast<int64_t>(list.size() - before);  // a count until the scan
      }
    }
  });
  for (int64_t t = 0; t < rows; ++t) start_[t + 1] += start_[t];
  ks_.resize(static_cast<size_t>(start_[rows]));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::copy(lists[c].begin(), lists[c].end(), ks_.begin() + start_[c * kChunk]);
    }
  });
}

void zero_dropped(at::Tensor& t2d, const DroppedElements& dropped) {
  const int64_t rows = t2d.size(0), in = t2d.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t2d.scalar_type(), "lora_ext_zero_dropped", [&] {
    scalar_t* p = t2d.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int32_t* ks = dropped.row(t);
        for (int32_t i = 0; i < dropped.count(t); ++i) p[t * in + ks[i]] = scalar_t(0);
      }
    });
  });
}

at::Tensor DroppedElements::values(const at::Tensor& x2d, at::ScalarType acc) const {
  const at::Tensor x = x2d.contiguous();
  const int64_t rows = x.size(0), in = x.size(1);
  at::Tensor vals = at::empty({total()}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_ext_dropped_values", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES(acc, "lora_ext_dropped_values_acc", [&] {
      scalar_t* v = vals.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, 64, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int32_t* ks = row(t);
          for (int32_t i = 0; i < count(t); ++i) v[first(t) + i] = static_cast<scalar_t>(xs[t * in + ks[i]]);
        }
      });
    });
  });
  return vals;
}

at::Tensor dropout_corrected_outputs(const at::Tensor& x2d, const at::Tensor& weight_in, at::Tensor& base,
                                     const at::Tensor& z, const at::Tensor& scaled_b_t,
                                     const at::Tensor& g_minus_1, const at::Tensor& bias,
                                     double dropout_p, const DroppedElements& dropped) {
  const at::Tensor weight = weight_in.contiguous();
  const int64_t rows = x2d.size(0), in = x2d.size(1), out = weight.size(0), r = z.size(1);
  const at::ScalarType acc = z.scalar_type();
  TORCH_CHECK(base.scalar_type() == acc || base.scalar_type() == at::kBFloat16,
              "dropout_corrected_outputs: base must be in the accumulation dtype or bf16");
  const at::Tensor vals = dropped.values(x2d, acc);
  const at::Tensor zc = z.contiguous(), sbt = scaled_b_t.contiguous(), gm1 = g_minus_1.contiguous();
  const at::Tensor b = bias.defined() ? bias.to(acc).contiguous() : at::zeros({out}, z.options());
  at::Tensor hd = at::empty({rows, out}, base.options());
  if (rows == 0 || out == 0) return hd;
  const int64_t col_blocks = blocks_of(out, kBlock), row_chunks = blocks_of(rows, kTaskRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lora_ext_dropout_corrected_outputs", [&] {
    using W = scalar_t;
    const W* w = weight.const_data_ptr<W>();
    AT_DISPATCH_FLOATING_TYPES(acc, "lora_ext_dropout_corrected_outputs_acc", [&] {
      using Acc = scalar_t;
      const Acc* v = vals.const_data_ptr<Acc>();
      const Acc q = static_cast<Acc>(1.0 - dropout_p);
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, base.scalar_type(), "lora_ext_dropout_corrected_outputs_out", [&] {
        using T = scalar_t;
        T* y = base.mutable_data_ptr<T>();
        T* h = hd.mutable_data_ptr<T>();
        at::parallel_for(0, col_blocks * row_chunks, 1, [&](int64_t first, int64_t last) {
          std::vector<Acc> wtb(static_cast<size_t>(in * kBlock)), sums(static_cast<size_t>(kTaskRows * kBlock));
          for (int64_t task = first; task < last; ++task) {
            const int64_t o0 = (task % col_blocks) * kBlock, t0 = (task / col_blocks) * kTaskRows;
            const int64_t t1 = std::min(rows, t0 + kTaskRows), width = std::min(kBlock, out - o0);
            transpose_block(w, in, o0, width, wtb.data());
            product_rows(sums.data(), kBlock, v, wtb.data(), kBlock, &dropped, t0, t1, width);
            epilogue<Acc, T>(static_cast<const Acc*>(sums.data()), y + o0, h + o0, zc.const_data_ptr<Acc>(), r,
                             sbt.const_data_ptr<Acc>() + o0, out, gm1.const_data_ptr<Acc>() + o0,
                             b.const_data_ptr<Acc>() + o0, out, q, t0, t1, width);
          }
        });
      });
    });
  });
  return hd;
}

void subtract_dropped_dots(at::Tensor& grad_x, const at::Tensor& gy, const at::Tensor& column_scale,
                           const at::Tensor& weight_in, double factor, const DroppedElements& dropped) {
  const at::Tensor weight = weight_in.contiguous();
  const int64_t rows = grad_x.size(0), in = grad_x.size(1), out = weight.size(0);
  if (rows == 0 || in == 0 || dropped.total() == 0) return;
  const at::Tensor g = gy.contiguous(), c = column_scale.contiguous();
  const int64_t col_blocks = blocks_of(out, kBlock), row_chunks = blocks_of(rows, kTaskRows);
  const int64_t groups = std::max<int64_t>(1, blocks_of(col_blocks, kDotsBlocksPerTask));
  // partial[group][j]: the dot product of dropped element j over the columns of one group.
  at::Tensor partial = at::empty({groups, dropped.total()}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lora_ext_subtract_dropped_dots", [&] {
    using T = scalar_t;
    const T* w = weight.const_data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lora_ext_subtract_dropped_dots_acc", [&] {
      using Acc = scalar_t;
      const Acc* gp = g.const_data_ptr<Acc>();
      const Acc* cp = c.const_data_ptr<Acc>();
      Acc* parts = partial.mutable_data_ptr<Acc>();
      at::parallel_for(0, groups * row_chunks, 1, [&](int64_t first, int64_t last) {
        std::vector<Acc> wtb(static_cast<size_t>(in * kBlock));
        for (int64_t task = first; task < last; ++task) {
          const int64_t group = task % groups, t0 = (task / groups) * kTaskRows;
          const int64_t t1 = std::min(rows, t0 + kTaskRows);
          Acc* mine = parts + group * dropped.total() + dropped.first(t0);
          std::fill(mine, parts + group * dropped.total() + dropped.first(t1), Acc(0));
          const int64_t b1 = std::min(col_blocks, (group + 1) * kDotsBlocksPerTask);
          for (int64_t block = group * kDotsBlocksPerTask; block < b1; ++block) {
            const int64_t o0 = block * kBlock, width = std::min(kBlock, out - o0);
            transpose_block(w, in, o0, width, wtb.data());
            dots_rows(mine, gp + o0, out, cp + o0, wtb.data(), kBlock, &dropped, t0, t1, width);
          }
        }
      });
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "lora_ext_subtract_dropped_dots_out", [&] {
        scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
        const Acc f = static_cast<Acc>(factor);
        at::parallel_for(0, rows, 64, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            const int32_t* ks = dropped.row(t);
            for (int32_t i = 0; i < dropped.count(t); ++i) {
              const int64_t j = dropped.first(t) + i;
              Acc sum = parts[j];
              for (int64_t group = 1; group < groups; ++group) sum += parts[group * dropped.total() + j];
              scalar_t& e = gx[t * in + ks[i]];
              e = static_cast<scalar_t>(static_cast<Acc>(e) - f * sum);
            }
          }
        });
      });
    });
  });
}

at::Tensor column_dots(const at::Tensor& a_in, const at::Tensor& b_in) {
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = a.size(0), out = a.size(1);
  const at::ScalarType acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sums = at::empty({out}, a.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lora_ext_column_dots", [&] {
    using T = scalar_t;
    using Acc = std::conditional_t<std::is_same<T, double>::value, double, float>;
    const T* ap = a.const_data_ptr<T>();
    const T* bp = b.const_data_ptr<T>();
    Acc* sp = sums.mutable_data_ptr<Acc>();
    // A block of columns per task, its rows in order: the sums do not depend on the threads.
    at::parallel_for(0, blocks_of(out, kBlock), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t block = b0; block < b1; ++block) {
        const int64_t o0 = block * kBlock, width = std::min(kBlock, out - o0);
        // Two levels (chunks of 128 rows, then the chunks): the rounding error grows with about
        // 128 + rows / 128 terms, not with rows, close to PyTorch's own cascade sum.
        constexpr int64_t kRowsPerChunk = 128;
        Acc s[kBlock] = {};
        for (int64_t c0 = 0; c0 < rows; c0 += kRowsPerChunk) {
          Acc chunk[kBlock] = {};
          for (int64_t t = c0; t < std::min(rows, c0 + kRowsPerChunk); ++t) {
            const T* ar = ap + t * out + o0;
            const T* br = bp + t * out + o0;
            for (int64_t o = 0; o < width; ++o) chunk[o] += static_cast<Acc>(ar[o]) * static_cast<Acc>(br[o]);
          }
          for (int64_t o = 0; o < width; ++o) s[o] += chunk[o];
        }
        std::copy(s, s + width, sp + o0);
      }
    });
  });
  return sums;
}

}  // namespace cpu
}  // namespace lora_ext
