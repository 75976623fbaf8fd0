// CUDA kernels of the NF4 family: raw pointers and a stream in, no torch. The arithmetic is
// core/nf4.h's, so the GPU rounds exactly as the CPU kernels and bitsandbytes do. A few rows
// go through the GEMV, more through the tiled GEMM; neither writes a dense copy of W.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#include "lora_linear.cuh"  // DType

namespace lora_ext {
namespace cuda {

// packed [ceil(n/2)] and absmax [ceil(n/blocksize)] of x (fp32/fp16/bf16, contiguous).
cudaError_t launch_nf4_quantize(DType dtype, const void* x, int64_t n, int64_t blocksize,
                                uint8_t* packed, float* absmax, cudaStream_t stream);

// out[i, j] (contiguous [rows, cols], dtype) = element (row0 + i) * row_len + col0 + j of the
// NF4 tensor; a flat dequantisation is rows = 1, cols = n.
cudaError_t launch_nf4_dequantize_2d(DType dtype, const uint8_t* packed, const float* absmax,
                                     int64_t blocksize, int64_t row_len, int64_t row0,
                                     int64_t col0, int64_t rows, int64_t cols, void* out,
                                     cudaStream_t stream);

// y [rows, out] = x [rows, in] @ dequant(W [out, in]).T + bias, all of dtype, fp32
// accumulation; one warp per output feature reads its packed row once for all rows (one
// pass). 1 <= rows <= kGemvMaxRows.
constexpr int kGemvMaxRows = 8;
cudaError_t launch_nf4_gemv(DType dtype, const void* x, int64_t rows, int64_t in,
                            const uint8_t* packed, const float* absmax, int64_t blocksize,
                            const void* bias, void* y, int64_t out, cudaStream_t stream);

// y [rows, out] = x [rows, in] @ dequant(W [out, in]).T + bias (bias null or [out]), all of
// dtype, contiguous; fp32 accumulation. Tiles of W are decoded into shared memory (rounded to
// dtype for bf16/fp16, which run on the tensor cores from sm_80 on; fp32 stays exact), each
// packed byte read once per 64 rows of x. For rows > kGemvMaxRows. Few rows split K over more
// blocks, summed (in a fixed order) through `workspace`: nf4_gemm_workspace(rows, in, out)
// floats of device memory; with a null workspace K is not split.
int64_t nf4_gemm_workspace(int64_t rows, int64_t k, int64_t n);
cudaError_t launch_nf4_gemm(DType dtype, const void* x, int64_t rows, int64_t in,
                            const uint8_t* packed, const float* absmax, int64_t blocksize,
                            const void* bias, void* y, int64_t out, float* workspace,
                            cudaStream_t stream);

// grad_x [rows, in] = grad_y [rows, out] @ dequant(W [out, in]), the same kernel and rounding
// with W's tiles read along its rows; workspace: nf4_gemm_workspace(rows, out, in) floats.
cudaError_t launch_nf4_gemm_grad_input(DType dtype, const void* grad_y, int64_t rows, int64_t out,
                                       const uint8_t* packed, const float* absmax, int64_t blocksize,
                                       void* grad_x, int64_t in, float* workspace, cudaStream_t stream);

// codes and absmax2 of centred fp32 values c[n] (8-bit blockwise, 256-entry sorted code).
cudaError_t launch_quantize_absmax(const float* centred, int64_t n, const float* code,
                                   int64_t blocksize, uint8_t* codes, float* absmax2,
                                   cudaStream_t stream);

// out[i] = code[codes[i]] * absmax2[i / blocksize] + *offset.
cudaError_t launch_dequantize_absmax(const uint8_t* codes, int64_t n, const float* absmax2,
                                     const float* offset, const float* code, int64_t blocksize,
                                     float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_ext
