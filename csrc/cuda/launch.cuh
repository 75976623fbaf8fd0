// The one way the kernels are launched: LORA_EXT_LAUNCH(grid, block, shared_bytes, stream,
// kernel)(args...). Under nvcc it is the triple-chevron launch; the native tests' CUDA
// emulation (csrc/tests/cuda_emu/) defines it first to run the same kernels on the CPU.
#pragma once

#ifndef LORA_EXT_LAUNCH
#define LORA_EXT_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
#endif
