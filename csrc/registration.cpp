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
