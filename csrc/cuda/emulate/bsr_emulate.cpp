// CPU build of the CUDA kernels on the emulator (../emulate.h), for tests on machines without a
// GPU: the unchanged glue and kernel sources, compiled with EFCN_EMULATE, registered as the ops
// efcn_sparse_emu::bsr_forward / bsr_grad_input / bsr_grad_weight for CPU tensors. Built on
// demand by tests/test_cuda_backend.py (torch.utils.cpp_extension.load); never part of the package.
#define EFCN_EMULATE
#include "../bsr_cuda.cpp"
#include "../bsr_forward.cu"
#include "../bsr_grad_input.cu"
#include "../bsr_grad_weight.cu"

TORCH_LIBRARY(efcn_sparse_emu, m) {
  m.def("bsr_forward(Tensor x, Tensor values, Tensor? bias, Tensor crow_ptr, Tensor col_idx, Tensor row_idx, int M) -> Tensor");
  m.def("bsr_grad_input(Tensor dy, Tensor values, Tensor ccol_ptr, Tensor t_row_idx, Tensor t_perm, int N) -> Tensor");
  m.def("bsr_grad_weight(Tensor dy, Tensor x, Tensor row_idx, Tensor col_idx, Tensor? mask_ids, Tensor? mask_patterns, int BR, int BC) -> Tensor");
  m.def("bsr_grad_weight_acc(Tensor(a!) out, Tensor dy, Tensor x, Tensor row_idx, Tensor col_idx, Tensor? mask_ids, Tensor? mask_patterns) -> ()");
}

TORCH_LIBRARY_IMPL(efcn_sparse_emu, CPU, m) {
  m.impl("bsr_forward", &efcn_cuda::bsr_forward);
  m.impl("bsr_grad_input", &efcn_cuda::bsr_grad_input);
  m.impl("bsr_grad_weight", &efcn_cuda::bsr_grad_weight);
  m.impl("bsr_grad_weight_acc", &efcn_cuda::bsr_grad_weight_acc);
}
