// The arithmetic of the DoRA weight norm ‖W + s·B·A‖ per output row, torch-free and shared by
// the CPU kernel, the CUDA kernel and the native tests.
//
// Why a direct tiled computation and not the expansion ‖W_i‖² + 2s·B_i·(W·Aᵀ)_i + s²·B_i·(A·Aᵀ)·B_iᵀ:
// when s·B·A nearly cancels W (a trained adapter that removes a direction) the expansion
// subtracts large numbers and loses all relative accuracy, while forming one element
// v = W_ij + Σ_k P_ik·Q_kj at a time in the accumulation type is as accurate as forming
// W + s·B·A in fp32, without ever storing it. Each element of W is read exactly once.
//
// A kernel views its problem as M [m, n] (row-major, leading dimension ldm), P [m, rank]
// and Q [rank, n] in the accumulation type, and needs the sums of v² along rows
// (M = W, P = s·B, Q = A) or along columns (M = Wᵀ stored [in, out], P = Aᵀ, Q = s·Bᵀ).
#pragma once
#include <stdint.h>

#include "philox.h"  // LORA_EXT_HD

namespace lora_ext {
namespace core {

// One element: v = load(m) + Σ_k p[k]·q[k·ldq]. The reference for every tiled path.
template <typename Acc, typename T, typename Load>
LORA_EXT_HD Acc dora_value(T m, const Acc* p, const Acc* q, int64_t ldq, int rank, Load load) {
  Acc v = load(m);
  for (int k = 0; k < rank; ++k) v += p[k] * q[k * ldq];
  return v;
}

// A register tile of R rows by C columns: v[a][c] += Σ_{k < rank} P(a, k) · Q(k, c).
// The k loop is outermost so that every P value is reused C times and every Q value R times
// from registers. load_p / load_q read P and Q wherever a kernel keeps them (global memory,
// shared memory); V may be a scalar or a SIMD vector of columns (then P values broadcast).
template <int R, int C, typename V, typename LoadP, typename LoadQ>
LORA_EXT_HD void dora_tile_update(int rank, LoadP load_p, LoadQ load_q, V (&v)[R][C]) {
  for (int k = 0; k < rank; ++k) {
    V qk[C];
    for (int c = 0; c < C; ++c) qk[c] = load_q(k, c);
    for (int a = 0; a < R; ++a) {
      const auto pa = load_p(a, k);
      for (int c = 0; c < C; ++c) v[a][c] += pa * qk[c];
    }
  }
}

// sq[a][c] += v[a][c]²: per-lane partial sums, reduced once at the end of a row or column,
// keep the summation order short (pairwise-like) and the loops vectorisable.
template <int R, int C, typename Acc>
LORA_EXT_HD void dora_accumulate_squares(const Acc (&v)[R][C], Acc (&sq)[R][C]) {
  for (int a = 0; a < R; ++a) {
    for (int c = 0; c < C; ++c) sq[a][c] += v[a][c] * v[a][c];
  }
}

// DoRA's outputs under dropout at one element, from the base output b = x·Wᵀ (no bias) and the
// product over the dropped elements s = (x ⊙ (1 - m))·Wᵀ, so that drop(x)·Wᵀ = (b - s) / q:
//   hd = (b - s) / q + low_rank   (what the magnitude scales: its gradient needs it)
//   y  = b + low_rank + (g - 1)·hd (y without bias)
// One definition for the CPU epilogue and the CUDA kernel.
template <typename Acc>
LORA_EXT_HD void dora_dropout_outputs(Acc base, Acc dropped_product, Acc low_rank, Acc g_minus_1,
                                      Acc q, Acc& hd, Acc& y) {
  hd = (base - dropped_product) / q + low_rank;
  y = base + low_rank + g_minus_1 * hd;
}

}  // namespace core
}  // namespace lora_ext
