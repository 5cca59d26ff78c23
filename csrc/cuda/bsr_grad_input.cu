// grad_input kernels: dX = dY W through the transpose metadata (see bsr_kernels.cuh).
#include "bsr_kernels.cuh"

namespace efcn_cuda {
void launch_grad_input(SpmmParams p, DType dtype, cudaStream_t stream) { dispatch_spmm<false>(p, dtype, stream); }
}  // namespace efcn_cuda
