#include "lora_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../core/philox_avx2.h"
#include "isa.h"

namespace lora_ext {
namespace cpu {
namespace {

// A chunk is the elements of one batch of Philox groups; chunks are the unit of work.
constexpr int64_t kChunk = 4 * core::kDropoutBatch;
constexpr int64_t kChunksPerTask = 256;

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Conversions between storage and arithmetic types. The bfloat16 ones are c10's
// round-to-nearest-even written without branches, so the element loops vectorise.
template <typename T>
struct Convert {
  static acc_t<T> load(T v) { return static_cast<acc_t<T>>(v); }
  static T store(acc_t<T> v) { return static_cast<T>(v); }
};
template <>
struct Convert<c10::BFloat16> {
  static float load(c10::BFloat16 v) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static c10::BFloat16 store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint16_t out = std::isnan(f) ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
    return c10::BFloat16(out, c10::BFloat16::from_bits());
  }
};

// The four multipliers of each 4-bit keep pattern of a Philox group: expanding a group is one
// 4-element copy (a per-element select loop compiled scalar and cost more than Philox itself).
template <typename Acc>
struct GroupMultipliers {
  Acc m[16][4];
  Acc scale;
  explicit GroupMultipliers(Acc kept) : scale(kept) {
    for (int bits = 0; bits < 16; ++bits) {
      for (int i = 0; i < 4; ++i) m[bits][i] = ((bits >> i) & 1) ? scale : Acc(0);
    }
  }
};

// The keep bits of the kDropoutBatch groups of chunk `chunk`, by the widest Philox this CPU runs.
LORA_EXT_FORCE_INLINE void chunk_keep_bits(const core::DropoutParams& params, int64_t chunk, unsigned* keep) {
  const uint64_t first_group = static_cast<uint64_t>(chunk) * core::kDropoutBatch;
#ifdef LORA_EXT_HAVE_AVX2_PHILOX
  if (cpu_isa() >= Isa::kAvx512) {
    for (int j = 0; j < core::kDropoutBatch; j += 16) {
      core::dropout_keep_bits_x16_avx512(params.seed, params.offset, params.threshold,
                                         first_group + j, keep + j);
    }
    return;
  }
  if (cpu_isa() >= Isa::kAvx2) {
    for (int j = 0; j < core::kDropoutBatch; j += 8) {
      core::dropout_keep_bits_x8_avx2(params.seed, params.offset, params.threshold,
                                      first_group + j, keep + j);
    }
    return;
  }
#endif
  core::dropout_keep_bits_batch(params.seed, params.offset, params.threshold, first_group, keep);
}

// Multipliers m[e] = keep ? scale : 0 for the elements of chunk `chunk`.
template <typename Acc>
LORA_EXT_FORCE_INLINE void chunk_multipliers(const core::DropoutParams& params, int64_t chunk,
                                             const GroupMultipliers<Acc>& groups, Acc* m) {
#ifdef LORA_EXT_HAVE_AVX2_PHILOX
  static_assert(core::kDropoutBatch % 16 == 0, "the AVX-512 Philox makes 16 groups a call");
  if constexpr (std::is_same_v<Acc, float>) {
    if (cpu_isa() >= Isa::kAvx512) {  // straight to multipliers, in registers
      const uint64_t first_group = static_cast<uint64_t>(chunk) * core::kDropoutBatch;
      for (int j = 0; j < core::kDropoutBatch; j += 16) {
        core::dropout_multipliers_x64_avx512(params.seed, params.offset, params.threshold,
                                             first_group + j, groups.scale, m + 4 * j);
      }
      return;
    }
  }
#endif
  unsigned keep[core::kDropoutBatch];
  chunk_keep_bits(params, chunk, keep);
  for (int j = 0; j < core::kDropoutBatch; ++j) std::memcpy(m + 4 * j, groups.m[keep[j]], sizeof(groups.m[0]));
}

// Same arithmetic as core::dropout_apply_group, over a whole chunk so the loops vectorise.
template <typename T>
LORA_EXT_FORCE_INLINE void dropout_apply_range(const T* x, T* dropped, T* grad, int64_t numel,
                                               const core::DropoutParams& params, int64_t chunk0,
                                               int64_t chunk1) {
  using Acc = acc_t<T>;
  const GroupMultipliers<Acc> groups(static_cast<Acc>(params.scale));
  Acc m[kChunk];
  for (int64_t chunk = chunk0; chunk < chunk1; ++chunk) {
    chunk_multipliers(params, chunk, groups, m);
    const int64_t begin = chunk * kChunk;
    const int64_t count = std::min<int64_t>(kChunk, numel - begin);
    if (dropped != nullptr) {
      const T* xs = x + begin;
      T* out = dropped + begin;
      for (int64_t e = 0; e < count; ++e) out[e] = Convert<T>::store(Convert<T>::load(xs[e]) * m[e]);
    }
    if (grad != nullptr) {
      T* g = grad + begin;
      for (int64_t e = 0; e < count; ++e) g[e] = Convert<T>::store(Convert<T>::load(g[e]) * m[e]);
    }
  }
}

// Wheels target baseline x86-64; these clones let the Philox batch use AVX2/AVX-512 where
// the machine has them (and LORA_EXT_CPU_CAPABILITY allows). Every clone gives the same bits.
#define LORA_EXT_DEFINE_APPLY(T, NAME)                                                      \
  LORA_EXT_ISA_CLONES(void, NAME,                                                           \
                      (const T* x, T* dropped, T* grad, int64_t numel,                      \
                       const core::DropoutParams& params, int64_t c0, int64_t c1),          \
                      (x, dropped, grad, numel, params, c0, c1), dropout_apply_range<T>)
LORA_EXT_DEFINE_APPLY(float, apply_f32)
LORA_EXT_DEFINE_APPLY(double, apply_f64)
LORA_EXT_DEFINE_APPLY(c10::BFloat16, apply_bf16)
LORA_EXT_DEFINE_APPLY(c10::Half, apply_f16)
#undef LORA_EXT_DEFINE_APPLY

template <typename T>
void apply(const T* x, T* d, T* g, int64_t n, const core::DropoutParams& p, int64_t c0,
           int64_t c1) {
  if constexpr (std::is_same_v<T, float>) apply_f32(x, d, g, n, p, c0, c1);
  else if constexpr (std::is_same_v<T, double>) apply_f64(x, d, g, n, p, c0, c1);
  else if constexpr (std::is_same_v<T, c10::BFloat16>) apply_bf16(x, d, g, n, p, c0, c1);
  else apply_f16(x, d, g, n, p, c0, c1);
}

LORA_EXT_FORCE_INLINE void mask_range_body(bool* out, int64_t numel,
                                           const core::DropoutParams& params, int64_t chunk0,
                                           int64_t chunk1) {
  const GroupMultipliers<float> groups(1.0f);
  float m[kChunk];
  for (int64_t chunk = chunk0; chunk < chunk1; ++chunk) {
    chunk_multipliers(params, chunk, groups, m);
    const int64_t begin = chunk * kChunk;
    const int64_t count = std::min<int64_t>(kChunk, numel - begin);
    for (int64_t e = 0; e < count; ++e) out[begin + e] = m[e] != 0.0f;
  }
}
LORA_EXT_ISA_CLONES(void, mask_range,
                    (bool* out, int64_t numel, const core::DropoutParams& params, int64_t c0,
                     int64_t c1),
                    (out, numel, params, c0, c1), mask_range_body)

template <typename Acc>
LORA_EXT_FORCE_INLINE void multipliers_body(Acc* m, int64_t first, int64_t count,
                                            const core::DropoutParams& params) {
  const GroupMultipliers<Acc> groups(static_cast<Acc>(params.scale));
  Acc chunk_m[kChunk];
  const int64_t last = first + count;
  for (int64_t chunk = first / kChunk; chunk * kChunk < last; ++chunk) {
    chunk_multipliers(params, chunk, groups, chunk_m);
    const int64_t begin = std::max(first, chunk * kChunk), end = std::min(last, (chunk + 1) * kChunk);
    for (int64_t e = begin; e < end; ++e) m[e - first] = chunk_m[e - chunk * kChunk];
  }
}
LORA_EXT_ISA_CLONES(void, multipliers_f32,
                    (float* m, int64_t first, int64_t count, const core::DropoutParams& params),
                    (m, first, count, params), multipliers_body<float>)
LORA_EXT_ISA_CLONES(void, multipliers_f64,
                    (double* m, int64_t first, int64_t count, const core::DropoutParams& params),
                    (m, first, count, params), multipliers_body<double>)

// The dropped elements of [first, first + count) from the keep bits, a chunk's 64 as one word
// whose set bits are walked: no per-element scan of multipliers.
LORA_EXT_FORCE_INLINE void dropped_indices_body(int64_t first, int64_t count, const core::DropoutParams& params,
                                                int64_t base, std::vector<int32_t>* out) {
  static_assert(kChunk == 64, "one 64-bit word per chunk");
  unsigned keep[core::kDropoutBatch];
  const int64_t last = first + count;
  for (int64_t chunk = first / kChunk; chunk * kChunk < last; ++chunk) {
    chunk_keep_bits(params, chunk, keep);
    uint64_t dropped = 0;
    for (int j = 0; j < core::kDropoutBatch; ++j) dropped |= static_cast<uint64_t>(~keep[j] & 15u) << (4 * j);
    const int64_t begin = chunk * kChunk;
    if (first > begin) dropped &= ~uint64_t{0} << (first - begin);
    if (last - begin < kChunk) dropped &= (uint64_t{1} << (last - begin)) - 1;
    while (dropped != 0) {
      out->push_back(static_cast<int32_t>(begin + __builtin_ctzll(dropped) - base));
      dropped &= dropped - 1;
    }
  }
}
LORA_EXT_ISA_CLONES(void, dropped_indices,
                    (int64_t first, int64_t count, const core::DropoutParams& params, int64_t base,
                     std::vector<int32_t>* out),
                    (first, count, params, base, out), dropped_indices_body)

template <typename T>
T* data_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<T>() : nullptr;
}

}  // namespace

void dropout_apply(const at::Tensor& x, const at::Tensor& dropped, const at::Tensor& grad,
                   const core::DropoutParams& params) {
  const at::Tensor& like = x.defined() ? x : grad;
  const int64_t numel = like.numel();
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(),
                                  "lora_ext_dropout_apply", [&] {
    const scalar_t* xs = data_or_null<scalar_t>(x);
    scalar_t* d = data_or_null<scalar_t>(dropped);
    scalar_t* g = data_or_null<scalar_t>(grad);
    at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t c0, int64_t c1) {
      apply(xs, d, g, numel, params, c0, c1);
    });
  });
}

void dropout_mask(at::Tensor& mask, const core::DropoutParams& params) {
  bool* out = mask.data_ptr<bool>();
  const int64_t numel = mask.numel();
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t c0, int64_t c1) {
    mask_range(out, numel, params, c0, c1);
  });
}

void dropout_multipliers(float* m, int64_t first, int64_t count, const core::DropoutParams& params) {
  multipliers_f32(m, first, count, params);
}

void dropout_multipliers(double* m, int64_t first, int64_t count, const core::DropoutParams& params) {
  multipliers_f64(m, first, count, params);
}

void dropout_dropped_indices(int64_t first, int64_t count, const core::DropoutParams& params, int64_t base,
                             std::vector<int32_t>& out) {
  dropped_indices(first, count, params, base, &out);
}

}  // namespace cpu
}  // namespace lora_ext
