// Schemas of the compiled kernel ops (namespace efcn_sparse_C), and the Python module stub.
//
// The public, differentiable ops live in efcn_sparse/ops.py; the "cpu" and "cuda" backends call
// these. Each op has a CPU implementation (csrc/cpu/) and, when built with CUDA, a CUDA one
// (csrc/cuda/), registered on the dispatch key of its device.
//
// Contract (the same for every backend, see efcn_sparse/kernels/reference.py):
//   x [B, N], dy [B, M]: contiguous, dtype of values; values [nnzb, BR, BC] contiguous, zero at
//   masked entries; index tensors int32, 1-D, same device; edge blocks may stick out of (M, N).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing efcn_sparse._C runs the static TORCH_LIBRARY initialisers below; no Python API.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(efcn_sparse_C, m) {
  m.def("bsr_forward(Tensor x, Tensor values, Tensor? bias, Tensor crow_ptr, Tensor col_idx, Tensor row_idx, int M) -> Tensor");
  m.def("bsr_grad_input(Tensor dy, Tensor values, Tensor ccol_ptr, Tensor t_row_idx, Tensor t_perm, int N) -> Tensor");
  m.def("bsr_grad_weight(Tensor dy, Tensor x, Tensor row_idx, Tensor col_idx, Tensor? mask_ids, Tensor? mask_patterns, int BR, int BC) -> Tensor");
  // (bsr_grad_weight(...), dy summed over the batch); CPU kernel only
  m.def("bsr_grad_weight_bias(Tensor dy, Tensor x, Tensor row_idx, Tensor col_idx, Tensor? mask_ids, Tensor? mask_patterns, int BR, int BC) -> (Tensor, Tensor)");
  // dy summed over the batch, as bsr_grad_weight_bias sums it; CPU kernel only
  m.def("bsr_bias_grad(Tensor dy) -> Tensor");
  // out += bsr_grad_weight(...), in place (masked entries of out left as they are); CUDA kernel only
  m.def("bsr_grad_weight_acc(Tensor(a!) out, Tensor dy, Tensor x, Tensor row_idx, Tensor col_idx, Tensor? mask_ids, Tensor? mask_patterns) -> ()");
}
