// cuda_emu's scheduler: blocks one after another on the calling OS thread, the threads of a
// block as fibers with their own stacks, switched at barriers, shuffles and exits.
#include "cuda_emu.h"

#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif

// ------------------------------------------------------------------ context switch
// x86-64: callee-saved registers, MXCSR and the x87 control word on the stack, then the
// stack pointer swap. Elsewhere, ucontext.
#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* next_sp);
extern "C" void cuda_emu_trampoline();
asm(R"(
.text
.globl cuda_emu_switch
.type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch,.-cuda_emu_switch
.globl cuda_emu_trampoline
.type cuda_emu_trampoline,@function
cuda_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
.size cuda_emu_trampoline,.-cuda_emu_trampoline
)");
#else
#include <ucontext.h>
#endif

cudaError_t cudaGetLastError();

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // sanitizers need deep frames
constexpr size_t kGuardBytes = 4096;

enum class State { kReady, kAtBarrier, kAtWarp, kDone };

struct Fiber {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t context;
#endif
  char* stack = nullptr;  // lowest usable byte
  State state = State::kReady;
  ThreadCoords coords;
  int linear = 0;
  // Values deposited for warp operations, by parity of the warp's operation count: the last
  // lane to arrive runs on and may deposit for the next operation before the others read.
  uint64_t exchange_value[2] = {0, 0};
  uint64_t exchange_generation = 0;
#if defined(CUDA_EMU_ASAN)
  void* fake_stack = nullptr;
#endif
};

// One pending warp operation per warp (the kernels' warp operations all name full warps or
// fixed sub-masks that every named lane reaches together).
struct Warp {
  unsigned arrived = 0;
  unsigned mask = 0;
  uint64_t generation = 0;
  const char* op = nullptr;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<int> ready;
  int live = 0, at_barrier = 0;
  Fiber* current = nullptr;
  void* main_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t main_context;
#endif
#if defined(CUDA_EMU_ASAN)
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
  std::mt19937_64 rng;
} g_sched;

cudaError_t g_last_error = cudaSuccess;
uint64_t g_seed = 1;
Stats g_stats;
char* g_stack_pool = nullptr;
size_t g_stack_count = 0;

void* g_dynamic_base = nullptr;
size_t g_dynamic_capacity = 0;

// The executable's TLS block holds exactly the kernels' __shared__ variables (the emulator's
// own state is plain globals): refilled with 0xFF before every block.
struct TlsBlock {
  char* base = nullptr;
  size_t size = 0;
} g_tls;

int find_tls(struct dl_phdr_info* info, size_t, void* data) {
  if (info->dlpi_name != nullptr && info->dlpi_name[0] != '\0') return 0;  // not the executable
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS) {
      auto* tls = static_cast<TlsBlock*>(data);
      tls->base = static_cast<char*>(info->dlpi_tls_data);
      tls->size = info->dlpi_phdr[i].p_memsz;
    }
  }
  return 1;
}

void poison_shared(size_t dynamic_bytes) {
  if (g_tls.base == nullptr && g_tls.size == 0) dl_iterate_phdr(find_tls, &g_tls);
#if defined(CUDA_EMU_ASAN)
  if (g_dynamic_base != nullptr) ASAN_UNPOISON_MEMORY_REGION(g_dynamic_base, g_dynamic_capacity);
#endif
  if (g_tls.base != nullptr) std::memset(g_tls.base, 0xFF, g_tls.size);
#if defined(CUDA_EMU_ASAN)
  if (g_dynamic_base != nullptr && dynamic_bytes < g_dynamic_capacity) {
    ASAN_POISON_MEMORY_REGION(static_cast<char*>(g_dynamic_base) + dynamic_bytes,
                              g_dynamic_capacity - dynamic_bytes);
  }
#else
  (void)dynamic_bytes;
#endif
}

void unpoison_shared() {
#if defined(CUDA_EMU_ASAN)
  if (g_dynamic_base != nullptr) ASAN_UNPOISON_MEMORY_REGION(g_dynamic_base, g_dynamic_capacity);
#endif
}

void ensure_stacks(size_t count) {
  if (count <= g_stack_count) return;
  if (g_stack_pool != nullptr) munmap(g_stack_pool, g_stack_count * (kStackBytes + kGuardBytes));
  const size_t bytes = count * (kStackBytes + kGuardBytes);
  void* pool = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1, 0);
  if (pool == MAP_FAILED) fail("cannot map %zu fiber stacks", count);
  g_stack_pool = static_cast<char*>(pool);
  g_stack_count = count;
  for (size_t i = 0; i < count; ++i) {  // a guard page under each stack turns overflow into SIGSEGV
    mprotect(g_stack_pool + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
  }
}

void switch_to_fiber(Fiber& f) {
  g_sched.current = &f;
  g_coords = &f.coords;
#if defined(CUDA_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
#if defined(__x86_64__)
  cuda_emu_switch(&g_sched.main_sp, f.sp);
#else
  swapcontext(&g_sched.main_context, &f.context);
#endif
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_sched.current = nullptr;
  g_coords = nullptr;
}

// From the running fiber back to the scheduler; returns when the scheduler resumes it.
void yield_to_scheduler() {
  Fiber& f = *g_sched.current;
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(f.state == State::kDone ? nullptr : &f.fake_stack,
                                 g_sched.main_stack_bottom, g_sched.main_stack_size);
#endif
#if defined(__x86_64__)
  cuda_emu_switch(&f.sp, g_sched.main_sp);
#else
  swapcontext(&f.context, &g_sched.main_context);
#endif
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, &g_sched.main_stack_bottom, &g_sched.main_stack_size);
#endif
}

void fiber_entry(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_sched.main_stack_bottom, &g_sched.main_stack_size);
#endif
  g_sched.body(g_sched.closure);
  f.state = State::kDone;
  --g_sched.live;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_entry_ucontext(unsigned lo, unsigned hi) {
  fiber_entry(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void start_fiber(Fiber& f, char* stack) {
  f.stack = stack;
#if defined(__x86_64__)
  // Initial frame popped by cuda_emu_switch: csr word, r15, r14, r13 (entry), r12 (arg), rbx,
  // rbp, then the return address (the trampoline). The top is 16-byte aligned, so the
  // trampoline's call sees the ABI's alignment.
  uintptr_t top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top) - 8;
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::memcpy(&frame[0], csr, 8);
  frame[1] = 0;                                           // r15
  frame[2] = 0;                                           // r14
  frame[3] = reinterpret_cast<uint64_t>(&fiber_entry);    // r13
  frame[4] = reinterpret_cast<uint64_t>(&f);              // r12
  frame[5] = 0;                                           // rbx
  frame[6] = 0;                                           // rbp
  frame[7] = reinterpret_cast<uint64_t>(&cuda_emu_trampoline);
  f.sp = frame;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_entry_ucontext), 2,
              static_cast<unsigned>(p), static_cast<unsigned>(p >> 32));
#endif
}

[[noreturn]] void deadlock() {
  int barrier = 0, warp = 0;
  for (const Fiber& f : g_sched.fibers) {
    if (f.state == State::kAtBarrier) ++barrier;
    if (f.state == State::kAtWarp) ++warp;
  }
  const Fiber& any = g_sched.fibers.front();
  fail("deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d in warp operations, "
       "%d exited (a barrier not reached by every thread, or a shuffle mask naming a lane that "
       "never arrives)",
       any.coords.block_idx.x, any.coords.block_idx.y, any.coords.block_idx.z, barrier, warp,
       static_cast<int>(g_sched.fibers.size()) - g_sched.live);
}

void run_block(dim3 grid, dim3 block, uint3 block_idx, size_t dynamic_shared) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  Scheduler& s = g_sched;
  s.fibers.assign(n, Fiber{});
  s.warps.assign((n + 31) / 32, Warp{});
  s.ready.clear();
  s.live = n;
  s.at_barrier = 0;
  poison_shared(dynamic_shared);
  for (int t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    f.linear = t;
    f.coords.thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.coords.block_idx = block_idx;
    f.coords.block_dim = block;
    f.coords.grid_dim = grid;
    start_fiber(f, g_stack_pool + t * (kStackBytes + kGuardBytes) + kGuardBytes);
    s.ready.push_back(t);
  }
  while (s.live > 0) {
    if (s.ready.empty()) {
      if (s.at_barrier != s.live) deadlock();
      s.at_barrier = 0;  // every live thread has arrived: release them all
      for (Fiber& f : s.fibers) {
        if (f.state == State::kAtBarrier) {
          f.state = State::kReady;
          s.ready.push_back(f.linear);
        }
      }
      continue;
    }
    // A random ready thread runs until it blocks or exits: between two barriers the order of
    // the threads is a draw from the seed.
    const size_t pick = static_cast<size_t>(s.rng() % s.ready.size());
    const int t = s.ready[pick];
    s.ready[pick] = s.ready.back();
    s.ready.pop_back();
    switch_to_fiber(s.fibers[t]);
  }
  unpoison_shared();
}

}  // namespace

ThreadCoords* g_coords = nullptr;

void set_schedule_seed(uint64_t seed) { g_seed = seed; }

Stats& stats() { return g_stats; }

void fail(const char* what, ...) {
  std::fprintf(stderr, "cuda_emu: ");
  va_list args;
  va_start(args, what);
  std::vfprintf(stderr, what, args);
  va_end(args);
  if (g_sched.current != nullptr) {
    const ThreadCoords& c = g_sched.current->coords;
    std::fprintf(stderr, " [block (%u,%u,%u), thread (%u,%u,%u)]", c.block_idx.x, c.block_idx.y,
                 c.block_idx.z, c.thread_idx.x, c.thread_idx.y, c.thread_idx.z);
  }
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

bool register_dynamic_shared(void* base, size_t capacity) {
  if (g_dynamic_base != nullptr && g_dynamic_base != base) {
    fail("two dynamic shared memory arrays registered; one name per test program");
  }
  g_dynamic_base = base;
  g_dynamic_capacity = capacity;
  return true;
}

int lane_id() {
  if (g_sched.current == nullptr) fail("warp intrinsic called outside a kernel");
  return g_sched.current->linear % 32;
}

void syncthreads() {
  Fiber* f = g_sched.current;
  if (f == nullptr) fail("__syncthreads called outside a kernel");
  f->state = State::kAtBarrier;
  ++g_sched.at_barrier;
  yield_to_scheduler();
}

namespace {
// Arrives at the warp operation of `mask`; returns when every lane of the mask has arrived.
void warp_arrive(unsigned mask, uint64_t value, const char* op) {
  Fiber* f = g_sched.current;
  if (f == nullptr) fail("%s called outside a kernel", op);
  const int lane = f->linear % 32;
  if (((mask >> lane) & 1u) == 0) fail("%s: calling lane %d is not in mask 0x%08x", op, lane, mask);
  const int warp_first = f->linear - lane;
  const int warp_size = std::min<int>(32, static_cast<int>(g_sched.fibers.size()) - warp_first);
  const unsigned present = warp_size == 32 ? 0xFFFFFFFFu : ((1u << warp_size) - 1u);
  if ((mask & ~present) != 0) fail("%s: mask 0x%08x names lanes beyond the block", op, mask);
  Warp& w = g_sched.warps[f->linear / 32];
  if (w.arrived != 0 && (w.mask != mask || w.op != op)) {
    fail("%s with mask 0x%08x while lanes 0x%08x of the warp wait in %s with mask 0x%08x", op,
         mask, w.arrived, w.op, w.mask);
  }
  w.mask = mask;
  w.op = op;
  f->exchange_value[w.generation & 1] = value;
  w.arrived |= 1u << lane;
  f->exchange_generation = w.generation;
  if (w.arrived == mask) {
    // The last lane: the others resume after it, in the seeded order.
    for (int l = 0; l < warp_size; ++l) {
      Fiber& other = g_sched.fibers[warp_first + l];
      if (((mask >> l) & 1u) && other.state == State::kAtWarp) {
        other.state = State::kReady;
        g_sched.ready.push_back(other.linear);
      }
    }
    w.arrived = 0;
    ++w.generation;
    return;
  }
  f->state = State::kAtWarp;
  yield_to_scheduler();
}
}  // namespace

void syncwarp(unsigned mask) { warp_arrive(mask, 0, "__syncwarp"); }

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, const char* op) {
  Fiber* f = g_sched.current;
  if (f == nullptr) fail("%s called outside a kernel", op);
  warp_arrive(mask, value, op);
  const int lane = f->linear % 32;
  if (src_lane < 0 || src_lane > 31 || ((mask >> src_lane) & 1u) == 0) {
    fail("%s: lane %d reads lane %d, which is not in mask 0x%08x (undefined on a GPU)", op, lane,
         src_lane, mask);
  }
  // The source lane deposited for this operation; it cannot deposit twice more before this
  // lane has read, since the next operation needs this lane too.
  const Fiber& src = g_sched.fibers[f->linear - lane + src_lane];
  return src.exchange_value[f->exchange_generation & 1];
}

unsigned warp_vote(unsigned mask, bool predicate) {
  Fiber* f = g_sched.current;
  if (f == nullptr) fail("warp vote called outside a kernel");
  warp_arrive(mask, predicate ? 1u : 0u, "__ballot_sync");
  const int warp_first = f->linear - f->linear % 32;
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) {
    const Fiber& other = g_sched.fibers[warp_first + l];
    if ((mask >> l) & 1u) ballot |= static_cast<unsigned>(other.exchange_value[f->exchange_generation & 1] & 1u) << l;
  }
  return ballot;
}

cudaError_t launch(dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t, KernelBody body,
                   void* closure) {
  if (g_sched.current != nullptr) fail("kernel launched from inside a kernel");
  const unsigned gdim[3] = {grid.x, grid.y, grid.z}, bdim[3] = {block.x, block.y, block.z};
  for (int d = 0; d < 3; ++d) {
    if (gdim[d] == 0 || gdim[d] > kMaxGridDim[d] || bdim[d] == 0 || bdim[d] > kMaxBlockDim[d]) {
      return g_last_error = cudaErrorInvalidConfiguration;
    }
  }
  if (static_cast<uint64_t>(block.x) * block.y * block.z > kMaxThreadsPerBlock) {
    return g_last_error = cudaErrorInvalidConfiguration;
  }
  if (dynamic_shared > kMaxDynamicShared) return g_last_error = cudaErrorInvalidValue;
  if (dynamic_shared > 0 && g_dynamic_base == nullptr) {
    fail("a launch asks for %zu bytes of dynamic shared memory but the test program defines no "
         "CUDA_EMU_DYNAMIC_SHARED array", dynamic_shared);
  }
  const int threads = static_cast<int>(block.x * block.y * block.z);
  ensure_stacks(static_cast<size_t>(threads));
  ++g_stats.launches;
  for (int d = 0; d < 3; ++d) g_stats.max_grid[d] = std::max(g_stats.max_grid[d], gdim[d]);
  g_sched.body = body;
  g_sched.closure = closure;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        const uint64_t linear = (static_cast<uint64_t>(z) * grid.y + y) * grid.x + x;
        g_sched.rng.seed(g_seed * 0x9E3779B97F4A7C15ull + linear);
        run_block(grid, block, uint3{x, y, z}, dynamic_shared);
        ++g_stats.blocks;
        g_stats.threads += threads;
      }
    }
  }
  return cudaSuccess;
}

}  // namespace cuda_emu

// GCC calls a TU-wide `__tls_init` from the access wrapper of an `extern thread_local`
// declared in an unnamed namespace (the kernels' `extern __shared__`), and defines it only in
// TUs that have thread_locals with dynamic initialisation. Shared memory has none.
extern "C" __attribute__((weak)) void __tls_init() {}

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g_last_error;
  cuda_emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cuda_emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  if (count > 0 && ptr == nullptr) return cudaErrorInvalidValue;
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, int, cudaStream_t) {
  if (count > 0 && (dst == nullptr || src == nullptr)) return cudaErrorInvalidValue;
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
