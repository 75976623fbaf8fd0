// The fused LoRA linear on CPU. The low-rank work runs over tiles of rows, each taken through
// all of its steps while it is in cache:
//   forward:  D = x ⊙ m (the Philox multipliers m, 0 or 1/(1-p)) and z = D·Aᵀ per tile: x is
//             read once and drop(x) exists only as an L2-sized tile;
//   backward: per tile, grad_z = s·g·B and the partial grad_B += gᵀ·z from one read of grad_y,
//             the regenerated D and the partial grad_A += grad_zᵀ·D from one read of x, and
//             grad_x's low-rank term (grad_z·A) ⊙ m written in place.
// The skinny products use the BLAS on tiles (one thread each, OpenMP over tiles), accumulating
// in fp32 (fp64 for double). The base GEMMs stay whole-tensor calls that accumulate onto the
// low-rank terms (beta = 1), so W is streamed as few times as the BLAS needs. Where the CPU
// has no native bf16 (or fp16) arithmetic, the base GEMM runs in fp32 from the half-precision
// storage: PyTorch's own bf16 GEMM is about 45x slower than fp32 there.
#include "lora_fused.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <vector>

#include "isa.h"
#include "lora_linear.h"

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

// The tile of rows [t0, t0 + n) of a contiguous 2-D tensor, in the accumulation dtype: the
// tensor's own storage when the dtypes agree, else converted into `buffer`.
Tensor tile_in(const Tensor& t, int64_t t0, int64_t n, Tensor& buffer) {
  const Tensor rows = t.narrow(0, t0, n);
  if (rows.scalar_type() == buffer.scalar_type()) return rows;
  Tensor out = buffer.narrow(0, 0, n);
  out.copy_(rows);
  return out;
}

// The dropout multipliers of a tile of n rows whose first element has flat index `first`.
Tensor tile_multipliers(int64_t first, int64_t n, const core::DropoutParams& params, Tensor& m_buf) {
  Tensor m = m_buf.narrow(0, 0, n);
  if (m.scalar_type() == at::kDouble) {
    dropout_multipliers(m.data_ptr<double>(), first, m.numel(), params);
  } else {
    dropout_multipliers(m.data_ptr<float>(), first, m.numel(), params);
  }
  return m;
}

struct Buffers {
  Tensor x, m, d, g, lr;
  Buffers(int64_t rows, int64_t in, int64_t out, const at::TensorOptions& acc) {
    x = at::empty({rows, in}, acc);
    m = at::empty({rows, in}, acc);
    d = at::empty({rows, in}, acc);
    g = at::empty({rows, out}, acc);
    lr = at::empty({rows, in}, acc);
  }
};

Tensor shrink_tiles(const Tensor& x2d, const Tensor& a_acc, double p, const core::DropoutParams& params) {
  const int64_t rows = x2d.size(0), in = x2d.size(1), r = a_acc.size(0);
  const auto acc = x2d.options().dtype(a_acc.scalar_type());
  Tensor z = at::empty({rows, r}, acc);
  const int64_t tr = tile_rows(in), tiles = (rows + tr - 1) / tr;
  const at::ThreadLocalState caller;  // below autograd, as the op itself runs
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard below_autograd(caller);
    Buffers buf(std::min(tr, rows), in, 0, acc);
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t t0 = tile * tr, n = std::min(tr, rows - t0);
      const Tensor x_acc = tile_in(x2d, t0, n, buf.x);
      Tensor d = x_acc;
      if (p > 0.0) {
        d = buf.d.narrow(0, 0, n);
        at::mul_out(d, x_acc, tile_multipliers(t0 * in, n, params, buf.m));
      }
      Tensor z_tile = z.narrow(0, t0, n);
      at::mm_out(z_tile, d, a_acc.t());
    }
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
  const int threads = at::get_num_threads();
  std::vector<Tensor> parts(threads);
  const int64_t tr = tile_rows(in), tiles = (rows + tr - 1) / tr;
  const at::ThreadLocalState caller;  // below autograd, as the op itself runs
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard below_autograd(caller);
    Buffers buf(std::min(tr, rows), in, 0, acc_opts);
    Tensor& part = parts[at::get_thread_num()];
    if (!part.defined()) part = at::zeros({r, in}, acc_opts);
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t t0 = tile * tr, n = std::min(tr, rows - t0);
      Tensor d = tile_in(x2d, t0, n, buf.x);
      if (dropout_p > 0.0) {
        Tensor dropped = buf.d.narrow(0, 0, n);
        at::mul_out(dropped, d, tile_multipliers(t0 * in, n, params, buf.m));
        d = dropped;
      }
      part.addmm_(gz.narrow(0, t0, n).t(), d);
    }
  });
  Tensor grad_A = at::zeros({r, in}, acc_opts);
  for (const Tensor& part : parts) {
    if (part.defined()) grad_A.add_(part);
  }
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
  const int64_t rows = x2d.size(0), in = x2d.size(1), out = g2d.size(1);
  const at::ScalarType storage = x2d.scalar_type(), acc = acc_type(storage), base = base_gemm_type(storage);
  const auto acc_opts = x2d.options().dtype(acc);
  const Tensor a_acc = lora_A.to(acc), b_acc = lora_B.to(acc), z_acc = z.reshape({rows, lora_A.size(0)}).to(acc);
  // grad_x's low-rank term lands directly in the tensor the base GEMM accumulates onto.
  Tensor grad_x = need_x ? at::empty({rows, in}, x2d.options().dtype(base)) : Tensor();
  const int threads = at::get_num_threads();
  std::vector<Tensor> part_A(threads), part_B(threads);
  const int64_t tr = tile_rows(std::max(in, out)), tiles = (rows + tr - 1) / tr;
  const at::ThreadLocalState caller;  // below autograd, as the op itself runs
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard below_autograd(caller);
    const int slot = at::get_thread_num();
    Buffers buf(std::min(tr, rows), in, out, acc_opts);
    Tensor& pA = part_A[slot];
    Tensor& pB = part_B[slot];
    if (need_A && !pA.defined()) pA = at::zeros({lora_A.size(0), in}, acc_opts);
    if (need_B && !pB.defined()) pB = at::zeros({out, lora_A.size(0)}, acc_opts);
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t t0 = tile * tr, n = std::min(tr, rows - t0);
      const Tensor g_acc = tile_in(g2d, t0, n, buf.g);
      if (need_B) pB.addmm_(g_acc.t(), z_acc.narrow(0, t0, n));
      if (!need_x && !need_A) continue;
      const Tensor grad_z = at::mm(g_acc, b_acc).mul_(scaling);
      const Tensor m = dropout_p > 0.0 ? tile_multipliers(t0 * in, n, params, buf.m) : Tensor();
      Tensor d;
      if (need_A) {
        d = tile_in(x2d, t0, n, buf.x);
        if (m.defined()) {
          Tensor dropped = buf.d.narrow(0, 0, n);
          at::mul_out(dropped, d, m);
          d = dropped;
        }
      }
      if (need_A) pA.addmm_(grad_z.t(), d);
      if (need_x) {
        // Straight into grad_x when it has the accumulation dtype, else through a tile.
        Tensor rows_x = grad_x.narrow(0, t0, n);
        Tensor lr = rows_x.scalar_type() == acc ? rows_x : buf.lr.narrow(0, 0, n);
        at::mm_out(lr, grad_z, a_acc);
        if (m.defined()) lr.mul_(m);
        if (!lr.is_same(rows_x)) rows_x.copy_(lr);
      }
    }
  });
  auto total = [&](std::vector<Tensor>& parts, at::IntArrayRef shape) {
    Tensor sum = at::zeros(shape, acc_opts);
    for (const Tensor& part : parts) {
      if (part.defined()) sum.add_(part);
    }
    return sum;
  };
  Tensor grad_A = need_A ? total(part_A, lora_A.sizes()).to(lora_A.scalar_type()) : at::empty({0}, lora_A.options());
  Tensor grad_B = need_B ? total(part_B, lora_B.sizes()).mul_(scaling).to(lora_B.scalar_type())
                         : at::empty({0}, lora_B.options());
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
