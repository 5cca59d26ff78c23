// forward kernels: Y = X W^T + bias (see bsr_kernels.cuh).
#include "bsr_kernels.cuh"

namespace efcn_cuda {
void launch_forward(SpmmParams p, DType dtype, cudaStream_t stream) { dispatch_spmm<true>(p, dtype, stream); }
}  // namespace efcn_cuda
