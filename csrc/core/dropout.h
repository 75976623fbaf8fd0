// The dropout mask of lora-ext: a pure function of (seed, offset, element index).
//
// Element i of the logical row-major [rows, cols] view of the input belongs to group
// g = i / 4 and uses lane i % 4 of Philox-4x32-10 with
//   counter = (lo32(g), hi32(g), lo32(offset), hi32(offset)),  key = (lo32(seed), hi32(seed)).
// The element is dropped when that 32-bit word is below threshold = floor(p * 2^32),
// so it is kept with probability 1 - p up to 2^-32. lora_ext/reference/ implements
// the same function in plain PyTorch; the CPU kernel, the CUDA kernel and the reference
// agree bit for bit.
#pragma once
#include "philox.h"

namespace lora_ext {
namespace core {

struct DropoutParams {
  uint64_t seed;
  uint64_t offset;
  uint32_t threshold;  // words below it are dropped
  double scale;        // 1 / (1 - p), applied to kept elements
};

// p must lie in [0, 1); callers validate it. Truncation matches Python's int(p * 2**32).
inline DropoutParams make_dropout_params(double p, int64_t seed, int64_t offset) {
  DropoutParams params;
  params.seed = static_cast<uint64_t>(seed);
  params.offset = static_cast<uint64_t>(offset);
  params.threshold = static_cast<uint32_t>(p * 4294967296.0);
  params.scale = 1.0 / (1.0 - p);
  return params;
}

// Bit k of the result is 1 when element 4 * group + k is kept.
LORA_EXT_HD unsigned dropout_keep_bits(uint64_t seed, uint64_t offset, uint32_t threshold,
                                       uint64_t group) {
  Philox4 counter;
  counter.v[0] = static_cast<uint32_t>(group);
  counter.v[1] = static_cast<uint32_t>(group >> 32);
  counter.v[2] = static_cast<uint32_t>(offset);
  counter.v[3] = static_cast<uint32_t>(offset >> 32);
  const Philox4 word = philox4x32_10(counter, static_cast<uint32_t>(seed),
                                     static_cast<uint32_t>(seed >> 32));
  return (word.v[0] >= threshold ? 1u : 0u) | (word.v[1] >= threshold ? 2u : 0u) |
         (word.v[2] >= threshold ? 4u : 0u) | (word.v[3] >= threshold ? 8u : 0u);
}

// The dropout pass of one group of four elements (flat indices 4*group .. 4*group+3, those
// below numel), fused for the two places it is needed:
//   dropped[i] = x[i] * m[i]     (drop(x); skipped when dropped is null)
//   grad[i]   *= m[i]            (dropout backward, in place; skipped when grad is null)
// with m[i] = keep(i) ? 1 / (1 - p) : 0. Arithmetic in Acc; Load/Store convert from and to
// the storage type T. One definition for the CPU loops and the CUDA kernel.
template <typename T, typename Acc, typename Load, typename Store>
LORA_EXT_HD void dropout_apply_group(unsigned keep, uint64_t group, int64_t numel, Acc scale,
                                     const T* x, T* dropped, T* grad, Load load, Store store) {
  const int64_t first = static_cast<int64_t>(group * 4);
  for (int lane = 0; lane < 4 && first + lane < numel; ++lane) {
    const int64_t i = first + lane;
    const Acc m = ((keep >> lane) & 1u) ? scale : Acc(0);
    if (dropped != nullptr) dropped[i] = store(load(x[i]) * m);
    if (grad != nullptr) grad[i] = store(load(grad[i]) * m);
  }
}

// Keep bits of kDropoutBatch consecutive groups, written as structure-of-arrays loops so
// that a host compiler vectorises the 32x32->64 multiplies across groups. Computes exactly
// dropout_keep_bits(seed, offset, threshold, first_group + j) for every j (tested natively).
constexpr int kDropoutBatch = 16;

// Forced inlining lets the CPU kernels' per-ISA clones (LORA_EXT_ISA_CLONES) vectorise this body.
#if defined(__GNUC__)
#define LORA_EXT_FORCE_INLINE inline __attribute__((always_inline))
#else
#define LORA_EXT_FORCE_INLINE inline
#endif

LORA_EXT_FORCE_INLINE void dropout_keep_bits_batch(uint64_t seed, uint64_t offset, uint32_t threshold,
                                    uint64_t first_group, unsigned* keep) {
  uint32_t c0[kDropoutBatch], c1[kDropoutBatch], c2[kDropoutBatch], c3[kDropoutBatch];
  for (int j = 0; j < kDropoutBatch; ++j) {
    const uint64_t group = first_group + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(group);
    c1[j] = static_cast<uint32_t>(group >> 32);
    c2[j] = static_cast<uint32_t>(offset);
    c3[j] = static_cast<uint32_t>(offset >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int j = 0; j < kDropoutBatch; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[j];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c0[j] = n0;
      c1[j] = static_cast<uint32_t>(p1);
      c2[j] = n2;
      c3[j] = static_cast<uint32_t>(p0);
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int j = 0; j < kDropoutBatch; ++j) {
    keep[j] = (c0[j] >= threshold ? 1u : 0u) | (c1[j] >= threshold ? 2u : 0u) |
              (c2[j] >= threshold ? 4u : 0u) | (c3[j] >= threshold ? 8u : 0u);
  }
}


}  // namespace core
}  // namespace lora_ext
