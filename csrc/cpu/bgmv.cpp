#include "bgmv.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <type_traits>
#include <vector>

#include "../core/bgmv.h"
#include "../core/dropout.h"  // LORA_EXT_FORCE_INLINE
#include "isa.h"

namespace lora_ext {
namespace cpu {
namespace {

// Rows per work item: each item reuses one adapter's slab across this many rows, and the
// items are what the threads share out.
constexpr int64_t kRowsPerItem = 32;

struct Item {
  int64_t group, begin, end;  // positions in RowGroups::order
};

std::vector<Item> make_items(const RowGroups& groups) {
  std::vector<Item> items;
  const int64_t* offsets = groups.offsets.const_data_ptr<int64_t>();
  const int64_t num_groups = groups.slots.numel();
  for (int64_t g = 0; g < num_groups; ++g) {
    for (int64_t b = offsets[g]; b < offsets[g + 1]; b += kRowsPerItem) {
      items.push_back({g, b, std::min(b + kRowsPerItem, offsets[g + 1])});
    }
  }
  return items;
}

// Items per thread task, so that a task is worth a thread's start-up (~64k multiply-adds).
int64_t grain_for(int64_t work_per_row) {
  const int64_t per_item = kRowsPerItem * std::max<int64_t>(work_per_row, 1);
  return std::max<int64_t>(1, (int64_t{1} << 16) / per_item);
}

template <typename T>
float to_acc(T v) {
  return static_cast<float>(v);
}
inline double to_acc(double v) { return v; }

template <typename T>
using acc_of = decltype(to_acc(T()));

template <typename T>
struct Load {
  acc_of<T> operator()(T v) const { return to_acc(v); }
};
template <typename T>
struct Store {
  T operator()(acc_of<T> v) const { return static_cast<T>(v); }
};

// fp32, the serving dtype on CPUs, also gets AVX2/AVX-512 builds of the same code, picked at
// run time by cpu_isa() (no FMA contraction under ISO C++, so every build gives the same bits).
LORA_EXT_FORCE_INLINE void shrink_item_f32_body(const float* x, int64_t in, const float* A,
                                                int64_t r, const int64_t* rows, int64_t count,
                                                float* z) {
  core::bgmv_shrink_rows(x, in, A, r, rows, count, z, Load<float>(), Store<float>());
}
LORA_EXT_ISA_CLONES(void, shrink_item_f32,
                    (const float* x, int64_t in, const float* A, int64_t r, const int64_t* rows,
                     int64_t count, float* z),
                    (x, in, A, r, rows, count, z), shrink_item_f32_body)

LORA_EXT_FORCE_INLINE void expand_item_f32_body(float* y, int64_t out, const float* z, int64_t r,
                                                const float* B, float scale, const int64_t* rows,
                                                int64_t count, float* scratch) {
  core::bgmv_expand_rows(y, out, z, r, B, scale, rows, count, scratch, Load<float>(),
                         Store<float>());
}
LORA_EXT_ISA_CLONES(void, expand_item_f32,
                    (float* y, int64_t out, const float* z, int64_t r, const float* B, float scale,
                     const int64_t* rows, int64_t count, float* scratch),
                    (y, out, z, r, B, scale, rows, count, scratch), expand_item_f32_body)

template <typename T>
void shrink_item(const T* x, int64_t in, const T* A, int64_t r, const int64_t* rows, int64_t count,
                 T* z) {
  if constexpr (std::is_same_v<T, float>) {
    shrink_item_f32(x, in, A, r, rows, count, z);
  } else {
    core::bgmv_shrink_rows(x, in, A, r, rows, count, z, Load<T>(), Store<T>());
  }
}

template <typename T>
void expand_item(T* y, int64_t out, const T* z, int64_t r, const T* B, float scale,
                 const int64_t* rows, int64_t count, acc_of<T>* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    expand_item_f32(y, out, z, r, B, scale, rows, count, scratch);
  } else {
    core::bgmv_expand_rows(y, out, z, r, B, scale, rows, count, scratch, Load<T>(), Store<T>());
  }
}

}  // namespace

RowGroups group_rows_by_slot(const at::Tensor& slots, int64_t num_adapters) {
  const int64_t rows = slots.numel();
  const auto opts = slots.options().dtype(at::kLong);
  at::Tensor order = at::empty({rows}, opts);
  at::Tensor offsets = at::empty({num_adapters + 1}, opts);
  core::bgmv_group_rows(slots.const_data_ptr<int64_t>(), rows, num_adapters,
                        offsets.mutable_data_ptr<int64_t>(), order.mutable_data_ptr<int64_t>());
  // Keep only the adapters that have rows: one group each.
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  std::vector<int64_t> used;
  for (int64_t a = 0; a < num_adapters; ++a) {
    if (off[a + 1] > off[a]) used.push_back(a);
  }
  RowGroups groups;
  groups.order = order;
  groups.offsets = at::empty({static_cast<int64_t>(used.size()) + 1}, opts);
  groups.slots = at::empty({static_cast<int64_t>(used.size())}, opts);
  int64_t* g_off = groups.offsets.mutable_data_ptr<int64_t>();
  int64_t* g_slot = groups.slots.mutable_data_ptr<int64_t>();
  g_off[0] = 0;
  for (size_t g = 0; g < used.size(); ++g) {
    g_slot[g] = used[g];
    g_off[g + 1] = off[used[g] + 1];
  }
  // order is sorted by slot, so each used slot's rows are contiguous and g_off[g] == off[a].
  return groups;
}

RowGroups group_rows_by_segment(const at::Tensor& seg_starts, const at::Tensor& seg_adapter) {
  const int64_t num_segments = seg_adapter.numel();
  const int64_t* starts = seg_starts.const_data_ptr<int64_t>();
  const int64_t* adapters = seg_adapter.const_data_ptr<int64_t>();
  const auto opts = seg_starts.options();
  int64_t total = 0, used = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    if (adapters[s] >= 0 && starts[s + 1] > starts[s]) {
      total += starts[s + 1] - starts[s];
      ++used;
    }
  }
  RowGroups groups;
  groups.order = at::empty({total}, opts);
  groups.offsets = at::empty({used + 1}, opts);
  groups.slots = at::empty({used}, opts);
  int64_t* order = groups.order.mutable_data_ptr<int64_t>();
  int64_t* offsets = groups.offsets.mutable_data_ptr<int64_t>();
  int64_t* slots = groups.slots.mutable_data_ptr<int64_t>();
  int64_t g = 0, n = 0;
  offsets[0] = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    if (adapters[s] >= 0 && starts[s + 1] > starts[s]) {
      for (int64_t t = starts[s]; t < starts[s + 1]; ++t) order[n++] = t;
      slots[g] = adapters[s];
      offsets[++g] = n;
    }
  }
  return groups;
}

void grouped_shrink(const at::Tensor& x, const at::Tensor& lora_A, const RowGroups& groups,
                    at::Tensor& z) {
  const int64_t in = x.size(1), r = lora_A.size(1);
  if (r == 0 || groups.order.numel() == 0) return;
  const std::vector<Item> items = make_items(groups);
  const int64_t* order = groups.order.const_data_ptr<int64_t>();
  const int64_t* slots = groups.slots.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* ap = lora_A.const_data_ptr<scalar_t>();
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(items.size()), grain_for(r * in),
                     [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Item& item = items[i];
        shrink_item(xp, in, ap + slots[item.group] * r * in, r, order + item.begin,
                    item.end - item.begin, zp);
      }
    });
  });
}

void grouped_expand(at::Tensor& y, const at::Tensor& z, const at::Tensor& lora_B,
                    const at::Tensor& scale, const RowGroups& groups) {
  const int64_t out = y.size(1), r = z.size(1);
  if (r == 0 || out == 0 || groups.order.numel() == 0) return;
  const std::vector<Item> items = make_items(groups);
  const int64_t* order = groups.order.const_data_ptr<int64_t>();
  const int64_t* slots = groups.slots.const_data_ptr<int64_t>();
  const float* sp = scale.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "lora_expand", [&] {
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* bp = lora_B.const_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(items.size()), grain_for(r * out),
                     [&](int64_t i0, int64_t i1) {
      std::vector<acc_of<scalar_t>> scratch(static_cast<size_t>(core::bgmv_expand_scratch(out, r)));
      for (int64_t i = i0; i < i1; ++i) {
        const Item& item = items[i];
        const int64_t slot = slots[item.group];
        expand_item(yp, out, zp, r, bp + slot * out * r, sp[slot], order + item.begin,
                    item.end - item.begin, scratch.data());
      }
    });
  });
}

}  // namespace cpu
}  // namespace lora_ext
