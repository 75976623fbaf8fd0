// The instruction set our CPU kernels use, chosen once per process: the best level this CPU
// supports, lowered by the environment variable LORA_EXT_CPU_CAPABILITY (as ATEN_CPU_CAPABILITY
// lowers PyTorch's), so that an AVX-512 machine can run and test the AVX2 and portable paths.
//   LORA_EXT_CPU_CAPABILITY=avx512 | avx2 | default   (unset or empty: the CPU's best)
// A level above the CPU's is lowered to the CPU's (ATen does the same); any other value is an
// error, because a misspelt value in CI would silently test the wrong path.
//
// Kernels pick a per-level clone of one source body with LORA_EXT_ISA_CLONES; target_clones
// cannot be used for that, since it resolves by CPU at load time and never sees the variable.
// Torch-free and header-only: the native tests include it too.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace lora_ext {
namespace cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa level) {
  switch (level) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

// The levels, as the compilers name their parts:
//   avx2:   AVX2 + FMA + F16C (Haswell and later, Zen)
//   avx512: avx2 + AVX-512 F, BW, VL, DQ (Skylake-SP and later, Zen 4)
// (The AVX512-BF16 instructions of the NF4 kernels are checked on top of avx512.)
inline Isa cpu_best_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (!avx2) return Isa::kDefault;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? Isa::kAvx512 : Isa::kAvx2;
#else
  return Isa::kDefault;
#endif
}

// The level for the variable's value on a CPU whose best level is `best`; throws
// std::invalid_argument for a value that names no level.
inline Isa resolve_isa(const char* value, Isa best) {
  if (value == nullptr || value[0] == '\0') return best;
  Isa asked;
  if (std::strcmp(value, "avx512") == 0) {
    asked = Isa::kAvx512;
  } else if (std::strcmp(value, "avx2") == 0) {
    asked = Isa::kAvx2;
  } else if (std::strcmp(value, "default") == 0) {
    asked = Isa::kDefault;
  } else {
    throw std::invalid_argument(std::string("LORA_EXT_CPU_CAPABILITY='") + value +
                                "' is not a CPU capability; expected one of avx512, avx2, "
                                "default (or unset for the best this CPU supports)");
  }
  return asked < best ? asked : best;
}

// The effective level, read once (a function-local static: one per process even though
// every kernel file inlines this).
inline Isa cpu_isa() {
  static const Isa level = resolve_isa(std::getenv("LORA_EXT_CPU_CAPABILITY"), cpu_best_isa());
  return level;
}

}  // namespace cpu
}  // namespace lora_ext

// Per-level clones of one body, picked at run time by cpu_isa(). The body is an always-inline
// function (or template), so each clone compiles it for its own level:
//   LORA_EXT_ISA_CLONES(void, mask_range, (bool* out, int64_t n), (out, n), mask_range_body)
// defines mask_range_avx512, mask_range_avx2, mask_range_default and mask_range, which calls
// the clone of the effective level. Off x86-64 (or off GCC/Clang) there is one plain body.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LORA_EXT_TARGET_avx512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define LORA_EXT_TARGET_avx2 __attribute__((target("avx2,fma,f16c")))
#define LORA_EXT_TARGET_default

// flatten: the helpers the body calls are compiled into each clone too; GCC would otherwise
// call one out-of-line copy, compiled for the baseline, of a helper it chose not to inline.
// (A helper with a target of its own that the clone lacks stays a call.)
#define LORA_EXT_ISA_CLONE(LEVEL, RET, NAME, PARAMS, ARGS, BODY)                  \
  __attribute__((flatten)) LORA_EXT_TARGET_##LEVEL RET NAME##_##LEVEL PARAMS {    \
    return BODY ARGS;                                                              \
  }

#define LORA_EXT_ISA_CLONES(RET, NAME, PARAMS, ARGS, BODY)                 \
  LORA_EXT_ISA_CLONE(avx512, RET, NAME, PARAMS, ARGS, BODY)                \
  LORA_EXT_ISA_CLONE(avx2, RET, NAME, PARAMS, ARGS, BODY)                  \
  LORA_EXT_ISA_CLONE(default, RET, NAME, PARAMS, ARGS, BODY)               \
  RET NAME PARAMS {                                                        \
    switch (::lora_ext::cpu::cpu_isa()) {                                  \
      case ::lora_ext::cpu::Isa::kAvx512: return NAME##_avx512 ARGS;       \
      case ::lora_ext::cpu::Isa::kAvx2: return NAME##_avx2 ARGS;           \
      default: return NAME##_default ARGS;                                 \
    }                                                                      \
  }

// As LORA_EXT_ISA_CLONES, for a body templated on its level (the first template argument, any
// others deduced from the arguments), so that it can size its vectors and register blocks to
// the level's registers. Also defines NAME##_at(level), the clone of a given level (at most
// cpu_best_isa(): the native tests run each clone this CPU can execute).
#define LORA_EXT_ISA_LEVEL_CLONES(RET, NAME, PARAMS, ARGS, BODY)                        \
  LORA_EXT_ISA_CLONE(avx512, RET, NAME, PARAMS, ARGS, BODY<::lora_ext::cpu::Isa::kAvx512>) \
  LORA_EXT_ISA_CLONE(avx2, RET, NAME, PARAMS, ARGS, BODY<::lora_ext::cpu::Isa::kAvx2>)     \
  LORA_EXT_ISA_CLONE(default, RET, NAME, PARAMS, ARGS, BODY<::lora_ext::cpu::Isa::kDefault>) \
  RET(*NAME##_at(::lora_ext::cpu::Isa level)) PARAMS {                                    \
    switch (level) {                                                                      \
      case ::lora_ext::cpu::Isa::kAvx512: return &NAME##_avx512;                          \
      case ::lora_ext::cpu::Isa::kAvx2: return &NAME##_avx2;                              \
      default: return &NAME##_default;                                                   \
    }                                                                                     \
  }                                                                                       \
  RET NAME PARAMS { return NAME##_at(::lora_ext::cpu::cpu_isa()) ARGS; }
#else
#define LORA_EXT_ISA_CLONES(RET, NAME, PARAMS, ARGS, BODY) \
  RET NAME PARAMS { return BODY ARGS; }
#define LORA_EXT_ISA_LEVEL_CLONES(RET, NAME, PARAMS, ARGS, BODY)       \
  RET NAME PARAMS { return BODY<::lora_ext::cpu::Isa::kDefault> ARGS; } \
  RET(*NAME##_at(::lora_ext::cpu::Isa)) PARAMS { return &NAME; }
#endif
