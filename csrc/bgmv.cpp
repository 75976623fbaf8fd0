// BGMV / SGMV (many LoRA adapters in one batch): argument checks, index validation on the
// CPU, and dispatch to the CPU kernels (csrc/cpu/bgmv.cpp) or the CUDA kernels
// (csrc/cuda/bgmv.cu). The ops are functional: expand returns y plus the adapter terms.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "aten_glue.h"
#include "cpu/bgmv.h"

#ifdef LORA_EXT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/bgmv.cuh"
#endif

namespace lora_ext {
namespace {

using at::Tensor;

// The CUDA expand kernel stages one row of z (r accumulators) in shared memory.
constexpr int64_t kMaxRank = 4096;

void check_floating(const char* op, const Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", type);
}

void check_same(const char* op, const Tensor& a, const char* a_name, const Tensor& b,
                const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " has dtype ", b.scalar_type(),
              " but ", a_name, " has ", a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": ", b_name, " is on ", b.device(), " but ", a_name,
              " is on ", a.device());
}

Tensor as_index(const char* op, const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
              " must be int64 or int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but the data is on ", like.device());
  return t.to(at::kLong).contiguous();  // no copy when already int64 and contiguous
}

// Per-row adapter indices: [T] with values in [-1, num_adapters) (checked on the CPU).
Tensor check_idx(const char* op, const Tensor& idx, int64_t rows, int64_t num_adapters,
                 const Tensor& like) {
  Tensor slots = as_index(op, idx, "idx", like);
  TORCH_CHECK(slots.numel() == rows, op, ": idx must have one entry per row (", rows, "), got ",
              slots.numel());
  if (slots.is_cpu()) {
    const int64_t* p = slots.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < rows; ++t) {
      TORCH_CHECK(p[t] >= -1 && p[t] < num_adapters, op, ": idx[", t, "] = ", p[t],
                  " is out of range: expected -1 (no adapter) or an adapter slot in [0, ",
                  num_adapters, ")");
    }
  }
  return slots;
}

// SGMV segments: starts [S + 1] nondecreasing within [0, rows], adapters [S] in [-1, N).
std::pair<Tensor, Tensor> check_segments(const char* op, const Tensor& seg_starts,
                                         const Tensor& seg_adapter, int64_t rows,
                                         int64_t num_adapters, const Tensor& like) {
  Tensor starts = as_index(op, seg_starts, "seg_starts", like);
  Tensor adapters = as_index(op, seg_adapter, "seg_adapter", like);
  TORCH_CHECK(starts.numel() == adapters.numel() + 1, op,
              ": seg_starts must have one more entry than seg_adapter (segment s covers rows "
              "seg_starts[s] to seg_starts[s + 1]), got ", starts.numel(), " and ",
              adapters.numel());
  if (starts.is_cpu()) {
    const int64_t* s = starts.const_data_ptr<int64_t>();
    const int64_t* a = adapters.const_data_ptr<int64_t>();
    const int64_t n = adapters.numel();
    TORCH_CHECK(s[0] >= 0 && s[n] <= rows, op, ": seg_starts must lie in [0, ", rows,
                "], got first ", s[0], " and last ", s[n]);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(s[i] <= s[i + 1], op, ": seg_starts must be nondecreasing, but seg_starts[",
                  i, "] = ", s[i], " > seg_starts[", i + 1, "] = ", s[i + 1]);
      TORCH_CHECK(a[i] >= -1 && a[i] < num_adapters, op, ": seg_adapter[", i, "] = ", a[i],
                  " is out of range: expected -1 (no adapter) or an adapter slot in [0, ",
                  num_adapters, ")");
    }
  }
  return {starts, adapters};
}

void check_shrink(const char* op, const Tensor& x, const Tensor& lora_A) {
  check_floating(op, x, "x");
  check_same(op, x, "x", lora_A, "lora_A");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, in], got shape ", x.sizes());
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(2) == x.size(1), op, ": lora_A must be [N, r, ",
              x.size(1), "], got ", lora_A.sizes());
  TORCH_CHECK(lora_A.size(1) <= kMaxRank, op, ": rank ", lora_A.size(1), " exceeds ", kMaxRank);
}

void check_expand(const char* op, const Tensor& y, const Tensor& z, const Tensor& lora_B,
                  const Tensor& scale) {
  check_floating(op, y, "y");
  check_same(op, y, "y", z, "z");
  check_same(op, y, "y", lora_B, "lora_B");
  TORCH_CHECK(y.dim() == 2 && z.dim() == 2 && y.size(0) == z.size(0), op,
              ": y must be [T, out] and z [T, r] with the same T, got ", y.sizes(), " and ",
              z.sizes());
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.size(1) == y.size(1) && lora_B.size(2) == z.size(1), op,
              ": lora_B must be [N, ", y.size(1), ", ", z.size(1), "], got ", lora_B.sizes());
  TORCH_CHECK(z.size(1) <= kMaxRank, op, ": rank ", z.size(1), " exceeds ", kMaxRank);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                  scale.size(0) == lora_B.size(0),
              op, ": scale must be float32 [", lora_B.size(0), "], got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(scale.device() == y.device(), op, ": scale is on ", scale.device(), " but y is on ",
              y.device());
}

// The shared tail of both variants. Exactly one of slots (BGMV) or (starts, adapters)
// (SGMV) is defined.
Tensor shrink_impl(const Tensor& x, const Tensor& lora_A, const Tensor& slots,
                   const Tensor& starts, const Tensor& adapters) {
  const Tensor xc = x.contiguous(), ac = lora_A.contiguous();
  Tensor z = at::zeros({x.size(0), lora_A.size(1)}, x.options());
  if (x.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const bool bgmv = slots.defined();
    const cuda::RowAdapters rows{
        bgmv ? slots.const_data_ptr<int64_t>() : nullptr,
        bgmv ? nullptr : starts.const_data_ptr<int64_t>(),
        bgmv ? nullptr : adapters.const_data_ptr<int64_t>(),
        bgmv ? -1 : adapters.numel(), lora_A.size(0)};
    C10_CUDA_CHECK(cuda::launch_bgmv_shrink(cuda_dtype(x.scalar_type()), xc.const_data_ptr(),
                                            ac.const_data_ptr(), z.mutable_data_ptr(), x.size(0),
                                            x.size(1), lora_A.size(1), rows,
                                            c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    const cpu::RowGroups groups = slots.defined()
                                      ? cpu::group_rows_by_slot(slots, lora_A.size(0))
                                      : cpu::group_rows_by_segment(starts, adapters);
    cpu::grouped_shrink(xc, ac, groups, z);
  }
  return z;
}

Tensor expand_impl(const Tensor& y, const Tensor& z, const Tensor& lora_B, const Tensor& scale,
                   const Tensor& slots, const Tensor& starts, const Tensor& adapters) {
  Tensor out = y.clone(at::MemoryFormat::Contiguous);
  const Tensor zc = z.contiguous(), bc = lora_B.contiguous(), sc = scale.contiguous();
  if (y.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(y.device());
    const bool bgmv = slots.defined();
    const cuda::RowAdapters rows{
        bgmv ? slots.const_data_ptr<int64_t>() : nullptr,
        bgmv ? nullptr : starts.const_data_ptr<int64_t>(),
        bgmv ? nullptr : adapters.const_data_ptr<int64_t>(),
        bgmv ? -1 : adapters.numel(), lora_B.size(0)};
    C10_CUDA_CHECK(cuda::launch_bgmv_expand(cuda_dtype(y.scalar_type()), out.mutable_data_ptr(),
                                            zc.const_data_ptr(), bc.const_data_ptr(),
                                            sc.const_data_ptr<float>(), y.size(0), y.size(1),
                                            z.size(1), rows, c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    const cpu::RowGroups groups = slots.defined()
                                      ? cpu::group_rows_by_slot(slots, lora_B.size(0))
                                      : cpu::group_rows_by_segment(starts, adapters);
    cpu::grouped_expand(out, zc, bc, sc, groups);
  }
  return out;
}

Tensor lora_shrink(const Tensor& x, const Tensor& lora_A, const Tensor& idx) {
  check_shrink("lora_shrink", x, lora_A);
  const Tensor slots = check_idx("lora_shrink", idx, x.size(0), lora_A.size(0), x);
  return shrink_impl(x, lora_A, slots, Tensor(), Tensor());
}

Tensor lora_expand(const Tensor& y, const Tensor& z, const Tensor& lora_B, const Tensor& idx,
                   const Tensor& scale) {
  check_expand("lora_expand", y, z, lora_B, scale);
  const Tensor slots = check_idx("lora_expand", idx, y.size(0), lora_B.size(0), y);
  return expand_impl(y, z, lora_B, scale, slots, Tensor(), Tensor());
}

Tensor lora_shrink_sgmv(const Tensor& x, const Tensor& lora_A, const Tensor& seg_starts,
                        const Tensor& seg_adapter) {
  check_shrink("lora_shrink_sgmv", x, lora_A);
  const auto seg = check_segments("lora_shrink_sgmv", seg_starts, seg_adapter, x.size(0),
                                  lora_A.size(0), x);
  return shrink_impl(x, lora_A, Tensor(), seg.first, seg.second);
}

Tensor lora_expand_sgmv(const Tensor& y, const Tensor& z, const Tensor& lora_B,
                        const Tensor& seg_starts, const Tensor& seg_adapter, const Tensor& scale) {
  check_expand("lora_expand_sgmv", y, z, lora_B, scale);
  const auto seg = check_segments("lora_expand_sgmv", seg_starts, seg_adapter, y.size(0),
                                  lora_B.size(0), y);
  return expand_impl(y, z, lora_B, scale, Tensor(), seg.first, seg.second);
}

}  // namespace
}  // namespace lora_ext

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_shrink", &lora_ext::lora_shrink);
  m.impl("lora_expand", &lora_ext::lora_expand);
  m.impl("lora_shrink_sgmv", &lora_ext::lora_shrink_sgmv);
  m.impl("lora_expand_sgmv", &lora_ext::lora_expand_sgmv);
}

#ifdef LORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_shrink", &lora_ext::lora_shrink);
  m.impl("lora_expand", &lora_ext::lora_expand);
  m.impl("lora_shrink_sgmv", &lora_ext::lora_shrink_sgmv);
  m.impl("lora_expand_sgmv", &lora_ext::lora_expand_sgmv);
}
#endif
