// LoRA on convolutions: the merged weight W + s·reshape(B·A) in one pass over W's rows, so
// that the layer runs a single convolution (groups 1). Each output channel o is a row
// W[o, :] (in·k... columns) plus s·Σ_j B[o, j]·A[j, :]: the row kernel of the Embedding LoRA
// (csrc/cpu/embedding.cpp, csrc/cuda/embedding.cu) with every row in order and B's row as
// the r staged values. fp32 accumulation (fp64 for fp64), one rounding per element.
#include <ATen/ATen.h>
#include <torch/library.h>

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

constexpr int64_t kMaxRank = 4096;  // the CUDA row kernel stages B's row in shared memory

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

Tensor lora_conv_weight(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scaling) {
  constexpr const char* op = "lora_conv_weight";
  const auto tw = weight.scalar_type(), ta = lora_A.scalar_type();
  TORCH_CHECK(tw == at::kFloat || tw == at::kDouble || is_half(tw), op,
              ": weight must be float32, float64, float16 or bfloat16, got ", tw);
  TORCH_CHECK(lora_B.scalar_type() == ta, op, ": lora_B has dtype ", lora_B.scalar_type(),
              " but lora_A has ", ta);
  TORCH_CHECK(ta == tw || (ta == at::kFloat && is_half(tw)), op, ": adapters in ", ta, " over a ", tw,
              " weight: expected the weight's dtype, or float32 over a half weight");
  TORCH_CHECK(lora_A.device() == weight.device() && lora_B.device() == weight.device(), op,
              ": weight, lora_A and lora_B must be on one device, got ", weight.device(), ", ",
              lora_A.device(), " and ", lora_B.device());
  TORCH_CHECK(weight.dim() >= 2 && lora_A.dim() == weight.dim() &&
                  lora_A.sizes().slice(1) == weight.sizes().slice(1),
              op, ": lora_A must be [r, ", weight.sizes().slice(1), "] to match weight ", weight.sizes(),
              ", got ", lora_A.sizes());
  const int64_t out = weight.size(0), r = lora_A.size(0), cols = weight.numel() / std::max<int64_t>(out, 1);
  TORCH_CHECK(lora_B.dim() >= 2 && lora_B.size(0) == out && lora_B.size(1) == r && lora_B.numel() == out * r,
              op, ": lora_B must be [", out, ", ", r, ", 1, ...], got ", lora_B.sizes());
  TORCH_CHECK(r >= 1 && r <= kMaxRank, op, ": rank ", r, " must be in [1, ", kMaxRank, "]");
  const Tensor w = weight.contiguous().view({out, cols});
  const Tensor b = lora_B.reshape({out, r}).t();  // [r, out]: row o's staged values in column o
  const Tensor a = lora_A.reshape({r, cols});
  Tensor merged = at::empty({out, cols}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (weight.is_cuda()) {
#ifdef LORA_EXT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(weight.device());
    TORCH_CHECK(out <= INT32_MAX && (cols + 255) / 256 <= 65535, op, ": weight ", weight.sizes(),
                " exceeds the CUDA grid");
    const Tensor at_ = a.contiguous();
    C10_CUDA_CHECK(cuda::launch_embedding_lora_forward(
        cuda_dtype(tw), cuda_dtype(ta), nullptr, w.const_data_ptr(), cols, b.const_data_ptr(), b.stride(0),
        b.stride(1), at_.const_data_ptr(), scaling, merged.mutable_data_ptr(), out, out, cols, r,
        c10::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "lora_ext was built without CUDA kernels");
#endif
  } else {
    const Tensor bt = a.to(tw == at::kDouble ? at::kDouble : at::kFloat).contiguous();
    cpu::embedding_lora_forward(Tensor(), w, b, bt, scaling, merged);
  }
  return merged.view(weight.sizes());
}

}  // namespace
}  // namespace lora_ext

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) { m.impl("lora_conv_weight", &lora_ext::lora_conv_weight); }

#ifdef LORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_ext, CUDA, m) { m.impl("lora_conv_weight", &lora_ext::lora_conv_weight); }
#endif
