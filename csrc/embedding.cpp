// Embedding LoRA: argument checks and dispatch to the CPU kernels (csrc/cpu/embedding.cpp) or
// the CUDA kernels (csrc/cuda/embedding.cu). The forward is one fused pass per token (gather
// of the base row and of the token's r adapter values, rank-r expand, one rounding). The
// backward forms grad_z = g·B and grad_B = s·gᵀ·A[:, idx]ᵀ with GEMMs (ATen: cuBLAS / the
// CPU BLAS) in the accumulation dtype, and scatters into A's columns and W's rows with the
// segment-sum kernels over a stable sort of the indices: deterministic, no atomics.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "aten_glue.h"
#include "cpu/embedding.h"

#ifdef LORA_EXT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/embedding.cuh"
#endif

namespace lora_ext {
namespace {

using at::Tensor;

// The CUDA forward stages one column of A (r accumulators) in shared memory.
constexpr int64_t kMaxRank = 4096;

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_floating(const char* op, const Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || is_half(type), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", type);
}

// indices (any shape, int64/int32) as a flat int64 tensor; rows checked on the CPU.
Tensor flat_indices(const char* op, const Tensor& indices, int64_t num_embeddings, const Tensor& like) {
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
              ": indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == like.device(), op, ": indices are on ", indices.device(),
              " but the table is on ", like.device());
  Tensor idx = indices.reshape({-1}).to(at::kLong).contiguous();
  TORCH_CHECK(idx.numel() <= INT32_MAX, op, ": at most 2^31 - 1 tokens per call, got ", idx.numel());
  if (idx.is_cpu()) {
    const int64_t* p = idx.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < idx.numel(); ++t) {
      TORCH_CHECK_INDEX(p[t] >= 0 && p[t] < num_embeddings, op, ": index ", p[t],
                        " is out of range for a table of ", num_embeddings, " rows");
    }
  }
  return idx;
}

// lora_A [r, V] and lora_B [D, r] of one dtype: the table's (tw), or float32 over a half
// table (PEFT's fp32 adapters over a half base), on the table's device.
void check_adapters(const char* op, at::ScalarType tw, int64_t num, int64_t dim, at::Device device,
                    const Tensor& lora_A, const Tensor& lora_B) {
  check_floating(op, lora_A, "lora_A");
  TORCH_CHECK(lora_B.scalar_type() == lora_A.scalar_type(), op, ": lora_B has dtype ",
              lora_B.scalar_type(), " but lora_A has ", lora_A.scalar_type());
  const auto ta = lora_A.scalar_type();
  TORCH_CHECK(ta == tw || (ta == at::kFloat && is_half(tw)), op, ": adapters in ", ta, " over a ",
              tw, " table: expected the table's dtype, or float32 over a half table");
  TORCH_CHECK(lora_A.device() == device && lora_B.device() == device, op,
              ": lora_A and lora_B must be on the table's device ", device, ", got ", lora_A.device(),
              " and ", lora_B.device());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == num, op, ": lora_A must be [r, ", num,
              "], got ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == dim && lora_B.size(1) == lora_A.size(0), op,
              ": lora_B must be [", dim, ", ", lora_A.size(0), "], got ", lora_B.sizes());
  TORCH_CHECK(lora_A.size(0) <= kMaxRank, op, ": rank ", lora_A.size(0), " exceeds ", kMaxRank);
}

#ifdef LORA_EXT_WITH_CUDA
void segment_sums_cuda(const Tensor& src, const Tensor& sorted, const Tensor& perm, int64_t num_rows,
                       double scale, Tensor& dst, int64_t stride_v, int64_t stride_c) {
  C10_CUDA_CHECK(cuda::launch_embedding_segment_sums(
      cuda_dtype(src.scalar_type()), cuda_dtype(dst.scalar_type()), src.const_data_ptr(), src.size(1),
      sorted.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), sorted.numel(), num_rows,
      scale, dst.mutable_data_ptr(), stride_v, stride_c, c10::cuda::getCurrentCUDAStream()));
}
#endif

void segment_sums(const Tensor& src, const Tensor& sorted, const Tensor& perm, int64_t num_rows,
                  double scale, Tensor& dst, int64_t stride_v, int64_t stride_c) {
  if (src.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(src.device());
    segment_sums_cuda(src, sorted, perm, num_rows, scale, dst, stride_v, stride_c);
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    cpu::embedding_segment_sums(src, sorted, perm, scale, dst, stride_v, stride_c);
  }
}

Tensor lora_embedding_forward(const Tensor& indices, const Tensor& weight, const Tensor& lora_A,
                              const Tensor& lora_B, double scaling, int64_t padding_idx) {
  constexpr const char* op = "lora_embedding";
  check_floating(op, weight, "weight");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [num_embeddings, dim], got ", weight.sizes());
  check_adapters(op, weight.scalar_type(), weight.size(0), weight.size(1), weight.device(), lora_A, lora_B);
  TORCH_CHECK(padding_idx >= -1 && padding_idx < weight.size(0), op,
              ": padding_idx must be -1 (none) or in [0, ", weight.size(0), "), got ", padding_idx);
  const Tensor idx = flat_indices(op, indices, weight.size(0), weight);
  const int64_t rows = idx.numel(), dim = weight.size(1), r = lora_A.size(0);
  const Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  Tensor y = at::empty({rows, dim}, weight.options());
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(dim);
  if (weight.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(weight.device());
    TORCH_CHECK((dim + 255) / 256 <= 65535, op, ": dim ", dim, " exceeds the CUDA grid");
    const Tensor bt = lora_B.t().contiguous();
    C10_CUDA_CHECK(cuda::launch_embedding_lora_forward(
        cuda_dtype(weight.scalar_type()), cuda_dtype(lora_A.scalar_type()), idx.const_data_ptr<int64_t>(),
        w.const_data_ptr(), w.stride(0), lora_A.const_data_ptr(), lora_A.stride(0), lora_A.stride(1),
        bt.const_data_ptr(), scaling, y.mutable_data_ptr(), rows, weight.size(0), dim, r,
        c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    const Tensor bt = lora_B.t().to(acc_type(weight.scalar_type())).contiguous();
    cpu::embedding_lora_forward(idx, w, lora_A, bt, scaling, y);
  }
  return y.view(shape);
}

std::tuple<Tensor, Tensor, Tensor> lora_embedding_backward(const Tensor& grad_y, const Tensor& indices,
                                                           const Tensor& lora_A, const Tensor& lora_B,
                                                           double scaling, int64_t padding_idx,
                                                           std::array<bool, 3> output_mask) {
  constexpr const char* op = "lora_embedding_backward";
  check_floating(op, grad_y, "grad_y");
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2, op, ": lora_A and lora_B must be 2-D, got ",
              lora_A.sizes(), " and ", lora_B.sizes());
  const int64_t num = lora_A.size(1), dim = lora_B.size(0);
  check_adapters(op, grad_y.scalar_type(), num, dim, grad_y.device(), lora_A, lora_B);
  const Tensor idx = flat_indices(op, indices, num, grad_y);
  const int64_t rows = idx.numel(), r = lora_A.size(0);
  TORCH_CHECK(grad_y.numel() == rows * dim && grad_y.dim() >= 1 && grad_y.size(-1) == dim, op,
              ": grad_y must be [..., ", dim, "] with one row per index, got ", grad_y.sizes());
  TORCH_CHECK(padding_idx >= -1 && padding_idx < num, op, ": padding_idx must be -1 (none) or in [0, ",
              num, "), got ", padding_idx);
  const auto acc = acc_type(lora_A.scalar_type());
  const Tensor g = grad_y.reshape({rows, dim}).contiguous();
  const Tensor g_acc = g.to(acc);
  Tensor grad_w, grad_a, grad_b;
  Tensor sorted, perm;
  if (output_mask[0] || output_mask[1]) {
    // padding_idx tokens give no gradient to the table rows they read (F.embedding's rule)
    const Tensor masked = padding_idx >= 0 ? at::where(idx == padding_idx, -1, idx) : idx;
    std::tie(sorted, perm) = at::sort(masked, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted = sorted.contiguous();
    perm = perm.contiguous();
  }
  if (output_mask[0]) {
    grad_w = at::zeros({num, dim}, grad_y.options());
    segment_sums(g, sorted, perm, num, 1.0, grad_w, dim, 1);
  }
  if (output_mask[1]) {
    grad_a = at::zeros({r, num}, lora_A.options().memory_format(at::MemoryFormat::Contiguous));
    const Tensor grad_z = at::mm(g_acc, lora_B.to(acc)).contiguous();  // [rows, r]
    segment_sums(grad_z, sorted, perm, num, scaling, grad_a, 1, num);
  }
  if (output_mask[2]) {
    const Tensor z = lora_A.t().index_select(0, idx).to(acc);  // every token, padding included
    grad_b = at::mm(g_acc.t(), z).mul_(scaling).to(lora_B.scalar_type());
  }
  auto empty = [&](const Tensor& like) { return at::empty({0}, like.options()); };
  return {output_mask[0] ? grad_w : empty(grad_y), output_mask[1] ? grad_a : empty(lora_A),
          output_mask[2] ? grad_b : empty(lora_B)};
}

}  // namespace
}  // namespace lora_ext

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_embedding_forward", &lora_ext::lora_embedding_forward);
  m.impl("lora_embedding_backward", &lora_ext::lora_embedding_backward);
}

#ifdef LORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) {
  m.impl("lora_embedding_forward", &lora_ext::lora_embedding_forward);
  m.impl("lora_embedding_backward", &lora_ext::lora_embedding_backward);
}
#endif
