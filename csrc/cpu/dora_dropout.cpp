#include "dora_dropout.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "isa.h"
#include "lora_linear.h"  // dropout_multipliers

namespace lora_ext {
namespace cpu {
namespace {

// s[o] += a · w[o]: the row of Wᵀ of one dropped element.
template <typename Acc>
LORA_EXT_FORCE_INLINE void axpy_body(Acc* s, Acc a, const Acc* w, int64_t n) {
  for (int64_t o = 0; o < n; ++o) s[o] += a * w[o];
}
template <typename Acc>
LORA_EXT_FORCE_INLINE Acc dot_body(const Acc* a, const Acc* b, int64_t n) {
  // Eight partial sums: vectorisable without reassociating one long chain.
  Acc part[8] = {};
  int64_t o = 0;
  for (; o + 8 <= n; o += 8) {
    for (int l = 0; l < 8; ++l) part[l] += a[o + l] * b[o + l];
  }
  Acc sum = 0;
  for (int l = 0; l < 8; ++l) sum += part[l];
  for (; o < n; ++o) sum += a[o] * b[o];
  return sum;
}
LORA_EXT_ISA_CLONES(void, axpy_f32, (float* s, float a, const float* w, int64_t n), (s, a, w, n),
                    axpy_body<float>)
LORA_EXT_ISA_CLONES(void, axpy_f64, (double* s, double a, const double* w, int64_t n), (s, a, w, n),
                    axpy_body<double>)
LORA_EXT_ISA_CLONES(float, dot_f32, (const float* a, const float* b, int64_t n), (a, b, n),
                    dot_body<float>)
LORA_EXT_ISA_CLONES(double, dot_f64, (const double* a, const double* b, int64_t n), (a, b, n),
                    dot_body<double>)
inline void axpy(float* s, float a, const float* w, int64_t n) { axpy_f32(s, a, w, n); }
inline void axpy(double* s, double a, const double* w, int64_t n) { axpy_f64(s, a, w, n); }
inline float dot(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
inline double dot(const double* a, const double* b, int64_t n) { return dot_f64(a, b, n); }

// Calls f(t, k) for every dropped element of rows [t0, t1) of a [rows, in] tensor, row by row.
template <typename Acc, typename F>
void for_dropped(int64_t t0, int64_t t1, int64_t in, const core::DropoutParams& params, F&& f) {
  std::vector<Acc> m(in);
  for (int64_t t = t0; t < t1; ++t) {
    dropout_multipliers(m.data(), t * in, in, params);
    for (int64_t k = 0; k < in; ++k) {
      if (m[k] == Acc(0)) f(t, k);
    }
  }
}

}  // namespace

at::Tensor dropped_rows_product(const at::Tensor& x2d, const at::Tensor& wt,
                                const core::DropoutParams& params) {
  const int64_t rows = x2d.size(0), in = x2d.size(1), out = wt.size(1);
  const at::Tensor x = x2d.to(wt.scalar_type()).contiguous();
  at::Tensor s = at::zeros({rows, out}, wt.options());
  AT_DISPATCH_FLOATING_TYPES(wt.scalar_type(), "lora_ext_dropped_rows_product", [&] {
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* w = wt.const_data_ptr<scalar_t>();
    scalar_t* sp = s.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t t0, int64_t t1) {
      for_dropped<scalar_t>(t0, t1, in, params, [&](int64_t t, int64_t k) {
        axpy(sp + t * out, xs[t * in + k], w + k * out, out);
      });
    });
  });
  return s;
}

void subtract_dropped_dots(at::Tensor& grad_x, const at::Tensor& gy, const at::Tensor& wt,
                           double factor, const core::DropoutParams& params) {
  const int64_t rows = grad_x.size(0), in = grad_x.size(1), out = wt.size(1);
  const at::Tensor g = gy.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(),
                                  "lora_ext_subtract_dropped_dots", [&] {
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES(wt.scalar_type(), "lora_ext_subtract_dropped_dots_acc", [&] {
      using Acc = scalar_t;
      const Acc* gp = g.const_data_ptr<Acc>();
      const Acc* w = wt.const_data_ptr<Acc>();
      const Acc f = static_cast<Acc>(factor);
      at::parallel_for(0, rows, 16, [&](int64_t t0, int64_t t1) {
        for_dropped<Acc>(t0, t1, in, params, [&](int64_t t, int64_t k) {
          auto& e = gx[t * in + k];
          e = static_cast<std::remove_reference_t<decltype(e)>>(static_cast<Acc>(e) - f * dot(gp + t * out, w + k * out, out));
        });
      });
    });
  });
}

}  // namespace cpu
}  // namespace lora_ext
