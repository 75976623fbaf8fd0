// The skinny GEMMs of the fused LoRA linear on CPU (rank r from 1 to a few hundred, any row
// and feature counts) as micro-kernels on raw pointers, one thread each: the caller runs them
// on tiles of rows in parallel. Each is compiled per instruction set (AVX-512, AVX2, portable)
// and picked at run time (isa.h). Storage may be fp32, fp64, bf16 or fp16; the arithmetic is
// in fp32 (fp64 for double storage), and half-precision inputs are converted as they are
// loaded. Every level gives the same bits. Torch-free, so the native tests build them.
//
// Operands named "packed" are row-major with a leading dimension of at least
// padded_cols<Acc>(columns) and zeros in the padding columns: the kernels then run whole
// vectors over a row's tail.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

namespace lora_ext {
namespace cpu {

// The raw bits of bf16 and fp16 elements (layout-compatible with c10's types).
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

// The arithmetic type of a storage type.
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// n rounded up to a whole number of 64-byte vectors of Acc (the widest level's).
template <typename Acc>
constexpr int64_t padded_cols(int64_t n) {
  constexpr int64_t lanes = 64 / sizeof(Acc);
  return (n + lanes - 1) / lanes * lanes;
}

// (1) rows x rank: y[t, j] = scale · Σ_k x[t, k]·m[t, k]·p[k, j] for t < rows, j < r, with
// p packed [K, r] (Aᵀ for the shrink, B for grad_z) and m the dropout multipliers (nullptr:
// all ones). Overwrites y's r columns.
#define LORA_EXT_ROWS_BY_RANK(T)                                                           \
  void rows_by_rank(const T* x, int64_t ldx, const acc_of<T>* m, int64_t ldm,               \
                    const acc_of<T>* p, int64_t ldp, int64_t rows, int64_t K, int64_t r,     \
                    acc_of<T> scale, acc_of<T>* y, int64_t ldy, Isa level = cpu_isa());
// (2) rank x columns, accumulating: g[j, k] += Σ_t z[t, j]·x[t, k]·m[t, k] for j < r, over
// t < rows (grad_A from grad_z and x; grad_Bᵀ from z and grad_y), with g packed [r, K]
// (its padding columns get zeros added).
#define LORA_EXT_RANK_BY_COLS(T)                                                           \
  void rank_by_cols(const acc_of<T>* z, int64_t ldz, const T* x, int64_t ldx,              \
                    const acc_of<T>* m, int64_t ldm, int64_t rows, int64_t K, int64_t r,     \
                    acc_of<T>* g, int64_t ldg, Isa level = cpu_isa());
// (3) rank to columns: out[t, k] = (Σ_j z[t, j]·a[j, k])·m[t, k] for t < rows, k < K, with a
// packed [r, K] (grad_x's low-rank term from grad_z and A). Writes only out's K columns.
#define LORA_EXT_RANK_TO_COLS(T)                                                           \
  void rank_to_cols(const acc_of<T>* z, int64_t ldz, const acc_of<T>* a, int64_t lda,      \
                    const acc_of<T>* m, int64_t ldm, int64_t rows, int64_t K, int64_t r,     \
                    T* out, int64_t ldo, Isa level = cpu_isa());

LORA_EXT_ROWS_BY_RANK(float)
LORA_EXT_ROWS_BY_RANK(double)
LORA_EXT_ROWS_BY_RANK(Bf16)
LORA_EXT_ROWS_BY_RANK(F16)
LORA_EXT_RANK_BY_COLS(float)
LORA_EXT_RANK_BY_COLS(double)
LORA_EXT_RANK_BY_COLS(Bf16)
LORA_EXT_RANK_BY_COLS(F16)
LORA_EXT_RANK_TO_COLS(float)
LORA_EXT_RANK_TO_COLS(double)
LORA_EXT_RANK_TO_COLS(Bf16)
#undef LORA_EXT_ROWS_BY_RANK
#undef LORA_EXT_RANK_BY_COLS
#undef LORA_EXT_RANK_TO_COLS

// Conversions of one element, as the kernels do them: branch-free, so that loops of them
// vectorise; bf16 rounds to nearest even (NaN stays a quiet NaN), as c10 does.
inline float to_float(Bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(F16 v) {
  const uint32_t h = v.bits, sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  const float subnormal = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant · 2^-24
  uint32_t sub_bits;
  std::memcpy(&sub_bits, &subnormal, sizeof sub_bits);
  const uint32_t normal = ((e + 112u) << 23) | (mant << 13), special = 0x7F800000u | (mant << 13);
  const uint32_t bits = sign | (e == 0 ? sub_bits : (e == 31 ? special : normal));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline Bf16 to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return Bf16{static_cast<uint16_t>(f != f ? 0x7FC0u : rounded)};
}

}  // namespace cpu
}  // namespace lora_ext
