// CPU kernels of the three BSR ops (schemas in csrc/ops.cpp, contract in
// efcn_sparse/kernels/reference.py):
//   bsr_forward     y  [B, M]           = x [B, N] W^T + bias   parallel over (block row, batch chunk)
//   bsr_grad_input  dx [B, N]           = dy [B, M] W           parallel over (block column, batch chunk)
//   bsr_grad_weight dW [nnzb, BR, BC]   = dy^T x on stored blocks, times the element mask
//                                                               parallel over stored blocks
// Every product is a sequence of dense register-tile GEMMs (microkernel.h) on panels packed
// per task: the blocks of one block row (or column) are concatenated along K, so a tile of the
// output is computed in registers over the whole row and written once. Packing buffers are per
// task and bounded by kKMax x block side: nothing scales with blocks x batch.
//
// Edge blocks that stick out of (M, N) are handled by limiting K to the in-range part and
// zero-padding the packed panels; out-of-range entries of x, dy, y, dx are never touched.
//
// Determinism: every output entry is computed by exactly one task, in an order fixed by the
// layout alone (blocks in stored order, K in ascending order, K split at fixed kKMax points),
// so results are bit-identical across runs and thread counts on a given machine. They are
// not bit-identical to the reference backend (different summation order).
//
// Trusted without checking (they cannot cause out-of-bounds access): column indices sorted and
// unique within a row (duplicates are summed, like the reference), t_perm being a permutation
// and agreeing with crow_ptr/col_idx, row_idx agreeing with crow_ptr in the forward (unused
// there), and values being zero at masked entries. Everything that addresses memory is checked.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "microkernel.h"

namespace efcn_cpu {
namespace {

// Longest K (in elements) one packed panel holds. Longer rows/columns/batches are split at
// fixed points into groups whose partial results are summed through the output.
constexpr int64_t kKMax = 1024;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------ checks
bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
}

void check_index(const at::Tensor& t, const char* name, int64_t numel) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, ": expected a 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(numel < 0 || t.numel() == numel, name, ": expected ", numel, " entries, got ", t.numel());
}

// ptr: n+1 non-decreasing offsets from 0 to total.
void check_pointers(const at::Tensor& ptr, const char* name, int64_t n, int64_t total) {
  check_index(ptr, name, n + 1);
  const int32_t* p = ptr.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[n] == total, name, ": must start at 0 and end at nnzb=", total, ", got ", p[0],
              " .. ", p[n]);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], name, ": not monotone at position ", i, ": ", p[i], " > ", p[i + 1]);
}

// Every entry of idx lies in [0, hi).
void check_range(const at::Tensor& idx, const char* name, int64_t hi) {
  const int32_t* p = idx.data_ptr<int32_t>();
  for (int64_t k = 0, n = idx.numel(); k < n; ++k)
    TORCH_CHECK(p[k] >= 0 && p[k] < hi, name, ": entry ", k, " is ", p[k], ", outside [0, ", hi, ")");
}

void check_values(const at::Tensor& v) {
  check_cpu(v, "values");
  TORCH_CHECK(is_float_type(v.scalar_type()), "values: expected a floating dtype (float32, float64, bfloat16, "
              "float16), got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 3, "values: expected [nnzb, BR, BC], got shape ", v.sizes());
  TORCH_CHECK(v.size(1) > 0 && v.size(2) > 0, "values: block sides must be positive, got ", v.sizes());
  TORCH_CHECK(v.is_contiguous(), "values: expected a contiguous tensor");
}

void check_operand(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D tensor [batch, features], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": dtype ", t.scalar_type(), " does not match ", dtype);
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Batch chunks per task so that small grids still give every thread work; the split does not
// change any result (see the determinism note above).
int64_t batch_chunk(int64_t tasks, int64_t B) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t n = tasks >= want ? 1 : std::min(cdiv(want, std::max<int64_t>(tasks, 1)), cdiv(B, kMR));
  n = std::max<int64_t>(n, 1);
  return cdiv(cdiv(B, n), kMR) * kMR;
}

// ------------------------------------------------------------------------------ shared pieces
// A K-segment of a row/column task: `k` consecutive K entries starting at column `a_off` of the
// streamed operand (x or dy), matched with rows/columns of one block starting at `w`.
template <typename T>
struct Seg {
  int64_t a_off;
  const T* w;
  int64_t k;
};

// Calls fn(segs, K, first, last) on consecutive groups of the K entries of blocks [p0, p1):
// extent(p) is the in-range K of block p, make(p, k0, k) the segment of its entries [k0, k0+k).
// Groups hold kKMax entries (the last one fewer); blocks are cut where a group fills up, so the
// cut points depend on the layout alone.
template <typename T, typename Extent, typename Make, typename Fn>
void for_each_group(int64_t p0, int64_t p1, Extent extent, Make make, std::vector<Seg<T>>& segs, Fn fn) {
  segs.clear();
  int64_t K = 0;
  bool first = true;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t kp = extent(p);
    for (int64_t k0 = 0; k0 < kp;) {
      if (K == kKMax) {
        fn(segs, K, first, false);
        first = false;
        segs.clear();
        K = 0;
      }
      const int64_t k = std::min(kp - k0, kKMax - K);
      segs.push_back(make(p, k0, k));
      K += k;
      k0 += k;
    }
  }
  fn(segs, K, first, true);
}

// Packs rows [bt, bt + mr) of the row-major src (leading dim ld) at the segments' columns into
// A [K][kMR].
template <typename T>
void pack_a_rows(const T* src, int64_t ld, int64_t bt, int mr, const std::vector<Seg<T>>& segs, T* A) {
  int64_t koff = 0;
  for (const Seg<T>& s : segs) {
    for (int m = 0; m < mr; ++m) {
      const T* row = src + (bt + m) * ld + s.a_off;
      T* dst = A + koff * kMR + m;
      for (int64_t k = 0; k < s.k; ++k) dst[k * kMR] = row[k];
    }
    koff += s.k;
  }
}

// out[m*ldc + n] (=|+=) tile[m][n] (+ bias[n]) for m < mr, n < nv.
template <typename T>
void store_tile(const T* tile, int mr, int64_t nv, T* out, int64_t ldc, bool accumulate, const T* bias) {
  constexpr int NR = kNR<T>;
  for (int m = 0; m < mr; ++m) {
    T* o = out + m * ldc;
    const T* t = tile + m * NR;
    if (accumulate)
      for (int64_t n = 0; n < nv; ++n) o[n] += t[n];
    else
      for (int64_t n = 0; n < nv; ++n) o[n] = t[n];
    if (bias)
      for (int64_t n = 0; n < nv; ++n) o[n] += bias[n];
  }
}

// For a task owning output columns [col0, col0 + n_valid) of the row-major `out` (ld ldc) and
// batch rows [b0, b1): out = A_src[:, segs] @ Bpacked, with Bpacked [nq][K][NR].
template <typename T>
void row_task_gemm(const T* a_src, int64_t lda, int64_t b0, int64_t b1, const std::vector<Seg<T>>& segs, int64_t K,
                   const T* bpack, int64_t nq, T* out, int64_t ldc, int64_t n_valid, bool accumulate,
                   const T* bias, T* apack, const MicroKernel<T>* kern) {
  constexpr int NR = kNR<T>;
  alignas(64) T tile[kMR * NR];
  for (int64_t bt = b0; bt < b1; bt += kMR) {
    const int mr = static_cast<int>(std::min<int64_t>(kMR, b1 - bt));
    pack_a_rows(a_src, lda, bt, mr, segs, apack);
    for (int64_t q = 0; q < nq; ++q) {
      kern[mr](K, apack, bpack + q * K * NR, tile);
      store_tile(tile, mr, std::min<int64_t>(NR, n_valid - q * NR), out + bt * ldc + q * NR, ldc, accumulate,
                 bias ? bias + q * NR : nullptr);
    }
  }
}

template <typename T>
void fill_rows(T* out, int64_t ldc, int64_t b0, int64_t b1, int64_t nv, const T* bias) {
  for (int64_t b = b0; b < b1; ++b) {
    T* o = out + b * ldc;
    for (int64_t n = 0; n < nv; ++n) o[n] = bias ? bias[n] : T(0);
  }
}

template <typename T>
void load_kernels(MicroKernel<T>* kern) {
  for (int mr = 1; mr <= kMR; ++mr) kern[mr] = micro_kernel<T>(mr);
}

// ------------------------------------------------------------------------------ forward
template <typename T>
void forward_kernel(const T* x, const T* w, const T* bias, const int32_t* crow, const int32_t* col, T* y,
                    int64_t B, int64_t N, int64_t M, int64_t BR, int64_t BC) {
  constexpr int NR = kNR<T>;
  const int64_t nbr = cdiv(M, BR), nq = cdiv(BR, NR);
  const int64_t bchunk = batch_chunk(nbr, B), nch = cdiv(B, bchunk);
  MicroKernel<T> kern[kMR + 1];
  load_kernels(kern);
  at::parallel_for(0, nbr * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> bpack(nq * kKMax * NR), apack(kKMax * kMR);
    std::vector<Seg<T>> segs;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / nch, b0 = (t % nch) * bchunk, b1 = std::min(B, b0 + bchunk);
      const int64_t rows = std::min(BR, M - i * BR);  // valid rows of this block row
      T* out = y + i * BR;
      const T* bias_i = bias ? bias + i * BR : nullptr;
      if (crow[i] == crow[i + 1]) {
        fill_rows(out, M, b0, b1, rows, bias_i);
        continue;
      }
      auto extent = [&](int64_t p) { return std::min(BC, N - col[p] * BC); };
      auto make = [&](int64_t p, int64_t k0, int64_t k) {
        return Seg<T>{col[p] * BC + k0, w + p * BR * BC + k0, k};
      };
      for_each_group<T>(crow[i], crow[i + 1], extent, make, segs,
                        [&](const std::vector<Seg<T>>& sg, int64_t K, bool first, bool last) {
        // B[q][k][n] = W[q*NR + n][k]: the group's blocks transposed, rows past `rows` zero.
        for (int64_t q = 0; q < nq; ++q) {
          T* dstq = bpack.data() + q * K * NR;
          int64_t koff = 0;
          for (const Seg<T>& s : sg) {
            for (int n = 0; n < NR; ++n) {
              const int64_t r = q * NR + n;
              T* dst = dstq + koff * NR + n;
              if (r < rows) {
                const T* src = s.w + r * BC;
                for (int64_t k = 0; k < s.k; ++k) dst[k * NR] = src[k];
              } else {
                for (int64_t k = 0; k < s.k; ++k) dst[k * NR] = T(0);
              }
            }
            koff += s.k;
          }
        }
        row_task_gemm(x, N, b0, b1, sg, K, bpack.data(), nq, out, M, rows, !first, last ? bias_i : nullptr,
                      apack.data(), kern);
      });
    }
  });
}

// ------------------------------------------------------------------------------ grad_input
template <typename T>
void grad_input_kernel(const T* dy, const T* w, const int32_t* ccol, const int32_t* t_row, const int32_t* t_perm,
                       T* dx, int64_t B, int64_t M, int64_t N, int64_t BR, int64_t BC) {
  constexpr int NR = kNR<T>;
  const int64_t nbc = cdiv(N, BC), nq = cdiv(BC, NR);
  const int64_t bchunk = batch_chunk(nbc, B), nch = cdiv(B, bchunk);
  MicroKernel<T> kern[kMR + 1];
  load_kernels(kern);
  at::parallel_for(0, nbc * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> bpack(nq * kKMax * NR), apack(kKMax * kMR);
    std::vector<Seg<T>> segs;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / nch, b0 = (t % nch) * bchunk, b1 = std::min(B, b0 + bchunk);
      const int64_t cols = std::min(BC, N - j * BC);  // valid columns of this block column
      T* out = dx + j * BC;
      if (ccol[j] == ccol[j + 1]) {
        fill_rows<T>(out, N, b0, b1, cols, nullptr);
        continue;
      }
      auto extent = [&](int64_t k) { return std::min(BR, M - t_row[k] * BR); };
      auto make = [&](int64_t k, int64_t r0, int64_t len) {
        return Seg<T>{t_row[k] * BR + r0, w + t_perm[k] * BR * BC + r0 * BC, len};
      };
      for_each_group<T>(ccol[j], ccol[j + 1], extent, make, segs,
                        [&](const std::vector<Seg<T>>& sg, int64_t K, bool first, bool /*last*/) {
        // B[q][k][n] = W[k][q*NR + n]: rows of the group's blocks, columns past `cols` zero.
        for (int64_t q = 0; q < nq; ++q) {
          T* dst = bpack.data() + q * K * NR;
          const int64_t nv = std::min<int64_t>(NR, cols - q * NR);
          for (const Seg<T>& s : sg) {
            for (int64_t k = 0; k < s.k; ++k, dst += NR) {
              const T* src = s.w + k * BC + q * NR;
              int64_t n = 0;
              for (; n < nv; ++n) dst[n] = src[n];
              for (; n < NR; ++n) dst[n] = T(0);
            }
          }
        }
        row_task_gemm<T>(dy, M, b0, b1, sg, K, bpack.data(), nq, out, N, cols, !first, nullptr, apack.data(), kern);
      });
    }
  });
}

// ------------------------------------------------------------------------------ grad_weight
template <typename T>
void grad_weight_kernel(const T* dy, const T* x, const int32_t* row, const int32_t* col, const int32_t* mask_ids,
                        const bool* patterns, T* dw, int64_t nnzb, int64_t B, int64_t M, int64_t N, int64_t BR,
                        int64_t BC) {
  constexpr int NR = kNR<T>;
  const int64_t ntr = cdiv(BR, kMR), nq = cdiv(BC, NR), blk = BR * BC;
  const int64_t kc = std::min(B, kKMax);  // batch entries per K group
  MicroKernel<T> kern[kMR + 1];
  load_kernels(kern);
  at::parallel_for(0, nnzb, 1, [&](int64_t p0, int64_t p1) {
    std::vector<T> apack(ntr * kc * kMR), bpack(nq * kc * NR);
    alignas(64) T tile[kMR * NR];
    int64_t packed_row = -1, packed_kb = -1;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = row[p], j = col[p];
      const int64_t rows = std::min(BR, M - i * BR), cols = std::min(BC, N - j * BC);
      const bool* mask = patterns ? patterns + mask_ids[p] * blk : nullptr;
      T* out = dw + p * blk;
      for (int64_t kb = 0; kb < B; kb += kc) {
        const int64_t K = std::min(kc, B - kb);
        if (i != packed_row || kb != packed_kb) {  // A[t][b][m] = dy[b][i*BR + t*kMR + m]
          for (int64_t b = 0; b < K; ++b) {
            const T* src = dy + (kb + b) * M + i * BR;
            for (int64_t r = 0; r < ntr * kMR; ++r)
              apack[(r / kMR) * K * kMR + b * kMR + r % kMR] = r < rows ? src[r] : T(0);
          }
          packed_row = i;
          packed_kb = kb;
        }
        for (int64_t b = 0; b < K; ++b) {  // B[q][b][n] = x[b][j*BC + q*NR + n]
          const T* src = x + (kb + b) * N + j * BC;
          for (int64_t c = 0; c < nq * NR; ++c) bpack[(c / NR) * K * NR + b * NR + c % NR] = c < cols ? src[c] : T(0);
        }
        const bool last = kb + K >= B;
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t nv = std::min<int64_t>(NR, BC - q * NR);
          for (int64_t t = 0; t < ntr; ++t) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, BR - t * kMR));
            kern[mr](K, apack.data() + t * K * kMR, bpack.data() + q * K * NR, tile);
            T* o = out + t * kMR * BC + q * NR;
            for (int m = 0; m < mr; ++m) {
              const T* tm = tile + m * NR;
              T* om = o + m * BC;
              const bool* mk = (mask && last) ? mask + (t * kMR + m) * BC + q * NR : nullptr;
              for (int64_t n = 0; n < nv; ++n) {
                T v = kb > 0 ? om[n] + tm[n] : tm[n];
                om[n] = mk ? v * T(mk[n] ? 1 : 0) : v;  // multiply, like the reference (NaN stays NaN)
              }
            }
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------ ops
at::Tensor bsr_forward_cpu(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                           const at::Tensor& crow_ptr, const at::Tensor& col_idx, const at::Tensor& row_idx,
                           int64_t M) {
  check_values(values);
  check_operand(x, "x", values.scalar_type());
  const int64_t B = x.size(0), N = x.size(1), nnzb = values.size(0), BR = values.size(1), BC = values.size(2);
  TORCH_CHECK(M >= 0, "M: expected >= 0, got ", M);
  const int64_t nbr = cdiv(M, BR), nbc = cdiv(N, BC);
  check_index(col_idx, "col_idx", nnzb);
  check_index(row_idx, "row_idx", nnzb);
  check_pointers(crow_ptr, "crow_ptr", nbr, nnzb);
  check_range(col_idx, "col_idx", nbc);
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == values.scalar_type(), "bias: dtype ", bias->scalar_type(),
                " does not match ", values.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == M, "bias: expected shape [", M, "], got ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), "bias: expected a contiguous tensor");
  }
  if (is_half(values.scalar_type())) {
    std::optional<at::Tensor> bias_f;
    if (bias.has_value()) bias_f = bias->to(at::kFloat);
    return bsr_forward_cpu(x.to(at::kFloat), values.to(at::kFloat), bias_f, crow_ptr, col_idx, row_idx, M)
        .to(values.scalar_type());
  }
  at::Tensor y = at::empty({B, M}, x.options());
  if (B == 0 || M == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bsr_forward_cpu", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
                             bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, crow_ptr.data_ptr<int32_t>(),
                             col_idx.data_ptr<int32_t>(), y.data_ptr<scalar_t>(), B, N, M, BR, BC);
  });
  return y;
}

at::Tensor bsr_grad_input_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol_ptr,
                              const at::Tensor& t_row_idx, const at::Tensor& t_perm, int64_t N) {
  check_values(values);
  check_operand(dy, "dy", values.scalar_type());
  const int64_t B = dy.size(0), M = dy.size(1), nnzb = values.size(0), BR = values.size(1), BC = values.size(2);
  TORCH_CHECK(N >= 0, "N: expected >= 0, got ", N);
  const int64_t nbr = cdiv(M, BR), nbc = cdiv(N, BC);
  check_index(t_row_idx, "t_row_idx", nnzb);
  check_index(t_perm, "t_perm", nnzb);
  check_pointers(ccol_ptr, "ccol_ptr", nbc, nnzb);
  check_range(t_row_idx, "t_row_idx", nbr);
  check_range(t_perm, "t_perm", nnzb);
  if (is_half(values.scalar_type()))
    return bsr_grad_input_cpu(dy.to(at::kFloat), values.to(at::kFloat), ccol_ptr, t_row_idx, t_perm, N)
        .to(values.scalar_type());
  at::Tensor dx = at::empty({B, N}, dy.options());
  if (B == 0 || N == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bsr_grad_input_cpu", [&] {
    grad_input_kernel<scalar_t>(dy.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), ccol_ptr.data_ptr<int32_t>(),
                                t_row_idx.data_ptr<int32_t>(), t_perm.data_ptr<int32_t>(), dx.data_ptr<scalar_t>(),
                                B, M, N, BR, BC);
  });
  return dx;
}

at::Tensor bsr_grad_weight_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx,
                               const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                               const std::optional<at::Tensor>& mask_patterns, int64_t BR, int64_t BC) {
  check_cpu(dy, "dy");
  TORCH_CHECK(is_float_type(dy.scalar_type()), "dy: expected a floating dtype, got ", dy.scalar_type());
  check_operand(dy, "dy", dy.scalar_type());
  check_operand(x, "x", dy.scalar_type());
  TORCH_CHECK(dy.size(0) == x.size(0), "dy and x: batch sizes differ: ", dy.size(0), " vs ", x.size(0));
  TORCH_CHECK(BR > 0 && BC > 0, "block shape: expected positive sides, got (", BR, ", ", BC, ")");
  const int64_t B = dy.size(0), M = dy.size(1), N = x.size(1), nnzb = row_idx.numel();
  check_index(row_idx, "row_idx", -1);
  check_index(col_idx, "col_idx", nnzb);
  check_range(row_idx, "row_idx", cdiv(M, BR));
  check_range(col_idx, "col_idx", cdiv(N, BC));
  TORCH_CHECK(mask_ids.has_value() == mask_patterns.has_value(), "mask_ids and mask_patterns must be given together");
  if (mask_ids.has_value()) {
    check_index(*mask_ids, "mask_ids", nnzb);
    const at::Tensor& pats = *mask_patterns;
    check_cpu(pats, "mask_patterns");
    TORCH_CHECK(pats.scalar_type() == at::kBool && pats.dim() == 3 && pats.size(1) == BR && pats.size(2) == BC,
                "mask_patterns: expected bool [n, ", BR, ", ", BC, "], got ", pats.scalar_type(), " ", pats.sizes());
    TORCH_CHECK(pats.is_contiguous(), "mask_patterns: expected a contiguous tensor");
    check_range(*mask_ids, "mask_ids", pats.size(0));
  }
  if (is_half(dy.scalar_type()))
    return bsr_grad_weight_cpu(dy.to(at::kFloat), x.to(at::kFloat), row_idx, col_idx, mask_ids, mask_patterns, BR, BC)
        .to(dy.scalar_type());
  if (B == 0) return at::zeros({nnzb, BR, BC}, dy.options());
  at::Tensor dw = at::empty({nnzb, BR, BC}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bsr_grad_weight_cpu", [&] {
    grad_weight_kernel<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), row_idx.data_ptr<int32_t>(),
                                 col_idx.data_ptr<int32_t>(),
                                 mask_ids.has_value() ? mask_ids->data_ptr<int32_t>() : nullptr,
                                 mask_patterns.has_value() ? mask_patterns->data_ptr<bool>() : nullptr,
                                 dw.data_ptr<scalar_t>(), nnzb, B, M, N, BR, BC);
  });
  return dw;
}

}  // namespace
}  // namespace efcn_cpu

TORCH_LIBRARY_IMPL(efcn_sparse_C, CPU, m) {
  m.impl("bsr_forward", &efcn_cpu::bsr_forward_cpu);
  m.impl("bsr_grad_input", &efcn_cpu::bsr_grad_input_cpu);
  m.impl("bsr_grad_weight", &efcn_cpu::bsr_grad_weight_cpu);
}
