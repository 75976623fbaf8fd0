// cuda_emu stand-in for <cuda_runtime_api.h>: the runtime API subset the kernels use.
#pragma once
#include "../cuda_emu.h"
