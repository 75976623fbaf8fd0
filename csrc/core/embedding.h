// The arithmetic of the Embedding LoRA kernels, shared by the CPU and CUDA kernels.
// Torch-free, so the native tests exercise what the GPU runs.
//
//   forward:  y[t, o] = W[v, o] + s * sum_j A[j, v] * B[o, j]        v = idx[t]
//   backward: segment sums over the tokens grouped by index (sorted, stable):
//             grad_A[j, v] = sum_{t: idx[t] = v} grad_z[t, j]     grad_z = s * g @ B
//             grad_W[v, o] = sum_{t: idx[t] = v} g[t, o]
//
// A is [r, num_embeddings] (PEFT's lora_embedding_A), so a token reads one column of it:
// r values, staged once per token as Acc and reused for every output of the row. Sums
// accumulate in Acc (float, double for fp64) and each stored value is rounded once, so a
// half-precision table with fp32 adapters (PEFT's autocast_adapter_dtype) rounds only at
// the end, where PEFT rounds the same sum.
#pragma once
#include <stdint.h>

#include "philox.h"  // LORA_EXT_HD

namespace lora_ext {
namespace core {

template <typename T>
struct EmbeddingAcc {
  using type = float;
};
template <>
struct EmbeddingAcc<double> {
  using type = double;
};

// Whether a token's index names a row of a table of `rows` rows.
LORA_EXT_HD bool embedding_row_ok(int64_t index, int64_t rows) { return index >= 0 && index < rows; }

// sum_{j < r} a[j] * load(bt[j * ld]), j ascending: the adapter term of one output, with
// bt pointing at B[o, 0] of the transposed B (Bᵀ [r, ld]).
template <typename Acc, typename TB, typename Load>
LORA_EXT_HD Acc embedding_lora_term(const Acc* a, const TB* bt, int64_t ld, int64_t r, Load load) {
  Acc sum = Acc(0);
  for (int64_t j = 0; j < r; ++j) sum += a[j] * load(bt[j * ld]);
  return sum;
}

// One output row on the host: y[o] = store(load(w[o]) + s * sum_j a[j] * bt[j, o]) for o < out,
// bt the Acc copy of Bᵀ [r, ld]. Outputs go in blocks whose partial sums stay in registers
// across the r terms (each taken in the order of embedding_lora_term), so the loops vectorise.
template <typename TW, typename Acc, typename LoadW, typename StoreW>
inline void embedding_lora_row(const TW* w, const Acc* a, const Acc* bt, int64_t ld, int64_t r,
                               int64_t out, Acc s, TW* y, LoadW load, StoreW store) {
  constexpr int64_t kBlock = 32;
  int64_t o0 = 0;
  for (; o0 + kBlock <= out; o0 += kBlock) {
    Acc part[kBlock];
    for (int64_t k = 0; k < kBlock; ++k) part[k] = Acc(0);
    for (int64_t j = 0; j < r; ++j) {
      const Acc aj = a[j];
      const Acc* row = bt + j * ld + o0;
      for (int64_t k = 0; k < kBlock; ++k) part[k] += aj * row[k];
    }
    for (int64_t k = 0; k < kBlock; ++k) y[o0 + k] = store(load(w[o0 + k]) + s * part[k]);
  }
  for (int64_t o = o0; o < out; ++o) {
    const Acc term = embedding_lora_term(a, bt + o, ld, r, [](Acc v) { return v; });
    y[o] = store(load(w[o]) + s * term);
  }
}

// The segment of sorted position p: where it starts (p when p is its head) and ends.
// sorted holds the indices in nondecreasing order.
template <typename I>
LORA_EXT_HD bool embedding_segment_head(const I* sorted, int64_t p) {
  return p == 0 || sorted[p] != sorted[p - 1];
}

template <typename I>
LORA_EXT_HD int64_t embedding_segment_end(const I* sorted, int64_t count, int64_t p) {
  int64_t q = p + 1;
  while (q < count && sorted[q] == sorted[p]) ++q;
  return q;
}

// sum_{q in [begin, end)} load(src[perm[q] * ld + c]), q ascending (the tokens of one index
// in their original order, as a stable sort leaves them).
template <typename Acc, typename T, typename Load>
LORA_EXT_HD Acc embedding_segment_sum(const T* src, int64_t ld, int64_t c, const int64_t* perm,
                                      int64_t begin, int64_t end, Load load) {
  Acc sum = Acc(0);
  for (int64_t q = begin; q < end; ++q) sum += load(src[perm[q] * ld + c]);
  return sum;
}

}  // namespace core
}  // namespace lora_ext
