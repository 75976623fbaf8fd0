// The only TORCH_LIBRARY block: every lora_ext schema lives here. Kernels register
// themselves per device with TORCH_LIBRARY_IMPL next to their orchestration code;
// fakes and autograd formulas are registered from Python (lora_ext/ops/).
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>

#include "cpu/isa.h"

namespace {

// _C.cpu_capability() -> (effective level, the CPU's best level) of our CPU kernels; raises
// ValueError for a LORA_EXT_CPU_CAPABILITY that names no level. lora_ext calls it on import.
PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    const char* level = lora_ext::cpu::isa_name(lora_ext::cpu::cpu_isa());
    const char* best = lora_ext::cpu::isa_name(lora_ext::cpu::cpu_best_isa());
    return Py_BuildValue("(ss)", level, best);
  } catch (const std::invalid_argument& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "(effective, best): the instruction set of lora_ext's CPU kernels and the CPU's best"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing lora_ext._C runs the static registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(lora_ext, m) {
  // Dropout ops take their Philox seed as a one-element int64 tensor (read on the host), so
  // that torch.compile traces the per-call draw instead of breaking the graph for an int.
  // y = x @ weight.T + bias + scaling * (drop(x) @ lora_A.T) @ lora_B.T ; also returns
  // z = drop(x) @ lora_A.T as [prod(x.shape[:-1]), r], the only activation backward needs.
  m.def(
      "lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, float scaling, float dropout_p, Tensor seed, int offset) -> (Tensor, Tensor)");
  // Gradients for x, lora_A, lora_B (an empty tensor where output_mask is false);
  // the dropout mask is regenerated from (seed, offset).
  m.def(
      "lora_linear_backward(Tensor grad_y, Tensor x, Tensor z, Tensor weight, Tensor lora_A, "
      "Tensor lora_B, float scaling, float dropout_p, Tensor seed, int offset, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");
  // The keep mask (bool, shape and device of `like`) that the two ops above use.
  m.def("dropout_mask(Tensor like, float dropout_p, Tensor seed, int offset) -> Tensor");
  // A fresh seed for them: 0-d int64 on `device`, uniform in [0, 2^62), from that device's
  // default generator (the layers draw on the CPU: the ops read seeds on the host). An op tagged
  // as random (torch.compile never merges or drops it; a checkpointed recompute replays it under
  // the saved RNG state) rather than torch.randint, which inductor would move onto its own RNG
  // stream: compiled or not, the same torch seed gives the same masks.
  m.def("dropout_seed(Device device) -> Tensor", {at::Tag::nondeterministic_seeded});
  // DoRA. ‖W + s·B·A‖ per row of weight [out, in] without forming W + s·B·A; fp32 (fp64 for
  // fp64 inputs).
  m.def("dora_weight_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor");
  // y = x·Wᵀ + b + (g - 1)·(drop(x)·Wᵀ) + g·s·(drop(x)·Aᵀ)·Bᵀ, g = magnitude / weight_norm (PEFT's
  // DoRA); also returns z = drop(x)·Aᵀ and hm (the [rows, out] term g multiplies) for backward.
  m.def(
      "dora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor weight_norm, float scaling, float dropout_p, Tensor seed, int offset)"
      " -> (Tensor, Tensor, Tensor)");
  // Gradients for x, lora_A, lora_B, magnitude (empty where output_mask is false).
  m.def(
      "dora_linear_backward(Tensor grad_y, Tensor x, Tensor z, Tensor hm, Tensor weight, "
      "Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor weight_norm, float scaling, "
      "float dropout_p, Tensor seed, int offset, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // NF4, bitsandbytes' layout: x flattened row-major -> (packed uint8 [ceil(n/2), 1], element
  // 2k in the high nibble; absmax fp32 [ceil(n/blocksize)]).
  m.def("nf4_quantize(Tensor x, int blocksize) -> (Tensor, Tensor)");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, SymInt[] shape, int blocksize, "
        "ScalarType dtype) -> Tensor");
  // The same into existing memory: out (fp32/fp16/bf16, its shape the tensor's) is overwritten.
  m.def("nf4_dequantize_out(Tensor packed, Tensor absmax, int blocksize, Tensor(a!) out) -> ()");
  // y = x @ dequant(W [out_features, x.shape[-1]]).T + bias, in x's dtype.
  m.def("nf4_matmul(Tensor x, Tensor packed, Tensor absmax, int out_features, int blocksize, "
        "Tensor? bias) -> Tensor");
  // grad_x = grad_y @ dequant(W [grad_y.shape[-1], in_features]): nf4_matmul's backward.
  m.def("nf4_matmul_grad_input(Tensor grad_y, Tensor packed, Tensor absmax, int in_features, "
        "int blocksize) -> Tensor");
  // Double quantisation of absmax: (codes uint8, absmax2 fp32, offset 0-d fp32), offset the
  // mean, 8-bit blockwise codes of absmax - offset with the 256-entry `code`.
  m.def("nf4_quantize_absmax(Tensor absmax, Tensor code, int blocksize) -> (Tensor, Tensor, Tensor)");
  m.def("nf4_dequantize_absmax(Tensor codes, Tensor absmax2, Tensor offset, Tensor code, "
        "int blocksize) -> Tensor");
  // Embedding LoRA (PEFT's lora.Embedding): y[..., :] = weight[indices] + scaling *
  // lora_A[:, indices]ᵀ @ lora_B.T, in weight's dtype (adapters: weight's dtype or fp32).
  // padding_idx (-1: none) changes only the backward, as in aten::embedding.
  m.def("lora_embedding_forward(Tensor indices, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "float scaling, int padding_idx) -> Tensor");
  // Gradients for weight [V, dim] (grad_y's dtype), lora_A, lora_B (empty where output_mask is
  // false); tokens equal to padding_idx (-1: none) give the table rows no gradient.
  m.def(
      "lora_embedding_backward(Tensor grad_y, Tensor indices, Tensor lora_A, Tensor lora_B, "
      "float scaling, int padding_idx, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // LoRA on a convolution (groups 1): weight + scaling * reshape(lora_B [out, r, 1...] @
  // lora_A [r, in, k...]), in weight's dtype: the one weight a merged convolution needs.
  m.def("lora_conv_weight(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor");
  // BGMV / SGMV: many adapters in one batch (row t uses adapter idx[t]; -1 = none).
  //   z[t] = x[t] @ lora_A[idx[t]].T                        (0 where idx[t] = -1)
  //   out[t] = y[t] + scale[idx[t]] * z[t] @ lora_B[idx[t]].T  (y[t] where idx[t] = -1)
  m.def("lora_shrink(Tensor x, Tensor lora_A, Tensor idx) -> Tensor");
  m.def("lora_expand(Tensor y, Tensor z, Tensor lora_B, Tensor idx, Tensor scale) -> Tensor");
  // The same with segments: rows seg_starts[s] .. seg_starts[s + 1] use seg_adapter[s].
  m.def("lora_shrink_sgmv(Tensor x, Tensor lora_A, Tensor seg_starts, Tensor seg_adapter) -> Tensor");
  m.def(
      "lora_expand_sgmv(Tensor y, Tensor z, Tensor lora_B, Tensor seg_starts, Tensor seg_adapter, "
      "Tensor scale) -> Tensor");
}
