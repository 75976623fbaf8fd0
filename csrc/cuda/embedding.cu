#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/embedding.h"
#include "convert.cuh"
#include "embedding.cuh"
#include "launch.cuh"

namespace lora_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // one thread per (row, output feature) / (position, column)

template <typename T>
using AccOf = typename core::EmbeddingAcc<T>::type;

// grid (rows, ceil(out / kThreads)); the r adapter values of row t's index are staged once
// per block in shared memory.
template <typename TW, typename TA>
__global__ void forward_kernel(const int64_t* __restrict__ idx, const TW* __restrict__ weight,
                               int64_t ldw, const TA* __restrict__ A, int64_t sa0, int64_t sa1,
                               const TA* __restrict__ bt, AccOf<TW> scaling, TW* __restrict__ y,
                               int64_t num_embeddings, int64_t out, int64_t r) {
  using Acc = AccOf<TW>;
  extern __shared__ unsigned char smem_raw[];
  Acc* a = reinterpret_cast<Acc*>(smem_raw);
  const int64_t t = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t v = idx != nullptr ? idx[t] : t;
  if (!core::embedding_row_ok(v, num_embeddings)) {  // the whole block agrees
    if (o < out) y[t * out + o] = Convert<TW>::store(Acc(0));
    return;
  }
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) a[j] = Convert<TA>::load(A[j * sa0 + v * sa1]);
  __syncthreads();
  if (o >= out) return;
  const Acc term = core::embedding_lora_term(a, bt + o, out, r, [](TA b) { return static_cast<Acc>(Convert<TA>::load(b)); });
  y[t * out + o] = Convert<TW>::store(Convert<TW>::load(weight[v * ldw + o]) + scaling * term);
}

// grid (count, ceil(cols / kThreads)); the head position of each segment sums it.
template <typename TS, typename TD>
__global__ void segment_sums_kernel(const TS* __restrict__ src, int64_t cols,
                                    const int64_t* __restrict__ sorted,
                                    const int64_t* __restrict__ perm, int64_t count,
                                    int64_t num_rows, AccOf<TD> scaling, TD* __restrict__ dst,
                                    int64_t stride_v, int64_t stride_c) {
  using Acc = AccOf<TD>;
  const int64_t p = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t v = sorted[p];
  if (c >= cols || !core::embedding_row_ok(v, num_rows) || !core::embedding_segment_head(sorted, p)) {
    return;
  }
  const int64_t end = core::embedding_segment_end(sorted, count, p);
  const Acc sum = core::embedding_segment_sum<Acc>(src, cols, c, perm, p, end,
                                                   [](TS s) { return static_cast<Acc>(Convert<TS>::load(s)); });
  dst[v * stride_v + c * stride_c] = Convert<TD>::store(scaling * sum);
}

template <typename TW, typename TA>
cudaError_t forward_typed(const int64_t* idx, const void* weight, int64_t ldw, const void* A,
                          int64_t sa0, int64_t sa1, const void* bt, double scaling, void* y,
                          int64_t rows, int64_t num_embeddings, int64_t out, int64_t r,
                          cudaStream_t stream) {
  using Acc = AccOf<TW>;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((out + kThreads - 1) / kThreads));
  const size_t smem = static_cast<size_t>(r) * sizeof(Acc);
  LORA_EXT_LAUNCH(grid, kThreads, smem, stream, forward_kernel<TW, TA>)(
      idx, static_cast<const TW*>(weight), ldw, static_cast<const TA*>(A), sa0, sa1,
      static_cast<const TA*>(bt), static_cast<Acc>(scaling), static_cast<TW*>(y), num_embeddings,
      out, r);
  return cudaGetLastError();
}

template <typename TS, typename TD>
cudaError_t segment_sums_typed(const void* src, int64_t cols, const int64_t* sorted,
                               const int64_t* perm, int64_t count, int64_t num_rows,
                               double scaling, void* dst, int64_t stride_v, int64_t stride_c,
                               cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>((cols + kThreads - 1) / kThreads));
  LORA_EXT_LAUNCH(grid, kThreads, 0, stream, segment_sums_kernel<TS, TD>)(
      static_cast<const TS*>(src), cols, sorted, perm, count, num_rows,
      static_cast<AccOf<TD>>(scaling), static_cast<TD*>(dst), stride_v, stride_c);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_embedding_lora_forward(DType weight_dtype, DType adapter_dtype,
                                          const int64_t* idx, const void* weight, int64_t ldw,
                                          const void* lora_A, int64_t sa0, int64_t sa1,
                                          const void* bt, double scaling, void* y, int64_t rows,
                                          int64_t num_embeddings, int64_t out, int64_t r,
                                          cudaStream_t stream) {
  if (rows == 0 || out == 0) return cudaSuccess;
  const bool same = adapter_dtype == weight_dtype;
#define LORA_EXT_FORWARD(TW, TA) \
  forward_typed<TW, TA>(idx, weight, ldw, lora_A, sa0, sa1, bt, scaling, y, rows, num_embeddings, out, r, stream)
  switch (weight_dtype) {
    case DType::kFloat32: if (same) return LORA_EXT_FORWARD(float, float); break;
    case DType::kFloat64: if (same) return LORA_EXT_FORWARD(double, double); break;
    case DType::kFloat16:
      if (same) return LORA_EXT_FORWARD(__half, __half);
      if (adapter_dtype == DType::kFloat32) return LORA_EXT_FORWARD(__half, float);
      break;
    case DType::kBFloat16:
      if (same) return LORA_EXT_FORWARD(__nv_bfloat16, __nv_bfloat16);
      if (adapter_dtype == DType::kFloat32) return LORA_EXT_FORWARD(__nv_bfloat16, float);
      break;
  }
#undef LORA_EXT_FORWARD
  return cudaErrorInvalidValue;
}

cudaError_t launch_embedding_segment_sums(DType src_dtype, DType dst_dtype, const void* src,
                                          int64_t cols, const int64_t* sorted,
                                          const int64_t* perm, int64_t count, int64_t num_rows,
                                          double scaling, void* dst, int64_t stride_v,
                                          int64_t stride_c, cudaStream_t stream) {
  if (count == 0 || cols == 0) return cudaSuccess;
  const bool same = src_dtype == dst_dtype;
#define LORA_EXT_SUMS(TS, TD) \
  segment_sums_typed<TS, TD>(src, cols, sorted, perm, count, num_rows, scaling, dst, stride_v, stride_c, stream)
  switch (dst_dtype) {
    case DType::kFloat32: if (same) return LORA_EXT_SUMS(float, float); break;
    case DType::kFloat64: if (same) return LORA_EXT_SUMS(double, double); break;
    case DType::kFloat16:
      if (same) return LORA_EXT_SUMS(__half, __half);
      if (src_dtype == DType::kFloat32) return LORA_EXT_SUMS(float, __half);
      break;
    case DType::kBFloat16:
      if (same) return LORA_EXT_SUMS(__nv_bfloat16, __nv_bfloat16);
      if (src_dtype == DType::kFloat32) return LORA_EXT_SUMS(float, __nv_bfloat16);
      break;
  }
#undef LORA_EXT_SUMS
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lora_ext
