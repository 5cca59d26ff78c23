// The BSR kernels: one templated GEMM skeleton for the three ops, and the launchers.
//
// Every kernel is a CTA-tile GEMM over a K loop whose operand tiles are gathered through the BSR
// index arrays into shared memory by a multi-stage cp.async pipeline (16-byte chunks, coalesced
// along the contiguous dimension; partial or unaligned chunks fall back to element loads with
// zero fill, so any shape works and nothing outside the tensors is read). The math core is
// mma.sync m16n8k16 (fragments by ldmatrix) for float16/bfloat16 and FMA for float32/float64,
// always accumulating in float (double for float64). The epilogue stages the tile through shared
// memory and writes 16-byte chunks.
//
//   forward     Y[b, i*BR + n] = sum over blocks (i, j) of x[b, j*BC + k] W_ij[n, k]  (+ bias)
//               CTA: batch tile x output tile of one block row; K runs over the row's blocks.
//   grad_input  dX[b, j*BC + n] = sum over blocks (i, j) of dy[b, i*BR + k] W_ij[k, n]
//               CTA: the same over one block column, via ccol_ptr / t_row_idx / t_perm.
//   grad_weight dW_ij[m, n] = mask_ij[m, n] * sum_b dy[b, i*BR + m] x[b, j*BC + n]
//               CTA: a tile of one stored block; K runs over the whole batch in a fixed order
//               (deterministic, no atomics).
//
// In the sparse-dense products the K loop is a flat sequence of 16-wide steps (a block of K side
// kb gives ceil(kb/16) of them); a pipeline stage takes KC/16 consecutive steps, which may span
// several blocks, so block sides that are multiples of 16 waste no work whatever KC is.
#pragma once

#include "bsr_cuda.h"
#include "bsr_device.cuh"

#ifndef EFCN_EMULATE
#include <c10/cuda/CUDAException.h>
#endif
#include <c10/util/Exception.h>

namespace efcn_cuda {

#ifdef EFCN_EMULATE
#define EFCN_LAUNCH(kernel, ctas, threads, smem, stream, params) \
  ::efcn_emu::launch(kernel, dim3(static_cast<unsigned>(ctas)), dim3(threads), smem, params)
#else
#define EFCN_LAUNCH(kernel, ctas, threads, smem, stream, params)                      \
  do {                                                                                \
    kernel<<<dim3(static_cast<unsigned>(ctas)), dim3(threads), smem, stream>>>(params); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                   \
  } while (0)
#endif

template <typename T>
EFCN_DEV T zero() {
  return Elem<T>::from_acc(0);
}

EFCN_HD constexpr int cdiv_c(int a, int b) { return (a + b - 1) / b; }

template <typename A, typename B>
EFCN_DEV A min_of(A a, B b) {
  return a < static_cast<A>(b) ? a : static_cast<A>(b);
}

// CTA tile TM x TN, KC elements of K per pipeline stage, WM x WN warps.
template <int TM_, int TN_, int KC_, int STAGES_, int WM_, int WN_>
struct Cfg {
  static constexpr int TM = TM_, TN = TN_, KC = KC_, STAGES = STAGES_, WARPS_M = WM_, WARPS_N = WN_;
  static constexpr int THREADS = 32 * WM_ * WN_;
  static constexpr int WTM = TM_ / WM_, WTN = TN_ / WN_;  // warp tile
  static_assert(TM_ % WM_ == 0 && TN_ % WN_ == 0, "tile not divisible among warps");
  static_assert(KC_ % 16 == 0 && STAGES_ >= 2, "stage: K multiple of 16, two stages at least");
};

// Shared-memory layout, in elements of T. A is stored K-contiguous ([TM][KC]) or M-contiguous
// ([KC][TM]), B K-contiguous ([TN][KC]) or N-contiguous ([KC][TN]): always as the gather reads
// global memory, so loads stay 16-byte chunks; ldmatrix(.trans) or the FMA loop adapts. Rows are
// padded by one 16-byte chunk: an odd number of chunks per row makes the 8 row addresses of an
// ldmatrix, and the FMA loop's reads, hit distinct banks.
template <class C, typename T, bool A_KMAJ, bool B_KMAJ>
struct Smem {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  static constexpr int LDA = (A_KMAJ ? C::KC : C::TM) + VEC;
  static constexpr int LDB = (B_KMAJ ? C::KC : C::TN) + VEC;
  static constexpr int A_ELEMS = (A_KMAJ ? C::TM : C::KC) * LDA;
  static constexpr int B_ELEMS = (B_KMAJ ? C::TN : C::KC) * LDB;
  static constexpr int STAGE = A_ELEMS + B_ELEMS;
  static constexpr int LDC = C::TN + VEC;  // epilogue tile [TM][LDC]
  static constexpr int ELEMS = C::STAGES * STAGE > C::TM * LDC ? C::STAGES * STAGE : C::TM * LDC;
  static constexpr int BYTES = ELEMS * static_cast<int>(sizeof(T));
  static_assert(C::TM % VEC == 0 && C::TN % VEC == 0 && C::KC % VEC == 0, "tile sides: whole 16-byte chunks");
};

// ------------------------------------------------------------------ math cores
// Tensor cores: warp tile WTM x WTN of m16n8 fragments.
template <class C, typename T, bool A_KMAJ, bool B_KMAJ>
struct MmaCore {
  using S = Smem<C, T, A_KMAJ, B_KMAJ>;
  using Acc = float;
  static constexpr int MI = C::WTM / 16, NI = C::WTN / 8;
  static_assert(C::WTM % 16 == 0 && C::WTN % 16 == 0, "mma warp tile: sides multiples of 16");
  float acc[MI][NI][4];

  EFCN_DEV void init() {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;
  }

  EFCN_DEV void stage(const T* As, const T* Bs, int wm, int wn, int lane) {
#pragma unroll
    for (int ks = 0; ks < C::KC; ks += 16) {
      uint32_t a[MI][4], b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int m = wm * C::WTM + mi * 16;
        if constexpr (A_KMAJ)  // lanes 0-15: rows m..m+15 at k; lanes 16-31: the same rows at k+8
          ldsm_x4(a[mi], As + (m + (lane & 15)) * S::LDA + ks + (lane >> 4) * 8);
        else  // matrices (k0-7, m0-7), (k0-7, m8-15), (k8-15, m0-7), (k8-15, m8-15), transposed
          ldsm_x4_trans(a[mi], As + (ks + (lane & 7) + (lane >> 4) * 8) * S::LDA + m + ((lane >> 3) & 1) * 8);
      }
#pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {  // two n8 fragments per ldmatrix.x4
        const int n = wn * C::WTN + ni * 8;
        uint32_t r[4];
        if constexpr (B_KMAJ)  // matrices (n0-7, k0-7), (n0-7, k8-15), (n8-15, k0-7), (n8-15, k8-15)
          ldsm_x4(r, Bs + (n + (lane & 7) + (lane >> 4) * 8) * S::LDB + ks + ((lane >> 3) & 1) * 8);
        else  // matrices (k0-7, n0-7), (k8-15, n0-7), (k0-7, n8-15), (k8-15, n8-15), transposed
          ldsm_x4_trans(r, Bs + (ks + (lane & 7) + ((lane >> 3) & 1) * 8) * S::LDB + n + (lane >> 4) * 8);
        b[ni][0] = r[0];
        b[ni][1] = r[1];
        b[ni + 1][0] = r[2];
        b[ni + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni]);
    }
  }

  // f(m, n, value) for every accumulator, (m, n) in CTA-tile coordinates.
  template <class F>
  EFCN_DEV void for_each(int wm, int wn, int lane, F&& f) const {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          f(wm * C::WTM + mi * 16 + (lane >> 2) + (i >> 1) * 8, wn * C::WTN + ni * 8 + (lane & 3) * 2 + (i & 1),
            acc[mi][ni][i]);
  }
};

// FMA units: lanes as 4 x 8, each owning rows ty + 4i and columns tx + 8j of the warp tile.
template <class C, typename T, bool A_KMAJ, bool B_KMAJ>
struct FmaCore {
  using S = Smem<C, T, A_KMAJ, B_KMAJ>;
  using Acc = typename Elem<T>::Acc;
  static constexpr int RM = C::WTM / 4, RN = C::WTN / 8;
  static_assert(C::WTM % 4 == 0 && C::WTN % 8 == 0, "FMA warp tile: 4 x 8 lanes");
  Acc acc[RM][RN];

  EFCN_DEV void init() {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = Acc(0);
  }

  EFCN_DEV void stage(const T* As, const T* Bs, int wm, int wn, int lane) {
    const int mr = wm * C::WTM + (lane >> 3), nc = wn * C::WTN + (lane & 7);
    const T* a0 = As + (A_KMAJ ? mr * S::LDA : mr);
    const T* b0 = Bs + (B_KMAJ ? nc * S::LDB : nc);
#pragma unroll
    for (int k = 0; k < C::KC; ++k) {
      Acc a[RM], b[RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = Elem<T>::to_acc(A_KMAJ ? a0[4 * i * S::LDA + k] : a0[k * S::LDA + 4 * i]);
#pragma unroll
      for (int j = 0; j < RN; ++j) b[j] = Elem<T>::to_acc(B_KMAJ ? b0[8 * j * S::LDB + k] : b0[k * S::LDB + 8 * j]);
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] += a[i] * b[j];
    }
  }

  template <class F>
  EFCN_DEV void for_each(int wm, int wn, int lane, F&& f) const {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) f(wm * C::WTM + (lane >> 3) + 4 * i, wn * C::WTN + (lane & 7) + 8 * j, acc[i][j]);
  }
};

template <class C, typename T, bool A_KMAJ, bool B_KMAJ>
using Core = typename std::conditional<Elem<T>::kTensorCore, MmaCore<C, T, A_KMAJ, B_KMAJ>,
                                       FmaCore<C, T, A_KMAJ, B_KMAJ>>::type;

// ------------------------------------------------------------------ chunk moves
// One 16-byte chunk into shared memory: cp.async when whole and vector-aligned, else element
// loads; elements at and past `count` (all when count <= 0) are zero, and never read.
template <typename T>
EFCN_DEV void load_chunk(T* dst, const T* src, int64_t count, bool vec) {
  constexpr int VEC = 16 / sizeof(T);
  if (count >= VEC && vec) {
    cp_async16(dst, src);
  } else if (count <= 0) {
    sts16(dst, uint4{0u, 0u, 0u, 0u});
  } else {
    T v[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = e < count ? ldg(src + e) : zero<T>();
    uint4 u;
    memcpy(&u, v, 16);
    sts16(dst, u);
  }
}

// The first `count` elements (at most one chunk) of a shared-memory row to global memory.
template <typename T>
EFCN_DEV void store_chunk(T* dst, const T* src, int64_t count, bool vec) {
  constexpr int VEC = 16 / sizeof(T);
  if (count >= VEC && vec) {
    stg16(dst, lds16(src));
  } else {
    for (int e = 0; e < VEC && e < count; ++e) stg(dst + e, src[e]);
  }
}

// ------------------------------------------------------------------ sparse x dense (forward, grad_input)
// B_KMAJ: forward (values rows are output features, K contiguous); else grad_input (values rows
// are K, output contiguous).
template <class C, typename T, bool B_KMAJ>
struct SpmmLoader {
  using S = Smem<C, T, true, B_KMAJ>;
  static constexpr int VEC = S::VEC;
  static constexpr int SUB = C::KC / 16;  // 16-wide K steps per stage
  static constexpr int CPR = C::KC / VEC;  // chunks per K row of a stage
  static constexpr int RPP = C::THREADS / CPR;  // rows per pass
  static_assert(C::THREADS % CPR == 0, "a thread keeps one chunk column");

  const SpmmParams& p;
  const T* a;
  const T* w;
  int64_t b0;
  int n0, kbeg, spb, total, tid;

  // Slot (stored block) and in-block K offset of stage column kcol in stage s; false past the end
  // of the line or past the block's K side.
  EFCN_DEV bool locate(int s, int kcol, int& slot, int& kin) const {
    const int step = s * SUB + kcol / 16;
    if (step >= total) return false;
    slot = kbeg + step / spb;
    kin = (step % spb) * 16 + kcol % 16;
    return kin < p.kb;
  }

  EFCN_DEV const T* block_of(int slot) const {
    const int64_t blk = p.w_perm != nullptr ? ldg(p.w_perm + slot) : slot;
    EFCN_KERNEL_ASSERT(blk >= 0 && blk < p.nnzb);
    return w + blk * p.kb * p.nb;
  }

  EFCN_DEV void load(T* stage, int s) const {
    T* As = stage;
    T* Bs = stage + S::A_ELEMS;
    const int kcol = (tid % CPR) * VEC;
    int slot = 0, kin = 0;
    const bool kval = locate(s, kcol, slot, kin);
    // A: rows are batch entries; this thread's chunk column is fixed for the stage
    int64_t acount = 0;
    const T* asrc = a;
    if (kval) {
      const int64_t ablk = ldg(p.a_blk + slot);
      EFCN_KERNEL_ASSERT(ablk >= 0 && ablk < p.a_blocks);
      const int64_t acol = ablk * p.kb + kin;
      acount = min_of(min_of(static_cast<int64_t>(VEC), p.kb - kin), p.lda - acol);
      asrc = a + acol;
    }
#pragma unroll
    for (int i = 0; i < cdiv_c(C::TM, RPP); ++i) {
      const int r = tid / CPR + i * RPP;
      if (C::TM % RPP != 0 && r >= C::TM) break;
      const int64_t b = b0 + r;
      const bool ok = b < p.batch && acount > 0;
      load_chunk(As + r * S::LDA + kcol, ok ? asrc + b * p.lda : a, ok ? acount : 0, p.vec_a);
    }
    if constexpr (B_KMAJ) {  // B [TN][KC]: row n of the tile is output feature n0 + n of the block
      const T* wb = kval ? block_of(slot) + kin : w;
      const int64_t wcount = kval ? min_of(static_cast<int64_t>(VEC), p.kb - kin) : 0;
#pragma unroll
      for (int i = 0; i < cdiv_c(C::TN, RPP); ++i) {
        const int n = tid / CPR + i * RPP;
        if (C::TN % RPP != 0 && n >= C::TN) break;
        const bool ok = n0 + n < p.nb && wcount > 0;
        load_chunk(Bs + n * S::LDB + kcol, ok ? wb + static_cast<int64_t>(n0 + n) * p.kb : w, ok ? wcount : 0, p.vec_w);
      }
    } else {  // B [KC][TN]: row k of the tile is in-block row kin of some block
      constexpr int CPRB = C::TN / VEC;
#pragma unroll
      for (int i = 0; i < cdiv_c(C::KC * CPRB, C::THREADS); ++i) {
        const int c = tid + i * C::THREADS;
        if ((C::KC * CPRB) % C::THREADS != 0 && c >= C::KC * CPRB) break;
        const int kk = c / CPRB, nc = (c % CPRB) * VEC;
        int slot2 = 0, kin2 = 0;
        const bool ok = locate(s, kk, slot2, kin2) && n0 + nc < p.nb;
        const T* src = ok ? block_of(slot2) + static_cast<int64_t>(kin2) * p.nb + n0 + nc : w;
        load_chunk(Bs + kk * S::LDB + nc, src, ok ? min_of(static_cast<int64_t>(VEC), p.nb - n0 - nc) : 0, p.vec_w);
      }
    }
  }
};

template <class C, typename T, bool B_KMAJ>
__global__ void __launch_bounds__(C::THREADS, 1) spmm_kernel(const SpmmParams p) {
  using S = Smem<C, T, true, B_KMAJ>;
  using K = Core<C, T, true, B_KMAJ>;
  using Acc = typename K::Acc;
  constexpr int VEC = S::VEC;
  EFCN_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;

  // CTA -> (line, output tile, batch tile); batch tiles vary fastest so the CTAs that share a
  // line's weights run together and find them in L2.
  int64_t cta = blockIdx.x;
  const int bt = static_cast<int>(cta % p.b_tiles);
  cta /= p.b_tiles;
  const int nt = static_cast<int>(cta % p.n_tiles);
  const int line = static_cast<int>(cta / p.n_tiles);
  const int kbeg = ldg(p.ptr + line), kend = ldg(p.ptr + line + 1);
  EFCN_KERNEL_ASSERT(0 <= kbeg && kbeg <= kend && kend <= p.nnzb);
  const int spb = (p.kb + 15) / 16;
  const int total = (kend - kbeg) * spb;
  const int iters = (total + C::KC / 16 - 1) / (C::KC / 16);

  const SpmmLoader<C, T, B_KMAJ> ld{p, static_cast<const T*>(p.a), static_cast<const T*>(p.w),
                                    static_cast<int64_t>(bt) * C::TM, nt * C::TN, kbeg, spb, total, tid};
  K core;
  core.init();
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < iters) ld.load(smem + s * S::STAGE, s);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<C::STAGES - 2>();  // stage `it` has landed (for this thread) ...
    __syncthreads();                 // ... for all threads; and stage it-1 is consumed
    const int next = it + C::STAGES - 1;
    if (next < iters) ld.load(smem + (next % C::STAGES) * S::STAGE, next);
    cp_async_commit();
    const T* st = smem + (it % C::STAGES) * S::STAGE;
    core.stage(st, st + S::A_ELEMS, wm, wn, lane);
  }
  cp_async_wait<0>();
  __syncthreads();

  // epilogue: accumulators (+ bias, in the accumulator type) -> shared tile -> 16-byte stores
  T* Cs = smem;
  const int n0 = ld.n0;
  const int64_t col0 = static_cast<int64_t>(line) * p.nb + n0;  // output column of tile column 0
  const T* bias = static_cast<const T*>(p.bias);
  core.for_each(wm, wn, lane, [&](int m, int n, Acc v) {
    if (bias != nullptr && n0 + n < p.nb && col0 + n < p.ldo) v += Elem<T>::to_acc(ldg(bias + col0 + n));
    Cs[m * S::LDC + n] = Elem<T>::from_acc(v);
  });
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  constexpr int CPR = C::TN / VEC;
#pragma unroll
  for (int i = 0; i < cdiv_c(C::TM * CPR, C::THREADS); ++i) {
    const int c = tid + i * C::THREADS;
    if ((C::TM * CPR) % C::THREADS != 0 && c >= C::TM * CPR) break;
    const int r = c / CPR, nc = (c % CPR) * VEC;
    const int64_t b = ld.b0 + r;
    const int64_t count = min_of(min_of(static_cast<int64_t>(VEC), p.nb - n0 - nc), p.ldo - col0 - nc);
    if (b < p.batch && count > 0) store_chunk(out + b * p.ldo + col0 + nc, Cs + r * S::LDC + nc, count, p.vec_out);
  }
}

// ------------------------------------------------------------------ grad_weight
// Both operands are read batch-row by batch-row: A = dy[b, rows of the block] ([KC][TM], M
// contiguous), B = x[b, cols of the block] ([KC][TN], N contiguous).
template <class C, typename T>
struct GwLoader {
  using S = Smem<C, T, false, false>;
  static constexpr int VEC = S::VEC;
  const GwParams& p;
  const T* dy;
  const T* x;
  int64_t row0, col0;  // first matrix row / column of the block
  int m0, n0, tid;

  EFCN_DEV void load(T* stage, int s) const {
    T* As = stage;
    T* Bs = stage + S::A_ELEMS;
    const int64_t bs = static_cast<int64_t>(s) * C::KC;
    constexpr int CPRA = C::TM / VEC, CPRB = C::TN / VEC;
#pragma unroll
    for (int i = 0; i < cdiv_c(C::KC * CPRA, C::THREADS); ++i) {
      const int c = tid + i * C::THREADS;
      if ((C::KC * CPRA) % C::THREADS != 0 && c >= C::KC * CPRA) break;
      const int kk = c / CPRA, mc = m0 + (c % CPRA) * VEC;
      const int64_t count = bs + kk < p.batch ? min_of(min_of(static_cast<int64_t>(VEC), p.BR - mc), p.M - row0 - mc) : 0;
      load_chunk(As + kk * S::LDA + (c % CPRA) * VEC, count > 0 ? dy + (bs + kk) * p.M + row0 + mc : dy, count, p.vec_dy);
    }
#pragma unroll
    for (int i = 0; i < cdiv_c(C::KC * CPRB, C::THREADS); ++i) {
      const int c = tid + i * C::THREADS;
      if ((C::KC * CPRB) % C::THREADS != 0 && c >= C::KC * CPRB) break;
      const int kk = c / CPRB, nc = n0 + (c % CPRB) * VEC;
      const int64_t count = bs + kk < p.batch ? min_of(min_of(static_cast<int64_t>(VEC), p.BC - nc), p.N - col0 - nc) : 0;
      load_chunk(Bs + kk * S::LDB + (c % CPRB) * VEC, count > 0 ? x + (bs + kk) * p.N + col0 + nc : x, count, p.vec_x);
    }
  }
};

template <class C, typename T>
__global__ void __launch_bounds__(C::THREADS, 1) grad_weight_kernel(const GwParams p) {
  using S = Smem<C, T, false, false>;
  using K = Core<C, T, false, false>;
  using Acc = typename K::Acc;
  constexpr int VEC = S::VEC;
  EFCN_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;

  // CTA -> (stored block, tile of it); consecutive CTAs share the block's dy rows.
  const int64_t cta = blockIdx.x;
  const int tiles = p.m_tiles * p.n_tiles;
  const int64_t blk = cta / tiles;
  const int t = static_cast<int>(cta % tiles);
  const int m0 = (t / p.n_tiles) * C::TM, n0 = (t % p.n_tiles) * C::TN;
  const int64_t brow = ldg(p.row_idx + blk), bcol = ldg(p.col_idx + blk);
  EFCN_KERNEL_ASSERT(brow >= 0 && brow * p.BR < p.M && bcol >= 0 && bcol * p.BC < p.N);
  const GwLoader<C, T> ld{p, static_cast<const T*>(p.dy), static_cast<const T*>(p.x), brow * p.BR, bcol * p.BC, m0, n0, tid};
  const int iters = static_cast<int>((p.batch + C::KC - 1) / C::KC);

  K core;
  core.init();
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < iters) ld.load(smem + s * S::STAGE, s);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int next = it + C::STAGES - 1;
    if (next < iters) ld.load(smem + (next % C::STAGES) * S::STAGE, next);
    cp_async_commit();
    const T* st = smem + (it % C::STAGES) * S::STAGE;
    core.stage(st, st + S::A_ELEMS, wm, wn, lane);
  }
  cp_async_wait<0>();
  __syncthreads();

  // epilogue: accumulators -> shared tile -> element mask -> 16-byte stores of the block tile
  T* Cs = smem;
  core.for_each(wm, wn, lane, [&](int m, int n, Acc v) { Cs[m * S::LDC + n] = Elem<T>::from_acc(v); });
  __syncthreads();
  const uint8_t* mask = nullptr;
  if (p.mask != nullptr) {
    const int64_t id = ldg(p.mask_ids + blk);
    EFCN_KERNEL_ASSERT(id >= 0 && id < p.n_patterns);
    mask = p.mask + id * p.BR * p.BC;
  }
  T* out = static_cast<T*>(p.out) + blk * p.BR * p.BC;
  constexpr int CPR = C::TN / VEC;
#pragma unroll
  for (int it = 0; it < cdiv_c(C::TM * CPR, C::THREADS); ++it) {
    const int c = tid + it * C::THREADS;
    if ((C::TM * CPR) % C::THREADS != 0 && c >= C::TM * CPR) break;
    const int r = c / CPR, nc = (c % CPR) * VEC;
    const int i = m0 + r, j = n0 + nc;
    const int count = min_of(VEC, p.BC - j);
    if (i >= p.BR || count <= 0) continue;
    const int64_t off = static_cast<int64_t>(i) * p.BC + j;
    T v[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = Cs[r * S::LDC + nc + e];
    if (mask != nullptr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (e < count && ldg(mask + off + e) == 0) v[e] = zero<T>();  // exactly 0, as in the reference, even for NaN
    }
    if (p.accumulate) {  // out + dW rounded as the unfused `grad += dW` rounds it; + 0 leaves masked entries as they are
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (e < count) v[e] = Elem<T>::from_acc(Elem<T>::to_acc(ldg(out + off + e)) + Elem<T>::to_acc(v[e]));
    }
    if (count == VEC && p.vec_out) {
      uint4 u;
      memcpy(&u, v, 16);
      stg16(out + off, u);
    } else {
      for (int e = 0; e < count; ++e) stg(out + off + e, v[e]);
    }
  }
}

// ------------------------------------------------------------------ launchers
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename A, typename B>
inline int64_t cdiv(A a, B b) {
  return (static_cast<int64_t>(a) + b - 1) / b;
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
#ifndef EFCN_EMULATE
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
#else
  (void)kernel;
  (void)bytes;
#endif
}

template <class C, typename T, bool B_KMAJ>
void run_spmm(SpmmParams p, cudaStream_t stream) {
  using S = Smem<C, T, true, B_KMAJ>;
  constexpr int VEC = S::VEC;
  p.n_tiles = static_cast<int>(cdiv(p.nb, C::TN));
  p.b_tiles = static_cast<int>(cdiv(p.batch, C::TM));
  const int w_ld = B_KMAJ ? p.kb : p.nb;  // BC either way
  p.vec_a = aligned16(p.a) && p.lda % VEC == 0 && p.kb % VEC == 0;
  p.vec_w = aligned16(p.w) && w_ld % VEC == 0;
  p.vec_out = aligned16(p.out) && p.ldo % VEC == 0 && p.nb % VEC == 0;
  const int64_t ctas = static_cast<int64_t>(p.b_tiles) * p.n_tiles * p.lines;
  TORCH_CHECK(ctas <= kMaxCtas, "efcn_sparse cuda: too many tiles for one launch (", ctas, ")");
  auto kernel = spmm_kernel<C, T, B_KMAJ>;
  allow_smem(kernel, S::BYTES);
  EFCN_LAUNCH(kernel, ctas, C::THREADS, S::BYTES, stream, p);
}

template <class C, typename T>
void run_grad_weight(GwParams p, cudaStream_t stream) {
  using S = Smem<C, T, false, false>;
  constexpr int VEC = S::VEC;
  p.m_tiles = static_cast<int>(cdiv(p.BR, C::TM));
  p.n_tiles = static_cast<int>(cdiv(p.BC, C::TN));
  p.vec_dy = aligned16(p.dy) && p.M % VEC == 0 && p.BR % VEC == 0;
  p.vec_x = aligned16(p.x) && p.N % VEC == 0 && p.BC % VEC == 0;
  p.vec_out = aligned16(p.out) && p.BC % VEC == 0;
  const int64_t ctas = p.nnzb * p.m_tiles * p.n_tiles;
  TORCH_CHECK(ctas <= kMaxCtas, "efcn_sparse cuda: too many tiles for one launch (", ctas, ")");
  auto kernel = grad_weight_kernel<C, T>;
  allow_smem(kernel, S::BYTES);
  EFCN_LAUNCH(kernel, ctas, C::THREADS, S::BYTES, stream, p);
}

// ------------------------------------------------------------------ configurations
// Sparse x dense: batch tile by batch size (small batches stream weights: a 16-row tile wastes
// little), output tile 32 for narrow blocks (<= 32 output features), else 64.
using SpmmTcL64 = Cfg<128, 64, 32, 4, 2, 2>;  // warp tile 64 x 32
using SpmmTcL32 = Cfg<128, 32, 32, 4, 4, 1>;  // 32 x 32
using SpmmTcM64 = Cfg<64, 64, 32, 4, 2, 2>;   // 32 x 32
using SpmmTcM32 = Cfg<64, 32, 32, 4, 2, 2>;   // 32 x 16
using SpmmTcS64 = Cfg<16, 64, 64, 4, 1, 4>;   // 16 x 16
using SpmmTcS32 = Cfg<16, 32, 64, 4, 1, 2>;   // 16 x 16
using SpmmF64 = Cfg<64, 64, 16, 4, 2, 2>;     // float: warp tile 32 x 32, 8 x 4 per lane
using SpmmF32 = Cfg<64, 32, 16, 4, 2, 1>;
using SpmmFS = Cfg<16, 64, 16, 4, 1, 4>;      // 16 x 16, 4 x 2 per lane
using SpmmD = Cfg<64, 64, 16, 2, 2, 2>;       // double

template <typename T, bool B_KMAJ>
void spmm_tc(const SpmmParams& p, cudaStream_t s) {
  const bool narrow = p.nb <= 32;
  if (p.batch <= 16)
    narrow ? run_spmm<SpmmTcS32, T, B_KMAJ>(p, s) : run_spmm<SpmmTcS64, T, B_KMAJ>(p, s);
  else if (p.batch <= 64)
    narrow ? run_spmm<SpmmTcM32, T, B_KMAJ>(p, s) : run_spmm<SpmmTcM64, T, B_KMAJ>(p, s);
  else
    narrow ? run_spmm<SpmmTcL32, T, B_KMAJ>(p, s) : run_spmm<SpmmTcL64, T, B_KMAJ>(p, s);
}

template <bool B_KMAJ>
void dispatch_spmm(const SpmmParams& p, DType dtype, cudaStream_t s) {
  switch (dtype) {
    case DType::kHalf: return spmm_tc<half_t, B_KMAJ>(p, s);
    case DType::kBFloat16: return spmm_tc<bf16_t, B_KMAJ>(p, s);
    case DType::kFloat:
      if (p.batch <= 16) return run_spmm<SpmmFS, float, B_KMAJ>(p, s);
      return p.nb <= 32 ? run_spmm<SpmmF32, float, B_KMAJ>(p, s) : run_spmm<SpmmF64, float, B_KMAJ>(p, s);
    case DType::kDouble: return run_spmm<SpmmD, double, B_KMAJ>(p, s);
  }
}

}  // namespace efcn_cuda
