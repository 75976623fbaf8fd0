#include "embedding.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "../core/embedding.h"

namespace lora_ext {
namespace cpu {
namespace {

template <typename T>
using acc_of = typename core::EmbeddingAcc<T>::type;

template <typename TW, typename TA>
void forward_typed(const at::Tensor& idx, const at::Tensor& weight, const at::Tensor& lora_A,
                   const at::Tensor& bt, double scaling, at::Tensor& y) {
  using Acc = acc_of<TW>;
  const int64_t rows = idx.defined() ? idx.numel() : weight.size(0), out = weight.size(1), r = lora_A.size(0);
  const int64_t ldw = weight.stride(0), sa0 = lora_A.stride(0), sa1 = lora_A.stride(1);
  const int64_t* ip = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
  const TW* wp = weight.const_data_ptr<TW>();
  const TA* ap = lora_A.const_data_ptr<TA>();
  const Acc* btp = bt.const_data_ptr<Acc>();
  TW* yp = y.mutable_data_ptr<TW>();
  const Acc s = static_cast<Acc>(scaling);
  // ~64k multiply-adds per task, so that a task repays a thread's start.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(out * (r + 1), 1));
  at::parallel_for(0, rows, grain, [&](int64_t t0, int64_t t1) {
    std::vector<Acc> a(static_cast<size_t>(r));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t v = ip != nullptr ? ip[t] : t;
      for (int64_t j = 0; j < r; ++j) a[j] = static_cast<Acc>(ap[j * sa0 + v * sa1]);
      core::embedding_lora_row(wp + v * ldw, a.data(), btp, out, r, out, s, yp + t * out,
                               [](TW w) { return static_cast<Acc>(w); },
                               [](Acc v) { return static_cast<TW>(v); });
    }
  });
}

template <typename TS, typename TD>
void segment_sums_typed(const at::Tensor& src, const at::Tensor& sorted, const at::Tensor& perm,
                        double scale, at::Tensor& dst, int64_t stride_v, int64_t stride_c) {
  using Acc = acc_of<TD>;
  const int64_t count = sorted.numel(), cols = src.size(1);
  const TS* sp = src.const_data_ptr<TS>();
  const int64_t* sorted_p = sorted.const_data_ptr<int64_t>();
  const int64_t* perm_p = perm.const_data_ptr<int64_t>();
  TD* dp = dst.mutable_data_ptr<TD>();
  const Acc sc = static_cast<Acc>(scale);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cols, 1));
  // Each segment is summed by the thread whose range holds its head: every index once, in
  // token order, whatever the thread count (deterministic).
  at::parallel_for(0, count, grain, [&](int64_t p0, int64_t p1) {
    std::vector<Acc> sum(static_cast<size_t>(cols));
    for (int64_t p = p0; p < p1; ++p) {
      if (sorted_p[p] < 0 || !core::embedding_segment_head(sorted_p, p)) continue;
      const int64_t end = core::embedding_segment_end(sorted_p, count, p);
      const int64_t v = sorted_p[p];
      // rows of src in token order, added column-wise (vectorises over c)
      for (int64_t c = 0; c < cols; ++c) sum[c] = Acc(0);
      for (int64_t q = p; q < end; ++q) {
        const TS* row = sp + perm_p[q] * cols;
        for (int64_t c = 0; c < cols; ++c) sum[c] += static_cast<Acc>(row[c]);
      }
      for (int64_t c = 0; c < cols; ++c) dp[v * stride_v + c * stride_c] = static_cast<TD>(sc * sum[c]);
    }
  });
}

}  // namespace

void embedding_lora_forward(const at::Tensor& idx, const at::Tensor& weight,
                            const at::Tensor& lora_A, const at::Tensor& bt, double scaling,
                            at::Tensor& y) {
  if ((idx.defined() ? idx.numel() : weight.size(0)) == 0 || weight.size(1) == 0) return;
  const bool wide_adapters = lora_A.scalar_type() != weight.scalar_type();  // fp32 over half
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lora_embedding", [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      forward_typed<scalar_t, scalar_t>(idx, weight, lora_A, bt, scaling, y);
    } else if (wide_adapters) {
      forward_typed<scalar_t, float>(idx, weight, lora_A, bt, scaling, y);
    } else {
      forward_typed<scalar_t, scalar_t>(idx, weight, lora_A, bt, scaling, y);
    }
  });
}

void embedding_segment_sums(const at::Tensor& src, const at::Tensor& sorted, const at::Tensor& perm,
                            double scale, at::Tensor& dst, int64_t stride_v, int64_t stride_c) {
  if (sorted.numel() == 0 || src.size(1) == 0) return;
  const bool wide_src = src.scalar_type() != dst.scalar_type();  // fp32 sums into a half dst
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "lora_embedding_backward", [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      segment_sums_typed<scalar_t, scalar_t>(src, sorted, perm, scale, dst, stride_v, stride_c);
    } else if (wide_src) {
      segment_sums_typed<float, scalar_t>(src, sorted, perm, scale, dst, stride_v, stride_c);
    } else {
      segment_sums_typed<scalar_t, scalar_t>(src, sorted, perm, scale, dst, stride_v, stride_c);
    }
  });
}

}  // namespace cpu
}  // namespace lora_ext
