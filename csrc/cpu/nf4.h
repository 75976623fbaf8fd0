// CPU kernels of the NF4 family (ATen + at::parallel_for). The arithmetic is core/nf4.h's;
// these add the loops, the SIMD lookups and the threading. All tensors are contiguous.
#pragma once
#include <ATen/core/Tensor.h>

namespace lora_ext {
namespace cpu {

// packed [ceil(n/2)] uint8 and absmax [ceil(n/blocksize)] fp32 of x (fp32/fp16/bf16).
void nf4_quantize(const at::Tensor& x, int64_t blocksize, at::Tensor& packed, at::Tensor& absmax);

// out (fp32/fp16/bf16, contiguous) = every element of the NF4 tensor, in order.
void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                    at::Tensor& out);

// A slab of the NF4 tensor seen as [*, row_len]: out[i, j] (contiguous [R, C]) is element
// (row0 + i) * row_len + col0 + j. The GEMM paths dequantise tiles of W this way.
void nf4_dequantize_2d(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                       int64_t row_len, int64_t row0, int64_t col0, at::Tensor& out);

// y [rows, out] fp32 = xf [rows, in] fp32 @ dequant(W [out, in]).T, streaming the packed
// weight once with no dense copy (the decode path).
void nf4_gemv(const at::Tensor& xf, const at::Tensor& packed, const at::Tensor& absmax,
              int64_t blocksize, at::Tensor& y);

// The same for bf16 x with the AVX512-BF16 dot product (weights rounded to bf16 first, as the
// reference does); only where nf4_gemv_bf16_supported(in).
bool nf4_gemv_bf16_supported(int64_t in_features);
void nf4_gemv_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                   int64_t blocksize, at::Tensor& y);

// y [rows, out] fp32 = x2d [rows, in] (fp32/fp16/bf16, any strides) @ dequant(W [out, in]).T
// by the blocked 4-bit GEMM of nf4_gemm.cpp: W decoded tile by tile into per-thread buffers,
// each tile used by every row, never a dense copy of W.
void nf4_gemm(const at::Tensor& x2d, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
              at::Tensor& y);

// grad_x [rows, in] (any float dtype, contiguous) = g2d [rows, out] @ dequant(W [out, in]), the
// same way (fp32 accumulation).
void nf4_gemm_grad_input(const at::Tensor& g2d, const at::Tensor& packed, const at::Tensor& absmax,
                         int64_t blocksize, at::Tensor& grad_x);

// 8-bit blockwise quantisation of centred absmax values with a 256-entry sorted code.
void quantize_absmax(const at::Tensor& centred, const at::Tensor& code, int64_t blocksize,
                     at::Tensor& codes, at::Tensor& absmax2);

// absmax = code[codes] * absmax2 + offset (fp32).
void dequantize_absmax(const at::Tensor& codes, const at::Tensor& absmax2, float offset,
                       const at::Tensor& code, int64_t blocksize, at::Tensor& out);

}  // namespace cpu
}  // namespace lora_ext
