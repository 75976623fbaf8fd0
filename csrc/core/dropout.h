// The dropout mask of lora-ext: a pure function of (seed, offset, element index).
//
// Element i of the logical row-major [rows, cols] view of the input belongs to group
// g = i / 4 and uses lane i % 4 of Philox-4x32-10 with
//   counter = (lo32(g), hi32(g), lo32(offset), hi32(offset)),  key = (lo32(seed), hi32(seed)).
// The element is dropped when that 32-bit word is below threshold = floor(p * 2^32),
// so it is kept with probability 1 - p up to 2^-32. lora_ext/reference.py implements
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

// out[i] = (base ? base[i] : 0) + keep(i) * scale * src[i] over flat indices [begin, end),
// with the arithmetic in Acc. One definition for the CPU loop and the CUDA kernel.
// Load/store convert between the storage type T and Acc.
template <typename T, typename Acc, typename Load, typename Store>
LORA_EXT_HD void dropout_axpy_group(const T* src, const T* base, T* out, uint64_t group,
                                    int64_t begin, int64_t end, unsigned keep, Acc scale,
                                    Load load, Store store) {
  const int64_t first = static_cast<int64_t>(group * 4);
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t i = first + lane;
    if (i < begin || i >= end) continue;
    Acc value = ((keep >> lane) & 1u) ? load(src[i]) * scale : Acc(0);
    if (base != nullptr) value = load(base[i]) + value;
    out[i] = store(value);
  }
}

}  // namespace core
}  // namespace lora_ext
