// Schemas of the compiled kernel ops (namespace efcn_sparse_C), and the Python module stub.
//
// The public, differentiable ops live in efcn_sparse/ops.py; the "cpu" and "cuda" backends call
// these. Each op has a CPU implementation (csrc/cpu/) and, when built with CUDA, a CUDA one
// (csrc/cuda/), registered on the dispatch key of its device.
//
// Contract (the same for every backend, see efcn_sparse/kernels/reference.py):
//   x [B, N], dy [B, M]: contiguous, dtype of values (the CPU kernels also take float32 values
//   with a bfloat16/float16 x or dy: computed as against values.to(that dtype));
//   values [nnzb, BR, BC] contiguous, zero at masked entries; index tensors int32, 1-D, same
//   device; edge blocks may stick out of (M, N).
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
  // (bsr_grad_weight(...) in dw_dtype as for bsr_grad_weight_as, dy summed over the batch); CPU kernel only
  m.def("bsr_grad_weight_bias(Tensor dy, Tensor x, Tensor row_idx, Tensor col_idx, Tensor? mask_ids, Tensor? mask_patterns, int BR, int BC, ScalarType? dw_dtype=None) -> (Tensor, Tensor)");
  // bsr_grad_weight(...) returned in dw_dtype: dy's, or float32 for a bfloat16/float16 dy (the
  // half-precision result widened, for float32 master values under autocast); CPU kernel only
  m.def("bsr_grad_weight_as(Tensor dy, Tensor x, Tensor row_idx, Tensor col_idx, Tensor? mask_ids, Tensor? mask_patterns, int BR, int BC, ScalarType dw_dtype) -> Tensor");
  // dy summed over the batch, as bsr_grad_weight_bias sums it; CPU kernel only
  m.def("bsr_bias_grad(Tensor dy) -> Tensor");
  // out += bsr_grad_weight(...), in place (masked entries of out left as they are); CUDA kernel only
  m.def("bsr_grad_weight_acc(Tensor(a!) out, Tensor dy, Tensor x, Tensor row_idx, Tensor col_idx, Tensor? mask_ids, Tensor? mask_patterns) -> ()");
}
