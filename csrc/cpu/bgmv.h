// CPU kernels of the BGMV / SGMV family (many adapters in one batch).
#pragma once
#include <ATen/core/Tensor.h>

namespace lora_ext {
namespace cpu {

// Rows grouped by adapter: rows order[offsets[g] .. offsets[g + 1]) all use adapter
// slots_of_group[g] (int64 tensors on the CPU). BGMV builds the groups with a counting sort
// of idx, SGMV takes its segments as they are; both then run the same per-group GEMMs.
struct RowGroups {
  at::Tensor order;    // [rows in groups]
  at::Tensor offsets;  // [groups + 1]
  at::Tensor slots;    // [groups]
};

// Groups of the rows with a valid slot (slots[t] in [0, num_adapters), -1 = no adapter).
RowGroups group_rows_by_slot(const at::Tensor& slots, int64_t num_adapters);
// Groups of the SGMV segments (validated) whose adapter is not -1.
RowGroups group_rows_by_segment(const at::Tensor& seg_starts, const at::Tensor& seg_adapter);

// z [T, r] (contiguous, zero-filled by the caller) receives x[t] . A[slot]ᵀ for grouped rows.
void grouped_shrink(const at::Tensor& x, const at::Tensor& lora_A, const RowGroups& groups,
                    at::Tensor& z);
// y [T, out] (contiguous) += scale[slot] * z[t] . B[slot]ᵀ for grouped rows, in place.
void grouped_expand(at::Tensor& y, const at::Tensor& z, const at::Tensor& lora_B,
                    const at::Tensor& scale, const RowGroups& groups);

}  // namespace cpu
}  // namespace lora_ext
