// cuda_emu: runs the kernels of csrc/cuda/*.cu, unchanged, as host C++ on the CPU, with
// CUDA's execution model, so that the native tests can execute them without a GPU.
//
// This header (with the shims in include/ that stand in for cuda_runtime_api.h, cuda_fp16.h
// and cuda_bf16.h) is the only place that knows it is not a GPU. What it models:
// - a launch runs every block of the grid, one block at a time; the threads of a block are
//   fibers, so __syncthreads is a real barrier and warp shuffles are real exchanges;
// - between two barriers the fibers run in an order drawn from a seed (set_schedule_seed),
//   so a missing barrier or a read of another thread's data without one changes the result
//   from one seed to the next;
// - __shared__ variables are block-private storage that starts each block filled with 0xFF
//   bytes (NaN as floats), so a read before any write shows; dynamic shared memory is exactly
//   the size the launch asked for (the rest is poisoned under AddressSanitizer);
// - the launch checks of CUDA (block and grid limits, 48 KiB of dynamic shared memory without
//   opt-in) return CUDA's error codes through cudaGetLastError instead of running;
// - misuse that is undefined on a GPU (a barrier not reached by every thread, a shuffle whose
//   mask names a lane that never arrives or reads a lane outside its mask) aborts with a
//   message naming the block, the thread and the call.
// What it cannot model: speed, coalescing, true concurrency between blocks, memory ordering
// without barriers beyond what the shuffled schedules expose, and the cuBLAS/stream glue.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// The kernels and the torch-free core take their device code paths (intrinsics).
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Block-scope `thread_local` is implicitly static: one instance per kernel, shared by the
// fibers of the block that runs; `extern __shared__ T name[]` becomes a reference to the
// array that CUDA_EMU_DYNAMIC_SHARED defines.
#define __shared__ thread_local

// ------------------------------------------------------------------ runtime API subset

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
};
using cudaError = cudaError_t;

struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, int kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();

constexpr int warpSize = 32;

namespace cuda_emu {

// The limits a launch is checked against (those of sm_80 and sm_90).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute opt-in

// Seeds the schedule of every later launch (the order of fibers between barriers).
void set_schedule_seed(uint64_t seed);

// Launch statistics of the calling test, for tests that check which kernels ran.
struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t threads = 0;
  unsigned max_grid[3] = {0, 0, 0};
};
Stats& stats();

// Aborts with the current block/thread in the message: misuse a GPU would not report.
[[noreturn]] void fail(const char* what, ...);

struct ThreadCoords {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern ThreadCoords* g_coords;  // of the running fiber

// Called by the kernels through the macros below.
void syncthreads();
void syncwarp(unsigned mask);
// Deposits `bytes` of this lane's value and returns the word of `src_lane` once every lane
// of `mask` has arrived. `src_lane` outside `mask` or a lane of `mask` that exits aborts.
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, const char* op);
unsigned warp_vote(unsigned mask, bool predicate);  // ballot over the lanes of mask
int lane_id();

// Registration of the dynamic shared memory array (see CUDA_EMU_DYNAMIC_SHARED).
bool register_dynamic_shared(void* base, size_t capacity);


using KernelBody = void (*)(void* closure);
cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t stream,
                   KernelBody body, void* closure);

template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel argument count");
    // Kernel parameters are copied once at launch, as CUDA copies them to constant memory.
    struct Closure {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;
    } closure{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    launch(grid, block, shared, stream,
           [](void* c) {
             auto* self = static_cast<Closure*>(c);
             std::apply(self->kernel, self->params);
           },
           &closure);
  }
};

template <typename... Params>
Launcher<Params...> make_launcher(dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                                  void (*kernel)(Params...)) {
  return Launcher<Params...>{kernel, grid, block, shared, stream};
}

}  // namespace cuda_emu

// The launch macro of csrc/cuda/launch.cuh, emulated.
#define LORA_EXT_LAUNCH(grid, block, shared, stream, ...) \
  ::cuda_emu::make_launcher((grid), (block), (shared), (stream), __VA_ARGS__)

// Defines the array that a kernel's `extern __shared__ T name[]` refers to. Use it once per
// name, in the namespace where the kernel declares it (the kernel's unnamed namespace).
#define CUDA_EMU_DYNAMIC_SHARED(type, name)                                                   \
  alignas(16) thread_local type name[::cuda_emu::kMaxDynamicShared / sizeof(type)];           \
  [[maybe_unused]] const bool cuda_emu_registered_##name =                                    \
      ::cuda_emu::register_dynamic_shared(name, sizeof(name));

#define threadIdx (::cuda_emu::g_coords->thread_idx)
#define blockIdx (::cuda_emu::g_coords->block_idx)
#define blockDim (::cuda_emu::g_coords->block_dim)
#define gridDim (::cuda_emu::g_coords->grid_dim)

inline void __syncthreads() { ::cuda_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { ::cuda_emu::syncwarp(mask); }

namespace cuda_emu {
template <typename T>
uint64_t to_word(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle type");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  return w;
}
template <typename T>
T from_word(uint64_t w) {
  T v;
  std::memcpy(&v, &w, sizeof(T));
  return v;
}
// The source lane of a shuffle within segments of `width` lanes; -1 keeps the own value.
inline int segment_source(int lane, int target, int width, bool up) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width %d", width);
  const int base = lane & ~(width - 1);
  if (up) return target < base ? lane : target;
  return target >= base + width || target < base ? lane : target;
}
}  // namespace cuda_emu

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  const int lane = ::cuda_emu::lane_id();
  const int src = ::cuda_emu::segment_source(lane, lane ^ lane_mask, width, false);
  return ::cuda_emu::from_word<T>(
      ::cuda_emu::warp_exchange(mask, ::cuda_emu::to_word(var), src, "__shfl_xor_sync"));
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  const int lane = ::cuda_emu::lane_id();
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  ::cuda_emu::segment_source(lane, src, width, false);  // validates width
  return ::cuda_emu::from_word<T>(
      ::cuda_emu::warp_exchange(mask, ::cuda_emu::to_word(var), src, "__shfl_sync"));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int lane = ::cuda_emu::lane_id();
  const int src = ::cuda_emu::segment_source(lane, lane + static_cast<int>(delta), width, false);
  return ::cuda_emu::from_word<T>(
      ::cuda_emu::warp_exchange(mask, ::cuda_emu::to_word(var), src, "__shfl_down_sync"));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int lane = ::cuda_emu::lane_id();
  const int src = ::cuda_emu::segment_source(lane, lane - static_cast<int>(delta), width, true);
  return ::cuda_emu::from_word<T>(
      ::cuda_emu::warp_exchange(mask, ::cuda_emu::to_word(var), src, "__shfl_up_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::cuda_emu::warp_vote(mask, predicate != 0);
}
inline int __all_sync(unsigned mask, int predicate) {
  return ::cuda_emu::warp_vote(mask, predicate != 0) == mask;
}
inline int __any_sync(unsigned mask, int predicate) {
  return ::cuda_emu::warp_vote(mask, predicate != 0) != 0;
}

// ------------------------------------------------------------------ arithmetic intrinsics
// IEEE single precision, round to nearest even: what the _rn intrinsics compute. The test
// targets build with -ffp-contract=off so that no product is fused behind our back.

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) {
  return static_cast<int>((static_cast<int64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
using std::fmaf;

// CUDA's device min/max overloads, for the integer and floating types the kernels use.
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline T max(T a, T b) {
  return a < b ? b : a;
}
