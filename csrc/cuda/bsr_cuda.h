// Interface between the torch glue (bsr_cuda.cpp) and the kernels (bsr_*.cu): plain pointers and
// sizes, no torch types, so the .cu files compile without the heavy ATen headers.
#pragma once

#include <cstdint>

#ifdef EFCN_EMULATE
#include "emulate.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace efcn_cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

// Y = A W^T-like product over one BSR "line" per output tile (the kernels of forward and grad_input).
//   forward:    A = x [B, N],  lines = block rows (ptr = crow_ptr), a_blk = col_idx,   w_perm = null,
//               K side of a block = BC, N side = BR, w element (n, k) at n * BC + k.
//   grad_input: A = dy [B, M], lines = block cols (ptr = ccol_ptr), a_blk = t_row_idx, w_perm = t_perm,
//               K side = BR, N side = BC, w element (k, n) at k * BC + n.
struct SpmmParams {
  const void* a = nullptr;     // [batch, lda]
  const void* w = nullptr;     // values [nnzb, BR, BC]
  const void* bias = nullptr;  // [ldo] or null (forward only)
  void* out = nullptr;         // [batch, ldo]
  const int32_t* ptr = nullptr;     // [lines + 1]
  const int32_t* a_blk = nullptr;   // [nnzb] block index of A's K range, per slot
  const int32_t* w_perm = nullptr;  // [nnzb] values block per slot, null for the identity
  int64_t batch = 0, lda = 0, ldo = 0;
  int64_t nnzb = 0;
  int kb = 0, nb = 0;          // block extent along K and along the output
  int64_t a_blocks = 0;        // number of block indices valid in a_blk: ceil(lda / kb)
  int lines = 0;
  // filled in by the launcher
  int n_tiles = 0, b_tiles = 0;
  bool vec_a = false, vec_w = false, vec_out = false;  // 16-byte vector access allowed
};

// dW [nnzb, BR, BC] = dy[:, block row]^T x[:, block col] on stored blocks, times the element mask.
struct GwParams {
  const void* dy = nullptr;  // [batch, M]
  const void* x = nullptr;   // [batch, N]
  void* out = nullptr;       // [nnzb, BR, BC]
  const int32_t* row_idx = nullptr;
  const int32_t* col_idx = nullptr;
  const int32_t* mask_ids = nullptr;  // [nnzb] or null
  const uint8_t* mask = nullptr;      // bool [n_patterns, BR, BC] or null
  int64_t n_patterns = 0;
  int64_t batch = 0, M = 0, N = 0, nnzb = 0;
  int BR = 0, BC = 0;
  bool accumulate = false;  // out += dW (masked entries of out left as they are) instead of out = dW
  // filled in by the launcher
  int m_tiles = 0, n_tiles = 0;
  bool vec_dy = false, vec_x = false, vec_out = false;
};

// Launch on `stream`; each launches one kernel and checks the launch. Preconditions are checked by
// the caller (bsr_cuda.cpp); batch, lines / nnzb are > 0 here.
void launch_forward(SpmmParams p, DType dtype, cudaStream_t stream);
void launch_grad_input(SpmmParams p, DType dtype, cudaStream_t stream);
void launch_grad_weight(GwParams p, DType dtype, cudaStream_t stream);

// Upper bound on CTAs of one launch (grid.x).
constexpr int64_t kMaxCtas = 2147483647;

}  // namespace efcn_cuda
