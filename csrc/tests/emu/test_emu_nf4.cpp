// The NF4 kernels of csrc/cuda/nf4.cu, executed in the CUDA emulation. Bit for bit against
// the torch-free core (whose host path the CPU kernels share, and which equals
// bitsandbytes): quantize at every blocksize from 32 to 4096 with partial blocks and NaN,
// dequantize on the vectorised and the scalar path (windows, misaligned outputs, element
// offsets beyond 2^31), and the 8-bit double quantisation of absmax. By the tolerance rule
// against a long-double reference: the GEMV on both paths, 1 to 8 rows, with and without
// bias, and the tiled GEMM and its gradient of x (tensor-core and register paths, partial
// tiles, partial NF4 blocks, plain and double-quantised absmax).
#include "cuda/nf4.cu"
#include "tests/emu/emu_testing.h"

using namespace lora_ext;
using namespace emu_test;

static int failures = 0;
static constexpr int64_t kTileRows = cuda::kTileM;  // the GEMM's rows per block

static const float kCode[core::kNF4Codes] = {LORA_EXT_NF4_CODE_VALUES};

// bitsandbytes' layout, from the core's scalar functions.
template <typename T>
static void host_quantize(const std::vector<T>& x, int64_t bs, std::vector<uint8_t>& packed,
                          std::vector<float>& absmax) {
  const int64_t n = static_cast<int64_t>(x.size());
  float bounds[core::kNF4Codes - 1];
  core::nf4_bounds(kCode, bounds);
  packed.assign((n + 1) / 2, 0);
  absmax.assign((n + bs - 1) / bs, 0.0f);
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t first = b * bs, len = std::min(bs, n - first);
    float m = 0.0f;
    for (int64_t i = 0; i < len; ++i) m = core::absmax_fold(m, static_cast<float>(Storage<T>::from(x[first + i])));
    absmax[b] = m;
    const core::NF4Scaler scale = core::nf4_scaler(m, len < bs);
    for (int64_t i = 0; i < len; i += 2) {
      const uint8_t q0 = core::nf4_encode(scale(static_cast<float>(Storage<T>::from(x[first + i]))), bounds);
      const uint8_t q1 = i + 1 < len ? core::nf4_encode(scale(static_cast<float>(Storage<T>::from(x[first + i + 1]))), bounds)
                                     : core::kNF4PadCode;
      packed[(first + i) / 2] = core::nf4_pack(q0, q1);
    }
  }
}

template <typename T>
static void test_quantize(int64_t n, int64_t bs) {
  std::vector<T> x = random_vector<T>(n, n + bs, 3.0);
  if (n > 5) x[n / 2] = Storage<T>::to(NAN);  // a NaN block: absmax NaN, codes as the core says
  if (n > 9) x[3] = Storage<T>::to(0.0);
  std::vector<uint8_t> want_packed, packed((n + 1) / 2, 0xAB);
  std::vector<float> want_absmax, absmax((n + bs - 1) / bs, -1.0f);
  host_quantize(x, bs, want_packed, want_absmax);
  const cudaError_t err = cuda::launch_nf4_quantize(dtype_of<T>(), x.data(), n, bs, packed.data(), absmax.data(), nullptr);
  CHECK(err == cudaSuccess, "quantize launch: %s", cudaGetErrorString(err));
  CHECK(same_bits(packed.data(), want_packed.data(), packed.size()), "packed bytes n=%lld bs=%lld sizeof=%zu",
        (long long)n, (long long)bs, sizeof(T));
  CHECK(same_bits(absmax.data(), want_absmax.data(), absmax.size() * 4), "absmax n=%lld bs=%lld", (long long)n, (long long)bs);
}

// out (a window of rows x cols at (row0, col0) of a [*, row_len] NF4 tensor) against the core.
template <typename T>
static void check_dequant(const uint8_t* packed, const float* absmax, int64_t bs, int64_t row_len, int64_t row0,
                          int64_t col0, int64_t rows, int64_t cols, int64_t out_offset) {
  std::vector<T> storage(rows * cols + out_offset + 1, Storage<T>::to(-3.0));
  T* out = storage.data() + out_offset;  // out_offset 1 misaligns the output
  const cudaError_t err = cuda::launch_nf4_dequantize_2d(dtype_of<T>(), packed, absmax, bs, row_len, row0, col0,
                                                         rows, cols, out, nullptr);
  CHECK(err == cudaSuccess, "dequantize launch: %s", cudaGetErrorString(err));
  int64_t wrong = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t e = (row0 + i) * row_len + col0 + j;
      const T want = Storage<T>::to(core::nf4_value(kCode, core::nf4_code_at(packed, e), absmax[e / bs]));
      wrong += !same_bits(&out[i * cols + j], &want, sizeof(T));
    }
  }
  CHECK(wrong == 0, "dequantize row_len=%lld window (%lld,%lld) %lldx%lld offset %lld sizeof=%zu: %lld wrong",
        (long long)row_len, (long long)row0, (long long)col0, (long long)rows, (long long)cols,
        (long long)out_offset, sizeof(T), (long long)wrong);
  CHECK(Storage<T>::from(storage[rows * cols + out_offset]) == -3.0 &&
            (out_offset == 0 || Storage<T>::from(storage[0]) == -3.0),
        "wrote outside the window");
}

template <typename T>
static void test_dequantize(int64_t bs) {
  const int64_t total_rows = 12, row_len = 96;  // row_len % 8 == 0: the vectorised path
  const std::vector<float> w = random_vector<float>(total_rows * row_len, bs);
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  host_quantize(w, bs, packed, absmax);
  check_dequant<T>(packed.data(), absmax.data(), bs, row_len, 0, 0, 1, total_rows * row_len, 0);  // flat
  check_dequant<T>(packed.data(), absmax.data(), bs, row_len, 0, 0, total_rows, row_len, 0);
  check_dequant<T>(packed.data(), absmax.data(), bs, row_len, 3, 16, 5, 40, 0);  // vectorised window
  check_dequant<T>(packed.data(), absmax.data(), bs, row_len, 3, 16, 5, 40, 1);  // misaligned: scalar
  check_dequant<T>(packed.data(), absmax.data(), bs, row_len, 2, 5, 7, 33, 0);   // odd window: scalar
  // An odd row length and element count: the scalar path over a flat tensor.
  const std::vector<float> odd = random_vector<float>(7 * 37, bs + 1);
  host_quantize(odd, bs, packed, absmax);
  check_dequant<T>(packed.data(), absmax.data(), bs, 37, 0, 0, 7, 37, 0);
  check_dequant<T>(packed.data(), absmax.data(), bs, 37, 1, 3, 4, 30, 0);
}

// A window whose element offsets pass 2^31 (packed and absmax untouched elsewhere).
static void test_dequantize_beyond_2_31() {
  const int64_t bs = 64, row_len = 65536, row0 = 32769, rows = 2;  // e starts past 2^31
  const int64_t elements = (row0 + rows) * row_len;
  SparseBuffer packed_buf(static_cast<size_t>(elements / 2)), absmax_buf(static_cast<size_t>(elements / bs) * 4);
  uint8_t* packed = packed_buf.as<uint8_t>();
  float* absmax = absmax_buf.as<float>();
  Rng rng(3);
  for (int64_t e = row0 * row_len; e < elements; e += 2) packed[e / 2] = static_cast<uint8_t>(rng.next());
  for (int64_t b = row0 * row_len / bs; b < elements / bs; ++b) absmax[b] = static_cast<float>(1 + rng.uniform());
  check_dequant<float>(packed, absmax, bs, row_len, row0, 64, rows, 256, 0);
  check_dequant<__half>(packed, absmax, bs, row_len, row0, 3, rows, 77, 0);
}

template <typename T>
static void test_gemv(int64_t rows, int64_t in, int64_t out, int64_t bs, bool bias, int64_t x_offset) {
  const std::vector<float> w = random_vector<float>(out * in, in * 3 + out);
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  host_quantize(w, bs, packed, absmax);
  std::vector<T> x_storage = random_vector<T>(rows * in + x_offset, rows + in);
  const T* x = x_storage.data() + x_offset;
  const std::vector<T> b = random_vector<T>(out, 17);
  std::vector<T> y(rows * out, Storage<T>::to(9.0));
  const cudaError_t err = cuda::launch_nf4_gemv(dtype_of<T>(), x, rows, in, packed.data(), absmax.data(), bs,
                                                bias ? b.data() : nullptr, y.data(), out, nullptr);
  CHECK(err == cudaSuccess, "gemv launch: %s", cudaGetErrorString(err));
  ToleranceRule rule;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      long double exact = bias ? Storage<T>::from(b[o]) : 0.0, magnitude = std::fabs(exact);
      float naive = bias ? static_cast<float>(Storage<T>::from(b[o])) : 0.0f;
      for (int64_t k = 0; k < in; ++k) {
        const int64_t e = o * in + k;
        const float wv = core::nf4_value(kCode, core::nf4_code_at(packed.data(), e), absmax[e / bs]);
        const double xv = Storage<T>::from(x[r * in + k]);
        exact += static_cast<long double>(wv) * xv;
        magnitude += std::fabs(static_cast<long double>(wv) * xv);
        naive += wv * static_cast<float>(xv);
      }
      rule.add(Storage<T>::from(y[r * out + o]), Storage<T>::from(Storage<T>::to(naive)), exact, magnitude);
    }
  }
  CHECK(rule.holds(Storage<T>::eps), "gemv rows=%lld in=%lld out=%lld bs=%lld bias=%d x+%lld sizeof=%zu: error %g, naive %g",
        (long long)rows, (long long)in, (long long)out, (long long)bs, bias, (long long)x_offset, sizeof(T),
        rule.ours, rule.naive);
}

template <typename T>
static void test_dtype() {
  for (int64_t bs : {32, 64, 128, 256, 512, 1024, 2048, 4096}) {
    for (int64_t n : {1, 2, 63, 64, 65, 3 * 64 + 1}) test_quantize<T>(n, bs);
    test_quantize<T>(2 * bs + 7, bs);
    test_dequantize<T>(bs);
  }
  for (int64_t rows = 1; rows <= cuda::kGemvMaxRows; ++rows) test_gemv<T>(rows, 96, 19, 64, rows % 2 == 1, 0);
  test_gemv<T>(3, 96, 19, 32, true, 1);     // misaligned x: scalar path
  test_gemv<T>(5, 70, 9, 64, false, 0);     // in % 32 != 0: scalar path
  test_gemv<T>(2, 4096, 3, 4096, true, 0);  // one block per row
}

// One case of the tiled GEMM: forward y [rows, out] = x [rows, in] . Wᵀ (+ bias), or with
// grad the gradient of x, gx [rows, in] = g [rows, out] . W; absmax plain or through the
// emulated double quantisation; simt forces the register path for bf16/fp16 too; splits 0
// takes the public launcher (its own split of K), splits >= 1 asks for that many.
struct GemmCase {
  int64_t rows, in, out, bs;
  bool bias = false, grad = false, nested = false, simt = false;
  int64_t x_offset = 0;  // 1 misaligns x: the scalar loads
  int64_t splits = 0;
};

// absmax through its 8-bit double quantisation and back (the kernels of the nested path).
static std::vector<float> through_double_quantisation(const std::vector<float>& absmax) {
  const int64_t n = static_cast<int64_t>(absmax.size()), bs = 256;
  std::vector<float> code(core::kDynamicCodes);
  for (int j = 0; j < core::kDynamicCodes; ++j) {
    const float t = -1.0f + 2.0f * static_cast<float>(j) / 255.0f;
    code[j] = t * t * t;
  }
  double mean = 0;
  for (float v : absmax) mean += v;
  const float offset = static_cast<float>(mean / static_cast<double>(n));
  std::vector<float> centred(n), back(n);
  for (int64_t i = 0; i < n; ++i) centred[i] = absmax[i] - offset;
  std::vector<uint8_t> codes(n);
  std::vector<float> absmax2((n + bs - 1) / bs);
  CHECK(cuda::launch_quantize_absmax(centred.data(), n, code.data(), bs, codes.data(), absmax2.data(), nullptr) ==
            cudaSuccess, "quantize_absmax launch");
  CHECK(cuda::launch_dequantize_absmax(codes.data(), n, absmax2.data(), &offset, code.data(), bs, back.data(), nullptr) ==
            cudaSuccess, "dequantize_absmax launch");
  return back;
}

template <typename T>
static void test_gemm(const GemmCase& c) {
  const int64_t k_dim = c.grad ? c.out : c.in, n_dim = c.grad ? c.in : c.out;
  const std::vector<float> w = random_vector<float>(c.out * c.in, c.in * 7 + c.out + c.bs);
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  host_quantize(w, c.bs, packed, absmax);
  if (c.nested) absmax = through_double_quantisation(absmax);
  std::vector<T> x_storage = random_vector<T>(c.rows * k_dim + c.x_offset, c.rows * 3 + k_dim);
  const T* x = x_storage.data() + c.x_offset;
  const std::vector<T> b = random_vector<T>(n_dim, 29);
  const T* bias = c.bias ? b.data() : nullptr;
  std::vector<T> y(c.rows * n_dim + 1, Storage<T>::to(9.0));  // one guard element past the end
  const cuda::GemmArgs args{x, packed.data(), absmax.data(), bias, y.data(), c.rows, n_dim, k_dim,
                            core::log2_pow2(c.bs)};
  // Exactly the floats asked for: AddressSanitizer reports a write past them.
  std::vector<float> workspace(c.splits > 1 ? c.splits * c.rows * n_dim : cuda::nf4_gemm_workspace(c.rows, k_dim, n_dim));
  float* ws = workspace.empty() ? nullptr : workspace.data();
  const int64_t splits = std::max<int64_t>(c.splits, 1);
  cudaError_t err;
  if (c.splits > 0 && c.simt) {
    err = c.grad ? cuda::GemmLauncher<T>::template launch<true, true>(args, splits, ws, nullptr)
                 : cuda::GemmLauncher<T>::template launch<false, true>(args, splits, ws, nullptr);
  } else if (c.splits > 0) {
    err = c.grad ? cuda::GemmLauncher<T>::template launch<true>(args, splits, ws, nullptr)
                 : cuda::GemmLauncher<T>::template launch<false>(args, splits, ws, nullptr);
  } else if (c.grad) {
    err = cuda::launch_nf4_gemm_grad_input(dtype_of<T>(), x, c.rows, c.out, packed.data(), absmax.data(), c.bs,
                                           y.data(), c.in, ws, nullptr);
  } else {
    err = cuda::launch_nf4_gemm(dtype_of<T>(), x, c.rows, c.in, packed.data(), absmax.data(), c.bs, bias, y.data(),
                                c.out, ws, nullptr);
  }
  CHECK(err == cudaSuccess, "gemm launch: %s", cudaGetErrorString(err));
  ToleranceRule rule;
  for (int64_t m = 0; m < c.rows; ++m) {
    for (int64_t n = 0; n < n_dim; ++n) {
      long double exact = bias ? Storage<T>::from(b[n]) : 0.0, magnitude = std::fabs(exact);
      float naive = bias ? static_cast<float>(Storage<T>::from(b[n])) : 0.0f;
      for (int64_t k = 0; k < k_dim; ++k) {
        const int64_t e = c.grad ? k * c.in + n : n * c.in + k;
        const float wv = core::nf4_value(kCode, core::nf4_code_at(packed.data(), e), absmax[e / c.bs]);
        const double xv = Storage<T>::from(x[m * k_dim + k]);
        exact += static_cast<long double>(wv) * xv;
        magnitude += std::fabs(static_cast<long double>(wv) * xv);
        naive += wv * static_cast<float>(xv);
      }
      rule.add(Storage<T>::from(y[m * n_dim + n]), Storage<T>::from(Storage<T>::to(naive)), exact, magnitude);
    }
  }
  CHECK(rule.holds(Storage<T>::eps) && Storage<T>::from(y[c.rows * n_dim]) == 9.0,
        "gemm rows=%lld in=%lld out=%lld bs=%lld bias=%d grad=%d nested=%d simt=%d x+%lld splits=%lld sizeof=%zu: "
        "error %g, naive %g", (long long)c.rows, (long long)c.in, (long long)c.out, (long long)c.bs, c.bias, c.grad,
        c.nested, c.simt, (long long)c.x_offset, (long long)c.splits, sizeof(T), rule.ours, rule.naive);
}

template <typename T>
static void test_gemm_dtype(bool large) {
  const int64_t first = cuda::kGemvMaxRows + 1;  // the fewest rows the GEMM gets
  for (bool grad : {false, true}) {
    for (bool simt : {false, true}) {
      if (simt && std::is_same<T, float>::value) continue;  // fp32 takes the register path anyway
      const int64_t splits = simt ? 1 : 0;
      // in and out multiples of 8 but not of the tiles: the word loads, partial K and N tiles.
      test_gemm<T>({first, 200, 72, 64, !grad, grad, false, simt, 0, splits});
      // in % 8 != 0 and an element count that ends in a partial NF4 block: the scalar loads.
      test_gemm<T>({first + 3, 70, 19, 64, false, grad, true, simt, 0, splits});
      test_gemm<T>({kTileRows, 96, 40, 32, !grad, grad, false, simt, 1, splits});  // misaligned x
      // K split three ways (K tiles 2 + 2 + 1), and on the register path too.
      test_gemm<T>({first + 1, grad ? 40 : 300, grad ? 300 : 40, 64, !grad, grad, simt, simt, 0, 3});
    }
    test_gemm<T>({kTileRows + 1, 40, 24, 128, !grad, grad, true});  // a second row tile of one row
    test_gemm<T>({first, 4096, 3, 4096, !grad, grad, false});       // one NF4 block per row of W
    test_gemm<T>({first, 200, 72, 64, !grad, grad, false, false, 0, 1});  // K not split
    test_gemm<T>({first, grad ? 40 : 320, grad ? 320 : 40, 64, !grad, grad, false});  // the launcher splits K in 2
    if (large) test_gemm<T>({2 * kTileRows + 5, 136, 130, 64, !grad, grad, true});
  }
  // The launcher's own choice: K split where the tiles are few (at most 16 ways), never into
  // splits under 2 K tiles, nor where the tiles are many, nor past K / (16 rows).
  CHECK(cuda::nf4_gemm_workspace(9, 4096, 64) == 16 * 9 * 64, "workspace of 16 splits");
  CHECK(cuda::nf4_gemm_workspace(9, 512, 72) == 3 * 9 * 72, "workspace of 3 splits (K / 16 rows)");
  CHECK(cuda::nf4_gemm_workspace(9, 320, 72) == 2 * 9 * 72, "workspace of 2 splits (2 K tiles each)");
  CHECK(cuda::nf4_gemm_workspace(64, 4096, 4096) == 4 * 64 * 4096, "workspace of 4 splits of 64 rows");
  CHECK(cuda::nf4_gemm_workspace(9, 70, 64) == 0, "no split of 2 K tiles");
  CHECK(cuda::nf4_gemm_workspace(2048, 4096, 4096) == 0, "no split of 2048 tiles");
}

// Double quantisation of absmax: 8-bit blockwise codes against the core, bit for bit.
static void test_absmax_codes(int64_t n, int64_t bs) {
  std::vector<float> code(core::kDynamicCodes);
  for (int j = 0; j < core::kDynamicCodes; ++j) {
    const float t = -1.0f + 2.0f * static_cast<float>(j) / 255.0f;
    code[j] = t * t * t;
  }
  float mids[core::kDynamicCodes - 1];
  core::dynamic_midpoints(code.data(), mids);
  std::vector<float> c = random_vector<float>(n, n, 0.05);
  if (n > bs) std::fill(c.begin() + bs, c.begin() + std::min(n, 2 * bs), 0.0f);  // an all-zero block
  std::vector<uint8_t> codes(n, 0xCD), want(n);
  std::vector<float> absmax2((n + bs - 1) / bs, -1.0f), want_absmax2(absmax2.size());
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t first = b * bs, len = std::min(bs, n - first);
    float m = 0.0f;
    for (int64_t i = 0; i < len; ++i) m = core::dynamic_absmax_fold(m, c[first + i]);
    want_absmax2[b] = m;
    core::dynamic_quantize_block(&c[first], len, m, mids, &want[first]);
  }
  CHECK(cuda::launch_quantize_absmax(c.data(), n, code.data(), bs, codes.data(), absmax2.data(), nullptr) == cudaSuccess,
        "quantize_absmax launch");
  CHECK(same_bits(codes.data(), want.data(), n), "absmax codes n=%lld bs=%lld", (long long)n, (long long)bs);
  CHECK(same_bits(absmax2.data(), want_absmax2.data(), absmax2.size() * 4), "absmax2 n=%lld", (long long)n);
  const float offset = 0.0123f;
  std::vector<float> back(n, -1.0f);
  CHECK(cuda::launch_dequantize_absmax(codes.data(), n, absmax2.data(), &offset, code.data(), bs, back.data(), nullptr) ==
            cudaSuccess, "dequantize_absmax launch");
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = core::dynamic_dequantize(code.data(), want[i], want_absmax2[i / bs], offset);
    wrong += !same_bits(&back[i], &v, 4);
  }
  CHECK(wrong == 0, "dequantized absmax n=%lld: %lld wrong", (long long)n, (long long)wrong);
}

// The dequantisation grid is capped (kMaxGridStrideBlocks) and a grid-stride loop covers
// the rest: one flat launch on each path with more work than the capped grid has threads.
static void test_grid_cap() {
  const int64_t bs = 64, threads = int64_t{256} * cuda::kMaxGridStrideBlocks;
  const std::vector<float> w = random_vector<float>(8 * threads + 8 * 77, 5);
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  host_quantize(w, bs, packed, absmax);
  cuda_emu::stats() = cuda_emu::Stats{};
  check_dequant<__half>(packed.data(), absmax.data(), bs, static_cast<int64_t>(w.size()), 0, 0, 1,
                        static_cast<int64_t>(w.size()), 0);  // eight elements per thread
  check_dequant<float>(packed.data(), absmax.data(), bs, static_cast<int64_t>(w.size()), 0, 0, 1,
                       threads + 333, 1);  // misaligned: one element per thread
  CHECK(cuda_emu::stats().max_grid[0] == cuda::kMaxGridStrideBlocks, "grid %u", cuda_emu::stats().max_grid[0]);
}

int main() {
  for (uint64_t seed : kScheduleSeeds) {
    cuda_emu::set_schedule_seed(seed);
    test_dtype<float>();
    test_dtype<__half>();
    test_dtype<__nv_bfloat16>();
    test_gemm_dtype<float>(seed == kScheduleSeeds[0]);
    test_gemm_dtype<__half>(seed == kScheduleSeeds[0]);
    test_gemm_dtype<__nv_bfloat16>(seed == kScheduleSeeds[0]);
    for (int64_t n : {1, 255, 256, 257, 1000, 256 * 9 + 3}) test_absmax_codes(n, 256);
    test_absmax_codes(300, 64);
  }
  test_dequantize_beyond_2_31();
  test_grid_cap();
  // Empty inputs launch nothing; an unsupported dtype is refused.
  cuda_emu::stats() = cuda_emu::Stats{};
  CHECK(cuda::launch_nf4_quantize(cuda::DType::kFloat32, nullptr, 0, 64, nullptr, nullptr, nullptr) == cudaSuccess, "empty");
  CHECK(cuda::launch_nf4_dequantize_2d(cuda::DType::kFloat16, nullptr, nullptr, 64, 8, 0, 0, 0, 8, nullptr, nullptr) ==
            cudaSuccess, "empty dequantize");
  CHECK(cuda::launch_nf4_gemv(cuda::DType::kFloat32, nullptr, 0, 32, nullptr, nullptr, 64, nullptr, nullptr, 5, nullptr) ==
            cudaSuccess, "gemv without rows");
  CHECK(cuda::launch_quantize_absmax(nullptr, 0, nullptr, 256, nullptr, nullptr, nullptr) == cudaSuccess, "empty absmax");
  CHECK(cuda::launch_nf4_gemm(cuda::DType::kBFloat16, nullptr, 0, 32, nullptr, nullptr, 64, nullptr, nullptr, 5, nullptr,
                              nullptr) == cudaSuccess, "gemm without rows");
  CHECK(cuda::launch_nf4_gemm_grad_input(cuda::DType::kFloat16, nullptr, 9, 5, nullptr, nullptr, 64, nullptr, 0, nullptr,
                                         nullptr) == cudaSuccess, "gemm gradient without columns");
  CHECK(cuda_emu::stats().launches == 0, "empty inputs launched %lld kernels", (long long)cuda_emu::stats().launches);
  CHECK(cuda::launch_nf4_gemv(cuda::DType::kFloat64, nullptr, 1, 32, nullptr, nullptr, 64, nullptr, nullptr, 1, nullptr) ==
            cudaErrorInvalidValue, "fp64 gemv refused");
  CHECK(cuda::launch_nf4_gemv(cuda::DType::kFloat32, nullptr, cuda::kGemvMaxRows + 1, 32, nullptr, nullptr, 64, nullptr,
                              nullptr, 1, nullptr) == cudaErrorInvalidValue, "gemv of too many rows refused");
  CHECK(cuda::launch_nf4_gemm(cuda::DType::kFloat64, nullptr, 9, 32, nullptr, nullptr, 64, nullptr, nullptr, 1, nullptr,
                              nullptr) == cudaErrorInvalidValue, "fp64 gemm refused");
  if (failures == 0) std::printf("emu_nf4: all passed\n");
  return failures == 0 ? 0 : 1;
}
