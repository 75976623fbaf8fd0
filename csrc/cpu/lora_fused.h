// The fused LoRA linear on CPU (see lora_fused.cpp): forward and backward of
//   y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ
// on 2-D contiguous-able tensors of one dtype, with drop(x) never materialised beyond a tile.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

#include "../core/dropout.h"

namespace lora_ext {
namespace cpu {

// Whether bf16 GEMMs run natively here (AVX512-BF16, at the level LORA_EXT_CPU_CAPABILITY
// allows); without it the base GEMMs of bf16 tensors run in fp32.
bool cpu_has_native_bf16();

// The dtype our CPU ops run their base GEMMs in for tensors of `storage` dtype: the storage
// dtype, except bf16 without native bf16 and fp16, which run in fp32.
at::ScalarType base_gemm_type(at::ScalarType storage);

// z = drop(x2d)·lora_Aᵀ [rows, r] in the accumulation dtype (fp32, fp64 for double).
at::Tensor fused_shrink(const at::Tensor& x2d, const at::Tensor& lora_A, double dropout_p,
                        const core::DropoutParams& params);

// grad_A = grad_zᵀ·drop(x2d) [r, in] in the accumulation dtype, by tiles of rows (drop(x) never
// materialised beyond a tile).
at::Tensor fused_grad_a(const at::Tensor& grad_z, const at::Tensor& x2d, double dropout_p,
                        const core::DropoutParams& params);

// {y [rows, out], z [rows, r]}; bias may be undefined; params unused when dropout_p == 0.
std::tuple<at::Tensor, at::Tensor> fused_forward(const at::Tensor& x2d, const at::Tensor& weight,
                                                 const at::Tensor& bias, const at::Tensor& lora_A,
                                                 const at::Tensor& lora_B, double scaling,
                                                 double dropout_p, const core::DropoutParams& params);

// {grad_x [rows, in], grad_A, grad_B}, each empty where output_mask says it is not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& z, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
    const core::DropoutParams& params, std::array<bool, 3> output_mask);

}  // namespace cpu
}  // namespace lora_ext
