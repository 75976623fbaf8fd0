// The fused LoRA linear on CPU. The low-rank work runs over tiles of rows, each taken through
// all of its steps while it is in cache:
//   forward:  D = x ⊙ m (the Philox multipliers m, 0 or 1/(1-p)) and z = D·Aᵀ per tile: x is
//             read once and drop(x) exists only as a few rows inside the shrink kernel;
//   backward: per tile, grad_z = s·g·B and the partial grad_B += gᵀ·z from one read of grad_y,
//             the regenerated D and the partial grad_A += grad_zᵀ·D from one read of x, and
//             grad_x's low-rank term (grad_z·A) ⊙ m written in place.
// The skinny products are our own micro-kernels (skinny_gemm.h: vectorised per instruction set,
// one thread each, OpenMP over tiles), accumulating in fp32 (fp64 for double) straight from
// the storage dtype. The base GEMMs stay whole-tensor calls that accumulate onto the
// low-rank terms (beta = 1), so W is streamed as few times as the BLAS needs. Where the CPU
// has no native bf16 (or fp16) arithmetic, the base GEMM runs in fp32 from the half-precision
// storage: PyTorch's own bf16 GEMM is about 45x slower than fp32 there.
#include "lora_fused.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "lora_linear.h"
#include "skinny_gemm.h"

namespace lora_ext {
namespace cpu {
namespace {

using at::Tensor;

// Rows per tile: about 64K elements of x (256 KiB in fp32) so that a tile and its products stay
// in L2 while every step reads it.
int64_t tile_rows(int64_t in) { return std::clamp<int64_t>(65536 / std::max<int64_t>(in, 1), 4, 4096); }

at::ScalarType acc_type(at::ScalarType storage) {
  return storage == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls f(T{}) with the kernels' element type for a dtype.
template <typename F>
void with_element_type(at::ScalarType type, const F& f) {
  static_assert(sizeof(c10::BFloat16) == sizeof(Bf16) && sizeof(c10::Half) == sizeof(F16));
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(Bf16{});
    case at::kHalf: return f(F16{});
    default: TORCH_CHECK(false, "lora_ext fused linear: unsupported dtype ", type);
  }
}

template <typename T>
const T* elements(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_elements(Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// The packed copy the kernels want of a [rows, cols] matrix (zeros beyond its columns).
Tensor packed(const Tensor& m) {
  const int64_t cols = m.size(1);
  const int64_t ld = m.scalar_type() == at::kDouble ? padded_cols<double>(cols) : padded_cols<float>(cols);
  Tensor out = at::zeros({m.size(0), ld}, m.options());
  out.narrow(1, 0, cols).copy_(m);
  return out;
}

// Per-thread partial sums [r, ld] of a weight gradient, added in a fixed order (by thread
// slot) at the end.
template <typename Acc>
struct Partials {
  std::vector<std::vector<Acc>> slots;
  int64_t r, ld;
  Partials(int64_t r_, int64_t cols) : slots(at::get_num_threads()), r(r_), ld(padded_cols<Acc>(cols)) {}
  Acc* mine() {
    std::vector<Acc>& slot = slots[at::get_thread_num()];
    if (slot.empty()) slot.assign(static_cast<size_t>(r * ld), Acc(0));
    return slot.data();
  }
  // The [r, cols] total.
  Tensor total(int64_t cols, const at::TensorOptions& options) const {
    Tensor sum = at::zeros({r, ld}, options);
    Acc* out = mutable_elements<Acc>(sum);
    for (const std::vector<Acc>& slot : slots) {
      for (size_t i = 0; i < slot.size(); ++i) out[i] += slot[i];
    }
    return sum.narrow(1, 0, cols);
  }
};

// The dropout multipliers of the tile of rows [t0, t0 + n) of an [rows, in] tensor.
template <typename Acc>
const Acc* tile_multipliers(int64_t t0, int64_t n, int64_t in, const core::DropoutParams& params,
                            std::vector<Acc>& buffer) {
  buffer.resize(static_cast<size_t>(n * in));
  dropout_multipliers(buffer.data(), t0 * in, n * in, params);
  return buffer.data();
}

Tensor shrink_tiles(const Tensor& x2d, const Tensor& a_acc, double p, const core::DropoutParams& params) {
  const int64_t rows = x2d.size(0), in = x2d.size(1), r = a_acc.size(0);
  Tensor z = at::empty({rows, r}, x2d.options().dtype(a_acc.scalar_type()));
  const Tensor at_packed = packed(a_acc.t());  // Aᵀ [in, r]
  const int64_t tr = tile_rows(in), tiles = (rows + tr - 1) / tr;
  with_element_type(x2d.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_of<T>;
    const T* x = elements<T>(x2d);
    const Acc* a = elements<Acc>(at_packed);
    Acc* zp = mutable_elements<Acc>(z);
    at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
      std::vector<Acc> m_buf;
      for (int64_t tile = b; tile < e; ++tile) {
        const int64_t t0 = tile * tr, n = std::min(tr, rows - t0);
        const Acc* m = p > 0.0 ? tile_multipliers(t0, n, in, params, m_buf) : nullptr;
        rows_by_rank(x + t0 * in, in, m, in, a, at_packed.size(1), n, in, r, Acc(1), zp + t0 * r, r);
      }
    });
  });
  return z;
}

}  // namespace

bool cpu_has_native_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool native = __builtin_cpu_supports("avx512bf16");
  return native && cpu_isa() == Isa::kAvx512;
#else
  return false;
#endif
}

at::ScalarType base_gemm_type(at::ScalarType storage) {
  if (storage == at::kBFloat16) return cpu_has_native_bf16() ? at::kBFloat16 : at::kFloat;
  if (storage == at::kHalf) return at::kFloat;
  return storage;
}

Tensor fused_shrink(const Tensor& x2d, const Tensor& lora_A, double dropout_p,
                    const core::DropoutParams& params) {
  return shrink_tiles(x2d.contiguous(), lora_A.to(acc_type(x2d.scalar_type())), dropout_p, params);
}

Tensor fused_grad_a(const Tensor& grad_z, const Tensor& x2d_in, double dropout_p,
                    const core::DropoutParams& params) {
  const Tensor x2d = x2d_in.contiguous();
  const int64_t rows = x2d.size(0), in = x2d.size(1), r = grad_z.size(1);
  const auto acc_opts = x2d.options().dtype(acc_type(x2d.scalar_type()));
  const Tensor gz = grad_z.to(acc_opts.dtype()).contiguous();
  const int64_t tr = tile_rows(in), tiles = (rows + tr - 1) / tr;
  Tensor grad_A;
  with_element_type(x2d.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_of<T>;
    const T* x = elements<T>(x2d);
    const Acc* z = elements<Acc>(gz);
    Partials<Acc> parts(r, in);
    at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
      std::vector<Acc> m_buf;
      Acc* part = parts.mine();
      for (int64_t tile = b; tile < e; ++tile) {
        const int64_t t0 = tile * tr, n = std::min(tr, rows - t0);
        const Acc* m = dropout_p > 0.0 ? tile_multipliers(t0, n, in, params, m_buf) : nullptr;
        rank_by_cols(z + t0 * r, r, x + t0 * in, in, m, in, n, in, r, part, parts.ld);
      }
    });
    grad_A = parts.total(in, acc_opts).contiguous();
  });
  return grad_A;
}

std::tuple<Tensor, Tensor> fused_forward(const Tensor& x2d_in, const Tensor& weight,
                                         const Tensor& bias, const Tensor& lora_A,
                                         const Tensor& lora_B, double scaling, double dropout_p,
                                         const core::DropoutParams& params) {
  const Tensor x2d = x2d_in.contiguous();
  const at::ScalarType storage = x2d.scalar_type(), acc = acc_type(storage), base = base_gemm_type(storage);
  const Tensor a_acc = lora_A.to(acc), b_acc = lora_B.to(acc);
  const Tensor z_acc = shrink_tiles(x2d, a_acc, dropout_p, params);
  // The low-rank term and bias first, then the base GEMM accumulates onto it (beta = 1).
  Tensor y = bias.defined() ? at::addmm(bias.to(base), z_acc.to(base), b_acc.t().to(base), 1, scaling)
                            : at::mm(z_acc.to(base), (b_acc.t() * scaling).to(base));
  y.addmm_(x2d.to(base), weight.to(base).t());
  return {y.to(storage), z_acc.to(storage)};
}

std::tuple<Tensor, Tensor, Tensor> fused_backward(const Tensor& g2d_in, const Tensor& x2d_in,
                                                  const Tensor& z, const Tensor& weight,
                                                  const Tensor& lora_A, const Tensor& lora_B,
                                                  double scaling, double dropout_p,
                                                  const core::DropoutParams& params,
                                                  std::array<bool, 3> output_mask) {
  const bool need_x = output_mask[0], need_A = output_mask[1], need_B = output_mask[2];
  const Tensor g2d = g2d_in.contiguous(), x2d = x2d_in.contiguous();
  const int64_t rows = x2d.size(0), in = x2d.size(1), out = g2d.size(1), r = lora_A.size(0);
  const at::ScalarType storage = x2d.scalar_type(), acc = acc_type(storage), base = base_gemm_type(storage);
  const auto acc_opts = x2d.options().dtype(acc);
  const Tensor a_packed = packed(lora_A.to(acc)), b_packed = packed(lora_B.to(acc));
  const Tensor z_acc = z.reshape({rows, r}).to(acc).contiguous();
  // grad_x's low-rank term lands directly in the tensor the base GEMM accumulates onto.
  Tensor grad_x = need_x ? at::empty({rows, in}, x2d.options().dtype(base)) : Tensor();
  Tensor grad_A = at::empty({0}, lora_A.options()), grad_B = at::empty({0}, lora_B.options());
  const int64_t tr = tile_rows(std::max(in, out)), tiles = (rows + tr - 1) / tr;
  with_element_type(storage, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_of<T>;
    const T* x = elements<T>(x2d);
    const T* g = elements<T>(g2d);
    const Acc* zp = elements<Acc>(z_acc);
    Partials<Acc> part_A(need_A ? r : 0, in), part_B(need_B ? r : 0, out);  // grad_Bᵀ
    at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
      std::vector<Acc> m_buf, gz_buf(static_cast<size_t>(std::min(tr, rows) * r));
      Acc* pA = need_A ? part_A.mine() : nullptr;
      Acc* pB = need_B ? part_B.mine() : nullptr;
      for (int64_t tile = b; tile < e; ++tile) {
        const int64_t t0 = tile * tr, n = std::min(tr, rows - t0);
        const T* g_tile = g + t0 * out;
        if (need_B) rank_by_cols(zp + t0 * r, r, g_tile, out, nullptr, 0, n, out, r, pB, part_B.ld);
        if (!need_x && !need_A) continue;
        Acc* gz = gz_buf.data();  // grad_z = s·g·B
        rows_by_rank(g_tile, out, nullptr, 0, elements<Acc>(b_packed), b_packed.size(1), n, out, r,
                     static_cast<Acc>(scaling), gz, r);
        const Acc* m = dropout_p > 0.0 ? tile_multipliers(t0, n, in, params, m_buf) : nullptr;
        if (need_A) rank_by_cols(gz, r, x + t0 * in, in, m, in, n, in, r, pA, part_A.ld);
        if (need_x) {
          // grad_x is in the base GEMM's dtype: Acc, or bf16 where bf16 is native.
          const Acc* a = elements<Acc>(a_packed);
          if (grad_x.scalar_type() == at::kBFloat16) {
            if constexpr (std::is_same_v<Acc, float>) {
              rank_to_cols(gz, r, a, a_packed.size(1), m, in, n, in, r,
                           mutable_elements<Bf16>(grad_x) + t0 * in, in);
            }
          } else {
            rank_to_cols(gz, r, a, a_packed.size(1), m, in, n, in, r,
                         mutable_elements<Acc>(grad_x) + t0 * in, in);
          }
        }
      }
    });
    if (need_A) grad_A = part_A.total(in, acc_opts).contiguous().to(lora_A.scalar_type());
    if (need_B) grad_B = part_B.total(out, acc_opts).t().mul(scaling).contiguous().to(lora_B.scalar_type());
  });
  if (need_x) {
    grad_x.addmm_(g2d.to(base), weight.to(base));
    grad_x = grad_x.to(storage);
  } else {
    grad_x = at::empty({0}, x2d.options());
  }
  return {grad_x, grad_A, grad_B};
}

}  // namespace cpu
}  // namespace lora_ext
