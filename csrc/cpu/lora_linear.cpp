#include "lora_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace lora_ext {
namespace cpu {
namespace {

// Groups of four elements share one Philox call; a chunk of this many groups is the
// unit of parallel work (big enough to amortise scheduling, small enough to balance).
constexpr int64_t kGroupsPerTask = 4096;

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

template <typename T>
void dropout_axpy_typed(const T* src, const T* base, T* out, int64_t numel,
                        const core::DropoutParams& params) {
  using Acc = acc_t<T>;
  const Acc scale = static_cast<Acc>(params.scale);
  auto load = [](T v) { return static_cast<Acc>(v); };
  auto store = [](Acc v) { return static_cast<T>(v); };
  const int64_t groups = (numel + 3) / 4;
  at::parallel_for(0, groups, kGroupsPerTask, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const unsigned keep = core::dropout_keep_bits(params.seed, params.offset,
                                                    params.threshold, static_cast<uint64_t>(g));
      core::dropout_axpy_group(src, base, out, static_cast<uint64_t>(g), 0, numel, keep, scale,
                               load, store);
    }
  });
}

}  // namespace

void dropout_axpy(const at::Tensor& src, const at::Tensor& base, at::Tensor& out,
                  const core::DropoutParams& params) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  "lora_ext_dropout_axpy", [&] {
    dropout_axpy_typed<scalar_t>(src.const_data_ptr<scalar_t>(),
                                 base.defined() ? base.const_data_ptr<scalar_t>() : nullptr,
                                 out.mutable_data_ptr<scalar_t>(), src.numel(), params);
  });
}

void dropout_mask(at::Tensor& mask, const core::DropoutParams& params) {
  bool* out = mask.mutable_data_ptr<bool>();
  const int64_t numel = mask.numel();
  const int64_t groups = (numel + 3) / 4;
  at::parallel_for(0, groups, kGroupsPerTask, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const unsigned keep = core::dropout_keep_bits(params.seed, params.offset,
                                                    params.threshold, static_cast<uint64_t>(g));
      for (int lane = 0; lane < 4 && g * 4 + lane < numel; ++lane) {
        out[g * 4 + lane] = (keep >> lane) & 1u;
      }
    }
  });
}

}  // namespace cpu
}  // namespace lora_ext
