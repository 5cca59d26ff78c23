// grad_weight kernels: dW = (dY^T X) on stored blocks, times the element mask (see bsr_kernels.cuh).
#include "bsr_kernels.cuh"

namespace efcn_cuda {
namespace {

// grad_weight: square tiles of side 64, 32 or 16 over a block, the side minimising
// tiles * (side^2 + alpha * 2 side): padded multiply-adds plus operand elements streamed per batch
// row, weighted by alpha (about the multiply-adds a SM does per element it loads from L2: 32 on
// tensor cores, 4 on FMA units).
using GwTc64 = Cfg<64, 64, 32, 4, 2, 2>;
using GwTc32 = Cfg<32, 32, 32, 4, 2, 2>;
using GwTc16 = Cfg<16, 16, 32, 4, 1, 1>;
using GwF64 = Cfg<64, 64, 16, 4, 2, 2>;
using GwF32 = Cfg<32, 32, 16, 4, 2, 2>;
using GwF16 = Cfg<16, 16, 16, 4, 1, 1>;
using GwD = Cfg<32, 32, 16, 3, 2, 2>;

int grad_weight_tile(int BR, int BC, int alpha) {
  int best = 64;
  int64_t best_cost = -1;
  for (int side : {64, 32, 16}) {
    const int64_t cost = cdiv(BR, side) * cdiv(BC, side) * (side * side + alpha * 2 * side);
    if (best_cost < 0 || cost < best_cost) best = side, best_cost = cost;
  }
  return best;
}

template <class C64, class C32, class C16, typename T>
void gw_by_tile(const GwParams& p, int alpha, cudaStream_t s) {
  switch (grad_weight_tile(p.BR, p.BC, alpha)) {
    case 64: return run_grad_weight<C64, T>(p, s);
    case 32: return run_grad_weight<C32, T>(p, s);
    default: return run_grad_weight<C16, T>(p, s);
  }
}

}  // namespace

void launch_grad_weight(GwParams p, DType dtype, cudaStream_t s) {
  switch (dtype) {
    case DType::kHalf: return gw_by_tile<GwTc64, GwTc32, GwTc16, half_t>(p, 32, s);
    case DType::kBFloat16: return gw_by_tile<GwTc64, GwTc32, GwTc16, bf16_t>(p, 32, s);
    case DType::kFloat: return gw_by_tile<GwF64, GwF32, GwF16, float>(p, 4, s);
    case DType::kDouble: return run_grad_weight<GwD, double>(p, s);
  }
}

}  // namespace efcn_cuda
