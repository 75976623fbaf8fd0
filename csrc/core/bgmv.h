// The arithmetic of BGMV / SGMV (many LoRA adapters in one batch), shared by the CPU and
// CUDA kernels. Torch-free, so the native tests (ctest) exercise what the GPU runs.
//
//   shrink: z[t, j] = sum_k x[t, k] * A[a, j, k]                 a = adapter of row t
//   expand: y[t, o] = y[t, o] + scale[a] * sum_j z[t, j] * B[a, o, j]
//
// A row whose adapter index lies outside [0, num_adapters) has no adapter: shrink gives
// z[t, :] = 0 and expand leaves y[t, :] unchanged. The CPU orchestration rejects indices
// other than -1 outside that range before calling in; the CUDA kernels cannot raise, so
// they skip such rows (never reading or writing out of bounds).
//
// Sums accumulate in Acc (float for fp32/fp16/bf16, double for fp64); every stored value
// is rounded once.
#pragma once
#include <stdint.h>

#include "philox.h"  // LORA_EXT_HD

namespace lora_ext {
namespace core {

template <typename T>
struct BgmvAcc {
  using type = float;
};
template <>
struct BgmvAcc<double> {
  using type = double;
};

// The adapter slot a row uses, or -1 for none (including indices out of range).
LORA_EXT_HD int64_t bgmv_slot(int64_t index, int64_t num_adapters) {
  return (index >= 0 && index < num_adapters) ? index : -1;
}

// SGMV: segment s covers rows [starts[s], starts[s + 1]). The segment holding row t, or -1
// when no segment does. Binary search reads only starts[0..num_segments], so malformed
// (unsorted) starts give wrong segments but never an out-of-bounds access.
template <typename I>
LORA_EXT_HD int64_t sgmv_segment_of_row(const I* starts, int64_t num_segments, int64_t row) {
  if (num_segments <= 0 || row < static_cast<int64_t>(starts[0]) ||
      row >= static_cast<int64_t>(starts[num_segments])) {
    return -1;
  }
  int64_t lo = 0, hi = num_segments;  // invariant: starts[lo] <= row < starts[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(starts[mid]) <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// sum_{k = first, first + step, ... < n} load(a[k]) * load(b[k]). On the host (first = 0,
// step = 1) sixteen independent partial sums let the compiler vectorise without being
// allowed to reassociate; a CUDA thread strides through with step = its team's size.
template <typename Acc, typename T, typename U, typename Load>
LORA_EXT_HD Acc bgmv_dot(const T* a, const U* b, int64_t n, int64_t first, int64_t step,
                         Load load) {
  Acc acc = Acc(0);
  if (step == 1 && first == 0) {
    constexpr int kLanes = 16;
    Acc part[kLanes];
    for (int l = 0; l < kLanes; ++l) part[l] = Acc(0);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) {
      for (int l = 0; l < kLanes; ++l) part[l] += load(a[k + l]) * load(b[k + l]);
    }
    for (; k < n; ++k) acc += load(a[k]) * load(b[k]);
    for (int l = 0; l < kLanes; ++l) acc += part[l];
    return acc;
  }
  for (int64_t k = first; k < n; k += step) acc += load(a[k]) * load(b[k]);
  return acc;
}

// shrink for `count` rows that share one adapter: z[rows[i], j] = x[rows[i], :] . A[j, :]
// for j < r, where A is that adapter's contiguous [r, in] slab (nullptr: no adapter, z = 0).
// The slab stays hot in cache across the rows: a small GEMM, not `count` separate GEMVs.
template <typename T, typename Load, typename Store>
inline void bgmv_shrink_rows(const T* x, int64_t in, const T* A, int64_t r, const int64_t* rows,
                             int64_t count, T* z, Load load, Store store) {
  using Acc = typename BgmvAcc<T>::type;
  for (int64_t i = 0; i < count; ++i) {
    const T* xr = x + rows[i] * in;
    T* zr = z + rows[i] * r;
    for (int64_t j = 0; j < r; ++j) {
      zr[j] = store(A == nullptr ? Acc(0) : bgmv_dot<Acc>(xr, A + j * in, in, 0, 1, load));
    }
  }
}

// expand for `count` rows that share one adapter with [out, r] slab B (nullptr: no adapter):
// y[rows[i], o] += scale * sum_j z[rows[i], j] * B[o, j], the sum taken in order j = 0..r-1
// (as each CUDA thread takes it). B is first transposed into scratch
// (bgmv_expand_scratch(out, r) Acc values), so that the inner loops run over contiguous outputs with no reductions: they
// vectorise, and B is read once for all the rows.
// Row stride of the transposed slab: out rounded up plus an odd number of cache lines, so
// that the r rows written together by the transposition do not all map to one cache set
// (a power-of-two stride makes every write of a column miss).
inline int64_t bgmv_transposed_stride(int64_t out) { return (out + 15) / 16 * 16 + 16; }

// Acc values expand needs as scratch.
inline int64_t bgmv_expand_scratch(int64_t out, int64_t r) {
  return r * bgmv_transposed_stride(out) + r;
}

template <typename T, typename Acc, typename Load, typename Store>
inline void bgmv_expand_rows(T* y, int64_t out, const T* z, int64_t r, const T* B, float scale,
                             const int64_t* rows, int64_t count, Acc* scratch, Load load,
                             Store store) {
  if (B == nullptr) return;
  if (count <= 2) {  // too few rows to repay the transposition: one dot over r per output
    const Acc s = static_cast<Acc>(scale);
    for (int64_t i = 0; i < count; ++i) {
      const T* zr = z + rows[i] * r;
      T* yr = y + rows[i] * out;
      for (int64_t o = 0; o < out; ++o) {
        Acc sum = Acc(0);
        for (int64_t j = 0; j < r; ++j) sum += load(zr[j]) * load(B[o * r + j]);
        yr[o] = store(load(yr[o]) + s * sum);
      }
    }
    return;
  }
  const int64_t ld = bgmv_transposed_stride(out);
  Acc* Bt = scratch;            // [r, ld]
  Acc* acc = scratch + r * ld;  // z of the current row, as Acc
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t j = 0; j < r; ++j) Bt[j * ld + o] = load(B[o * r + j]);
  }
  // Outputs in blocks of kBlock accumulators, which stay in registers across the r terms.
  constexpr int64_t kBlock = 32;
  const Acc s = static_cast<Acc>(scale);
  for (int64_t i = 0; i < count; ++i) {
    const T* zr = z + rows[i] * r;
    T* yr = y + rows[i] * out;
    for (int64_t j = 0; j < r; ++j) acc[j] = load(zr[j]);
    int64_t o0 = 0;
    for (; o0 + kBlock <= out; o0 += kBlock) {
      Acc part[kBlock];
      for (int64_t k = 0; k < kBlock; ++k) part[k] = Acc(0);
      for (int64_t j = 0; j < r; ++j) {
        const Acc zj = acc[j];
        const Acc* Bj = Bt + j * ld + o0;
        for (int64_t k = 0; k < kBlock; ++k) part[k] += zj * Bj[k];
      }
      for (int64_t k = 0; k < kBlock; ++k) yr[o0 + k] = store(load(yr[o0 + k]) + s * part[k]);
    }
    for (int64_t o = o0; o < out; ++o) {
      Acc sum = Acc(0);
      for (int64_t j = 0; j < r; ++j) sum += acc[j] * Bt[j * ld + o];
      yr[o] = store(load(yr[o]) + s * sum);
    }
  }
}

// Counting sort of rows by adapter slot (slots[t] in [-1, num_adapters)): order lists the
// rows of slot 0, then slot 1, ...; offsets[a]..offsets[a + 1] delimit slot a's rows
// (offsets has num_adapters + 1 entries). Rows without an adapter are left out.
inline void bgmv_group_rows(const int64_t* slots, int64_t rows, int64_t num_adapters,
                            int64_t* offsets, int64_t* order) {
  for (int64_t a = 0; a <= num_adapters; ++a) offsets[a] = 0;
  for (int64_t t = 0; t < rows; ++t) {
    if (slots[t] >= 0) ++offsets[slots[t] + 1];
  }
  for (int64_t a = 0; a < num_adapters; ++a) offsets[a + 1] += offsets[a];
  // fill with a running cursor per slot, reusing offsets[a] and restoring it afterwards
  for (int64_t t = 0; t < rows; ++t) {
    if (slots[t] >= 0) order[offsets[slots[t]]++] = t;
  }
  for (int64_t a = num_adapters; a > 0; --a) offsets[a] = offsets[a - 1];
  offsets[0] = 0;
}

}  // namespace core
}  // namespace lora_ext
