// The only TORCH_LIBRARY block: every lora_ext schema lives here. Kernels register
// themselves per device with TORCH_LIBRARY_IMPL next to their orchestration code;
// fakes and autograd formulas are registered from Python (lora_ext/ops/).
#include <Python.h>
#include <torch/library.h>

// Importing lora_ext._C only has to run the static registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(lora_ext, m) {
  // y = x @ weight.T + bias + scaling * (drop(x) @ lora_A.T) @ lora_B.T ; also returns
  // z = drop(x) @ lora_A.T as [prod(x.shape[:-1]), r], the only activation backward needs.
  m.def(
      "lora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, float scaling, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  // Gradients for x, lora_A, lora_B (an empty tensor where output_mask is false);
  // the dropout mask is regenerated from (seed, offset).
  m.def(
      "lora_linear_backward(Tensor grad_y, Tensor x, Tensor z, Tensor weight, Tensor lora_A, "
      "Tensor lora_B, float scaling, float dropout_p, int seed, int offset, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");
  // The keep mask (bool, shape and device of `like`) that the two ops above use.
  m.def("dropout_mask(Tensor like, float dropout_p, int seed, int offset) -> Tensor");
  // DoRA. ‖W + s·B·A‖ per row of weight [out, in] without forming W + s·B·A; fp32 (fp64 for
  // fp64 inputs).
  m.def("dora_weight_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor");
  // y = x·Wᵀ + b + (g - 1)·(drop(x)·Wᵀ) + g·s·(drop(x)·Aᵀ)·Bᵀ, g = magnitude / weight_norm (PEFT's
  // DoRA); also returns z = drop(x)·Aᵀ and hm (the [rows, out] term g multiplies) for backward.
  m.def(
      "dora_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor weight_norm, float scaling, float dropout_p, int seed, int offset)"
      " -> (Tensor, Tensor, Tensor)");
  // Gradients for x, lora_A, lora_B, magnitude (empty where output_mask is false).
  m.def(
      "dora_linear_backward(Tensor grad_y, Tensor x, Tensor z, Tensor hm, Tensor weight, "
      "Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor weight_norm, float scaling, "
      "float dropout_p, int seed, int offset, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}
