// CUDA kernels of the Embedding LoRA family: raw pointers and a stream in, no torch.
// Launch shapes depend only on sizes, never on index values; nothing is allocated.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "lora_linear.cuh"  // DType

namespace lora_ext {
namespace cuda {

// y [rows, out] (contiguous, weight_dtype) row t = weight[v] + scaling * lora_A[:, v] . Bᵀ,
// v = idx[t] (idx null: v = t, every row in order, rows = V: the merged weight W + s·(B·A) of
// a LoRA conv, with B's rows as the staged values): weight [V, out] with row stride ldw, lora_A [r, V] with strides (sa0, sa1),
// bt = Bᵀ [r, out] contiguous; lora_A and bt in adapter_dtype, which is weight_dtype or
// kFloat32 over a half weight. Accumulates in float (double for kFloat64). A row whose index
// lies outside [0, V) is written as zeros (the kernel cannot raise; nothing out of bounds is
// read). r * sizeof(accumulator) bytes of dynamic shared memory: r <= 12288 for fp32.
cudaError_t launch_embedding_lora_forward(DType weight_dtype, DType adapter_dtype,
                                          const int64_t* idx, const void* weight, int64_t ldw,
                                          const void* lora_A, int64_t sa0, int64_t sa1,
                                          const void* bt, double scaling, void* y, int64_t rows,
                                          int64_t num_embeddings, int64_t out, int64_t r,
                                          cudaStream_t stream);

// Segment sums over stable-sorted token indices (sorted [count] nondecreasing, perm [count]
// the tokens in that order): for each index v in [0, num_rows) present in sorted,
//   dst[v * stride_v + c * stride_c] = scaling * sum_{q in v's segment} src[perm[q] * cols + c]
// for c < cols, summed in token order (deterministic, no atomics) in float (double for
// kFloat64) and rounded once. src is dst_dtype, or kFloat32 into a half dst. Other dst
// entries are left alone.
cudaError_t launch_embedding_segment_sums(DType src_dtype, DType dst_dtype, const void* src,
                                          int64_t cols, const int64_t* sorted,
                                          const int64_t* perm, int64_t count, int64_t num_rows,
                                          double scaling, void* dst, int64_t stride_v,
                                          int64_t stride_c, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
