// cuda_emu stand-in for <cuda_bf16.h>.
#pragma once
#include "../cuda_emu_fp16.h"
