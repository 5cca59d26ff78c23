// CPU kernels of the three BSR ops (schemas in csrc/ops.cpp, contract in
// efcn_sparse/kernels/reference.py):
//   bsr_forward     y  [B, M]         = x [B, N] W^T + bias    tasks: (block row, batch chunk)
//   bsr_grad_input  dx [B, N]         = dy [B, M] W            tasks: (block column, batch chunk),
//                                                              through ccol_ptr/t_row_idx/t_perm
//   bsr_grad_weight dW [nnzb, BR, BC] = dy^T x on stored blocks, times the element mask
//                                                              tasks: stored blocks
// All work is dense register-tile GEMMs (microkernel.h) on packed panels:
// * forward / grad_input: the streamed operand (x or dy) is repacked once per call into batch
//   tiles (a buffer of its own size); a task packs its slice's blocks (transposed for the
//   forward) concatenated along K, so an output tile is computed in registers over the whole
//   block row (column) and written once. A per-thread panel holds at most kKMax x block side;
//   longer slices go in K groups, each output tile accumulating across them in a task's own
//   panel (the micro-kernel continues its chains) until it is written once.
// * forward at batch <= kGemvBatch (AVX-512): matrix-vector products straight from the blocks.
// * grad_weight: x is repacked once per call into per-block-column panels, dy into its block
//   rows' panels (one in-order pass where the ISA has it, else per block row as reached); each
//   block is then one [BR x B] @ [B x BC] product.
// * bfloat16: on AVX512_BF16 dot products where the CPU has them and the shape allows
//   (*_bf16_pairs: K taken in pairs, float accumulation, one rounding); else on float32 copies.
// * blocks much narrower than the active tile's NR columns (few-channel layers stored tight)
//   are grouped to fill the tiles (narrow_slice_gemm, grad_weight_narrow_kernel).
// No buffer scales with stored blocks x batch. Large buffers (outputs, packed operands) come from
// buffer_pool.h, which recycles them between calls instead of paying page faults each time.
//
// Edge blocks that stick out of (M, N) are handled by limiting K to the in-range part and
// zero-padding the packed panels; out-of-range entries of x, dy, y, dx are never touched.
//
// Determinism: every output entry is computed by exactly one task as one chain of multiply-adds
// in an order fixed by the layout alone (blocks in stored order, K ascending, continued across K
// groups), so results are bit-identical across runs and thread counts for a given micro-kernel
// ISA (microkernel.h: AVX-512, AVX2 and portable C++, chosen at run time). The two SIMD ones
// agree bit for bit: narrow lines grouped by tile width add only exact zeros from the other lines'
// blocks. They are not bit-identical to the reference backend (another summation order; nor is
// the matrix-vector forward to the tile one). Panels are packed for the active ISA's tile shape
// (Kernels<T>::mr, ::nr), read once per op call.
//
// Checked before any access: dtypes, devices, dims, contiguity, index tensor lengths, pointer
// arrays (start 0, end nnzb, monotone), every block row/column/permutation/mask id in range.
// Trusted (cannot cause out-of-bounds access): column indices sorted and unique within a row
// (duplicates would be summed, as in the reference), t_perm being a permutation consistent
// with crow_ptr/col_idx, row_idx consistent with crow_ptr (unused by the forward), and values
// being zero at masked entries.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "buffer_pool.h"
#include "microkernel.h"

namespace efcn_cpu {
namespace {

// Longest K (in elements) one packed panel holds. Longer rows/columns/batches are split at
// fixed points into groups whose partial results are summed through the output.
constexpr int64_t kKMax = 256;

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

// Work (multiply-adds, or elements moved) below which a loop runs on the calling thread: waking
// the OpenMP team costs microseconds on an idle machine and a scheduler time slice on a busy one.
constexpr int64_t kParallelWork = int64_t{1} << 21;

// Grain for at::parallel_for over items of `per_item` work each.
int64_t grain_for(int64_t per_item) { return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(per_item, 1)); }

// Runs body(state, u0, u1) over [0, n), `work` in total, on at::parallel_for's threads, handing
// out chunks of about n / (16 threads) items dynamically: a thread that is descheduled (the
// CPUs are often shared) holds back one chunk, not 1/threads of the work. init() makes each
// thread's scratch state. Which thread runs an item never changes its result.
template <typename Init, typename Body>
void parallel_dynamic(int64_t n, int64_t work, Init init, Body body) {
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt <= 1 || work < kParallelWork || at::in_parallel_region()) {
    auto state = init();
    body(state, 0, n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, n / (16 * nt));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    auto state = init();
    for (int64_t u0; (u0 = next.fetch_add(chunk)) < n;) body(state, u0, std::min(n, u0 + chunk));
  });
}

// Batch chunks (of nbt batch tiles) per output slice, so that few slices still give every
// thread work; the split does not change any result (see the determinism note above).
int64_t batch_chunks(int64_t slices, int64_t nbt) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  if (slices >= want) return 1;
  return std::max<int64_t>(1, std::min(cdiv(want, std::max<int64_t>(slices, 1)), nbt));
}

// kernels<T>() of the active ISA; a bad EFCN_CPU_ISA is reported like the other argument errors.
template <typename T>
const Kernels<T>& active_kernels() {
  try {
    return kernels<T>();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what(), " (from the environment variable EFCN_CPU_ISA)");
  }
}

// ------------------------------------------------------------------------------ shared pieces
// Outputs and packed operands at least this large are written with non-temporal stores
// (Kernels::store_rows, ::pack_rows): they do not fit the caches, and streaming saves reading
// each line before it is overwritten.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// dst[t][f][m] = src[t*mr + m][f] for the rows of a [rows, F] row-major matrix, zero past the
// last row: the streamed operand (x or dy) as batch tiles whose columns are contiguous panels,
// mr the active tile height.
template <typename T>
void pack_batch_tiles(const Kernels<T>& ks, const T* src, int64_t rows, int64_t F, T* dst) {
  const int MR = ks.mr;
  const bool stream = cdiv(rows, MR) * MR * F * int64_t{sizeof(T)} >= kStreamBytes;
  at::parallel_for(0, cdiv(rows, MR), grain_for(F * MR), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      ks.pack_rows(src + t * MR * F, F, std::min<int64_t>(MR, rows - t * MR), F, dst + t * F * MR, stream);
    if (stream) store_fence();
  });
}

// ------------------------------------------------------------------------------ bfloat16 as float32
// Where the bf16 dot products are not used, bfloat16 ops run the float32 kernels on operands
// widened to float32 as they are packed (and float32 master values rounded to bfloat16 first),
// each output rounded once as torch rounds: the float32 computation on widened copies, bit for
// bit, without the copies.
inline float widen_bf16(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// the bits of v rounded to bfloat16 as torch rounds it (to nearest even, subnormals kept, NaN
// as 0xFFFF: store_rows_bf16's roundings)
inline uint16_t bf16_bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return v != v ? uint16_t{0xFFFF} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float round_to_bf16(float v) { return widen_bf16(bf16_bits_of(v)); }

// dst[r * ldd + c] = src[r * ld + c] as float32 for r < rows, c < cols: bfloat16 bits widened
// (S = uint16_t), or float32 values rounded to bfloat16 (S = float; dst may be src). Vectorised
// on AVX-512 (microkernel.h), the same bits one at a time elsewhere.
template <typename S>
void to_f32_rows(const S* src, int64_t ld, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  if (rows <= 0 || cols <= 0) return;
  if (active_isa() == Isa::kAvx512) {
    if constexpr (std::is_same_v<S, uint16_t>)
      widen_bf16_rows(src, ld, rows, cols, dst, ldd);
    else
      round_rows_f32(src, ld, rows, cols, dst, ldd);
    return;
  }
  for (int64_t r = 0; r < rows; ++r, src += ld, dst += ldd) {
    if constexpr (std::is_same_v<S, uint16_t>) {
      for (int64_t c = 0; c < cols; ++c) dst[c] = widen_bf16(src[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) dst[c] = round_to_bf16(src[c]);
    }
  }
}

// pack_batch_tiles of a bfloat16 operand (its bits), widened through a small per-thread buffer.
void pack_batch_tiles_bf16(const Kernels<float>& ks, const uint16_t* src, int64_t rows, int64_t F, float* dst) {
  const int MR = ks.mr;
  constexpr int64_t kCols = 512;
  const bool stream = cdiv(rows, MR) * MR * F * int64_t{sizeof(float)} >= kStreamBytes;
  at::parallel_for(0, cdiv(rows, MR), grain_for(F * MR), [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(MR * kCols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = std::min<int64_t>(MR, rows - t * MR);
      for (int64_t f0 = 0; f0 < F; f0 += kCols) {
        const int64_t fc = std::min(kCols, F - f0);
        to_f32_rows(src + t * MR * F + f0, F, r, fc, buf.data(), fc);
        ks.pack_rows(buf.data(), fc, r, fc, dst + (t * F + f0) * MR, stream);
      }
    }
    if (stream) store_fence();
  });
}

// A K-segment of a row (column) task: `k` consecutive columns of the streamed operand from
// `a_off`, matched with the rows (columns) of one block starting at `w`.
template <typename T>
struct Seg {
  int64_t a_off;
  const T* w;
  int64_t k;
  int64_t item = 0;  // the packer's own index of what the segment holds (narrow_slice_gemm)
};

// Calls fn(segs, K, g, ngroups) on the ngroups consecutive groups g of the K entries of blocks [p0, p1):
// extent(p) is the in-range K of block p, make(p, k0, k) the segment of its entries [k0, k0+k).
// The K entries are split into the fewest groups of at most kKMax, of near-equal size; blocks
// are cut where a group fills up, so the cut points depend on the layout alone.
template <typename T, typename Extent, typename Make, typename Fn>
void for_each_group(int64_t p0, int64_t p1, Extent extent, Make make, std::vector<Seg<T>>& segs, Fn fn) {
  int64_t total = 0;
  for (int64_t p = p0; p < p1; ++p) total += extent(p);
  const int64_t kmax = cdiv(total, cdiv(total, kKMax)), ngroups = cdiv(total, kmax);
  segs.clear();
  int64_t K = 0, g = 0;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t kp = extent(p);
    for (int64_t k0 = 0; k0 < kp;) {
      if (K == kmax) {
        fn(segs, K, g++, ngroups);
        segs.clear();
        K = 0;
      }
      const int64_t k = std::min(kp - k0, kmax - K);
      segs.push_back(make(p, k0, k));
      K += k;
      k0 += k;
    }
  }
  fn(segs, K, g, ngroups);
}

// out[m*ldc + n] = tile[m][n] (+ bias[n]) for m < mr, n < nv, through the caches; summed in T,
// then rounded once to OutT.
template <typename T, typename OutT>
void store_tile(const T* tile, int mr, int NR, int64_t nv, OutT* out, int64_t ldc, const OutT* bias) {
  for (int m = 0; m < mr; ++m) {
    OutT* o = out + m * ldc;
    const T* t = tile + m * NR;
    for (int64_t n = 0; n < nv; ++n) o[n] = static_cast<OutT>(bias ? t[n] + static_cast<T>(bias[n]) : t[n]);
  }
}

template <typename T>
void fill_rows(T* out, int64_t ldc, int64_t b0, int64_t b1, int64_t nv, const T* bias) {
  for (int64_t b = b0; b < b1; ++b) {
    T* o = out + b * ldc;
    for (int64_t n = 0; n < nv; ++n) o[n] = bias ? bias[n] : T(0);
  }
}

// Appends to `out` part `part` of `nparts` of the cache lines of n blocks of `bytes` bytes each,
// block b at block(b), as ranges: the next slice's blocks (or dy rows), handed to the
// micro-kernels of the current one, which prefetch them between multiply-adds (microkernel.h),
// so that their memory latency overlaps computation instead of stalling the packing.
template <typename BlockPtr>
void lines_part(int64_t n, int64_t bytes, BlockPtr block, int64_t part, int64_t nparts, std::vector<LineRange>& out) {
  const int64_t per = cdiv(bytes, 64), total = n * per, l1 = total * (part + 1) / nparts;
  for (int64_t l = total * part / nparts; l < l1;) {
    const int64_t b = l / per, end = std::min(l1, (b + 1) * per);
    out.push_back({reinterpret_cast<const char*>(block(b)) + (l - b * per) * 64, end - l});
    l = end;
  }
}

// Shared driver of forward and grad_input: out [B, ldc] gets, for each of n_groups output block
// slices g (a block row of y, or a block column of dx), the product of the streamed operand
// `a` [B, F] at the columns of the group's segments with the packed blocks. `blocks(g)` gives
// (p0, p1, extent, make) for for_each_group; `pack_b(segs, K, nv, q, bpack)` packs panel q of the
// group's blocks (output columns q*NR.. of the slice) as [K][NR], columns past nv zero, just
// before its products (one panel at a time stays in L1); the tile shape is that of `ks`. `lines(g, part,
// nparts, out)` appends a part of the cache lines of slice g's blocks (lines_part).
// A task's output tiles accumulate in a contiguous panel of its own across the K groups (the
// micro-kernel continues each entry's chain, load_c) and are written to `out` once, after the
// last group.
// T is the type of the packed panels and accumulators; OutT that of out and bias (bfloat16 for
// the bf16 pair kernels, whose T entries hold pairs of bfloat16).
// a16 (T float only): the streamed operand is bfloat16 bits instead of a, widened as it is packed.
template <typename T, typename OutT, typename Blocks, typename PackB, typename Lines>
void slice_gemm(const Kernels<T>& ks, const T* a, int64_t B, int64_t F, OutT* out, int64_t ldc, int64_t n_groups,
                int64_t side, int64_t out_cols, const OutT* bias, int64_t work, Blocks blocks, PackB pack_b,
                Lines lines, const uint16_t* a16 = nullptr) {
  const int NR = ks.nr, MR = ks.mr;
  const int64_t nq = cdiv(side, NR), nbt = cdiv(B, MR);
  at::Tensor ap_t = pooled_empty({nbt * F * MR}, c10::CppTypeToScalarType<T>::value);
  T* ap = ap_t.data_ptr<T>();
  if constexpr (std::is_same_v<T, float>) {
    if (a16) pack_batch_tiles_bf16(ks, a16, B, F, ap);
    else pack_batch_tiles(ks, a, B, F, ap);
  } else {
    pack_batch_tiles(ks, a, B, F, ap);
  }
  const int64_t tiles_per_task = cdiv(nbt, batch_chunks(n_groups, nbt));
  const int64_t nch = cdiv(nbt, tiles_per_task);
  const bool stream = std::is_same_v<T, OutT> && B * ldc * int64_t{sizeof(T)} >= kStreamBytes;
  constexpr int64_t kAlign = 64 / sizeof(T);
  struct Scratch {
    std::vector<T> bpack, cbuf;
    std::vector<int64_t> offs, ks;
    std::vector<Seg<T>> segs;
    std::vector<LineRange> pf;
  };
  // a group holds at most kKMax K entries (more than F where trusted index lists repeat a block)
  auto init = [&] {
    return Scratch{std::vector<T>(kKMax * NR), std::vector<T>(tiles_per_task * nq * MR * NR + kAlign), {}, {}, {}, {}};
  };
  parallel_dynamic(n_groups * nch, work, init, [&](Scratch& st, int64_t u0, int64_t u1) {
    std::vector<T>& bpack = st.bpack;
    std::vector<int64_t>& offs = st.offs;
    std::vector<int64_t>& kk = st.ks;
    std::vector<LineRange>& pf = st.pf;
    T* cpanel = st.cbuf.data();  // [bt - bt0][q][MR][NR], 64-byte aligned
    cpanel += (kAlign - reinterpret_cast<uintptr_t>(cpanel) / sizeof(T) % kAlign) % kAlign;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = u / nch, bt0 = (u % nch) * tiles_per_task, bt1 = std::min(nbt, bt0 + tiles_per_task);
      const int64_t nv = std::min(side, out_cols - g * side);  // in-range outputs of this slice
      OutT* o = out + g * side;
      const OutT* bias_g = bias ? bias + g * side : nullptr;
      const auto range = blocks(g);
      const int64_t p0 = std::get<0>(range), p1 = std::get<1>(range);
      if (p0 == p1) {
        fill_rows(o, ldc, bt0 * MR, std::min(B, bt1 * MR), nv, bias_g);
        continue;
      }
      // the next slice this thread computes, if known and another one: prefetched while this one runs
      const int64_t g_next = u + 1 < u1 && (u + 1) / nch != g ? (u + 1) / nch : -1;
      auto group = [&](const std::vector<Seg<T>>& sg, int64_t K, int64_t gidx, int64_t ngroups) {
        const bool first = gidx == 0, last = gidx + 1 == ngroups;
        // g_next's lines are spread over every call of this slice (all its K groups), so that
        // their memory latency has the whole slice to hide in
        const int64_t nparts = ngroups * (bt1 - bt0) * nq;
        // segments contiguous in the packed operand merge (same K order: narrow blocks of
        // neighbouring pixels otherwise give the micro-kernel a loop per block)
        offs.clear();
        kk.clear();
        for (const Seg<T>& s : sg) {
          if (!kk.empty() && offs.back() + kk.back() * MR == s.a_off * MR) {
            kk.back() += s.k;
          } else {
            offs.push_back(s.a_off * MR);
            kk.push_back(s.k);
          }
        }
        // q outer: one B panel (K x NR, at most kKMax x NR) stays in L1 across the batch tiles
        for (int64_t q = 0; q < nq; ++q) {
          pack_b(sg, K, nv, q, bpack.data());
          for (int64_t bt = bt0; bt < bt1; ++bt) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, B - bt * MR));
            pf.clear();
            if (g_next >= 0) lines(g_next, (gidx * (bt1 - bt0) + bt - bt0) * nq + q, nparts, pf);
            T* c = cpanel + ((bt - bt0) * nq + q) * MR * NR;
            // the next call's batch tile: the next one, or back to the first for the next panel
            const T* next_a = bt + 1 < bt1 ? ap + (bt + 1) * F * MR : q + 1 < nq ? ap + bt0 * F * MR : nullptr;
            ks.tile[mr](ap + bt * F * MR, offs.data(), kk.data(), static_cast<int>(offs.size()),
                        bpack.data(), c, !first, Prefetch<T>{next_a, pf.data(), static_cast<int>(pf.size())});
            if (!last) continue;
            const int64_t nvq = std::min<int64_t>(NR, nv - q * NR);
            OutT* oq = o + bt * MR * ldc + q * NR;
            const OutT* bq = bias_g ? bias_g + q * NR : nullptr;
            if constexpr (std::is_same_v<T, OutT>) {
              if (stream) {
                ks.store_rows(c, mr, nvq, oq, ldc, bq);
                continue;
              }
            } else if constexpr (std::is_same_v<OutT, at::BFloat16>) {
              if (ks.isa == Isa::kAvx512) {  // else store_tile: the same roundings, one at a time
                store_rows_bf16(c, NR, mr, nvq, reinterpret_cast<uint16_t*>(oq), ldc,
                                reinterpret_cast<const uint16_t*>(bq));
                continue;
              }
            }
            store_tile(c, mr, NR, nvq, oq, ldc, bq);
          }
        }
      };
      for_each_group<T>(p0, p1, std::get<2>(range), std::get<3>(range), st.segs, group);
    }
    if (stream) store_fence();
  });
}

// ------------------------------------------------------------------------------ narrow blocks
// Blocks much narrower than a register tile's NR columns (the tight blocks of a layer with 1-4
// input or output channels: one pixel's channels per side) would leave most of every tile idle
// if taken one block at a time, so each op groups them:
// * forward (BR <= NR / 2) and grad_input (BC <= NR / 2): G = NR / side consecutive block rows
//   (columns) side by side in one output panel, over the union of their blocks (neighbouring
//   pixels share most of their receptive fields);
// * grad_weight (BC <= max(4, NR / 4), narrow_grad_weight): the x columns of a block row's
//   consecutive blocks gathered into dense panels.
// Each output entry is still one chain of multiply-adds in an order fixed by the layout.

// Whether grad_weight gathers blocks of BC columns (grad_weight_narrow_kernel) for tiles NR
// wide. Gathering costs a pass over x per run of blocks; it paid off (paired runs, 2026-12-01)
// for few-channel blocks (BC <= 4) on every ISA and for BC = 8 on 32-wide tiles, not for BC = 8
// on 16-wide tiles nor BC = 16 on 32-wide ones (there, half-empty tiles are faster).
bool narrow_grad_weight(int64_t BC, int NR) { return BC <= std::max<int64_t>(4, NR / 4) && BC < NR; }

// ap[t][b][m] = dy[b][i*BR + t*MR + m] (zero past the block row's in-range rows): block row
// i of dy as cdiv(BR, MR) A panels of B rows each, MR the active tile height.
template <typename T>
void pack_dy_row(const T* dy, int64_t B, int64_t M, int64_t i, int64_t BR, int MR, T* ap) {
  const int64_t ntr = cdiv(BR, MR), rows = std::min(BR, M - i * BR), full = rows / MR;
  for (int64_t b = 0; b < B; ++b) {
    const T* src = dy + b * M + i * BR;
    T* dst = ap + b * MR;
    int64_t t = 0;
    for (; t < full; ++t)
      for (int m = 0; m < MR; ++m) dst[t * B * MR + m] = src[t * MR + m];
    for (; t < ntr; ++t)
      for (int m = 0; m < MR; ++m) dst[t * B * MR + m] = t * MR + m < rows ? src[t * MR + m] : T(0);
  }
}

// The bias gradient db[m] = sum over b of dy[b][m], summed in blocks of kSumRows rows (each block
// in row order, then the blocks in order): the same bits whether it is fused into the pass that
// packs dy (pack_dy_panels) or computed on its own (bias_grad), on any thread count.
constexpr int64_t kSumRows = 16;

template <typename T>
struct BiasSums {
  std::vector<T> partial;  // [block][ld], zero-initialised
  int64_t ld;
  BiasSums(int64_t B, int64_t ld_) : partial(cdiv(B, kSumRows) * ld_, T(0)), ld(ld_) {}
  static int64_t blocks(int64_t B) { return cdiv(B, kSumRows); }
  T* block(int64_t q) { return partial.empty() ? nullptr : partial.data() + q * ld; }
  void finish(int64_t M, T* db) const {
    const int64_t nq = static_cast<int64_t>(partial.size()) / ld;
    at::parallel_for(0, M, grain_for(nq), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) db[m] = T(0);
      for (int64_t q = 0; q < nq; ++q)
        for (int64_t m = m0; m < m1; ++m) db[m] += partial[q * ld + m];
    });
  }
};

// db = the bias gradient of dy [B, M] (S: dy's element type, T: the sums').
template <typename T, typename S>
void bias_grad(const S* dy, int64_t B, int64_t M, T* db) {
  BiasSums<T> sums(B, M);
  at::parallel_for(0, sums.blocks(B), grain_for(kSumRows * M), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      T* p = sums.block(q);
      for (int64_t b = q * kSumRows; b < std::min(B, (q + 1) * kSumRows); ++b)
        for (int64_t m = 0; m < M; ++m) p[m] += static_cast<T>(dy[b * M + m]);
    }
  });
  sums.finish(M, db);
}

// bias_grad of a dy tensor of any floating dtype (float32 sums for half types), in dy's dtype.
at::Tensor bias_grad_of(const at::Tensor& dy) {
  const int64_t B = dy.size(0), M = dy.size(1);
  if (is_half(dy.scalar_type())) {
    at::Tensor sums = at::empty({M}, dy.options().dtype(at::kFloat));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dy.scalar_type(), "bias_grad", [&] {
      bias_grad(dy.data_ptr<scalar_t>(), B, M, sums.data_ptr<float>());
    });
    return sums.to(dy.scalar_type());
  }
  at::Tensor db = at::empty({M}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bias_grad", [&] {
    bias_grad(dy.data_ptr<scalar_t>(), B, M, db.data_ptr<scalar_t>());
  });
  return db;
}

// dy's block rows as grad_weight's A panels, all at once: block row i's at dyp + i * ntr * B * MR
// (as pack_dy_row would lay them out), by one pass that reads each row of dy in order: where
// the ISA has it (Kernels::pack_chunks) and BR is a multiple of the tile height. Otherwise an
// undefined tensor, and the kernels pack each block row as they reach it (pack_dy_row: a
// gather of B rows M apart, slow where they alias in the caches).
// Where db is not null, the same pass also leaves the bias gradient there (BiasSums).
template <typename T>
at::Tensor pack_dy_panels(const Kernels<T>& ks, const T* dy, int64_t B, int64_t M, int64_t BR, T* db) {
  const int MR = ks.mr;
  if (!ks.pack_chunks || BR % MR != 0 || B == 0) return {};
  const int64_t nchunks = cdiv(M, BR) * (BR / MR);
  at::Tensor t = pooled_empty({nchunks * B * MR}, c10::CppTypeToScalarType<T>::value);
  T* d = t.data_ptr<T>();
  BiasSums<T> sums(db ? B : 0, nchunks * MR);
  at::parallel_for(0, sums.blocks(B), grain_for(kSumRows * M), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      ks.pack_chunks(dy, M, B, M, nchunks, d, q * kSumRows, std::min(B, (q + 1) * kSumRows), sums.block(q));
    store_fence();
  });
  if (db) sums.finish(M, db);
  return t;
}

// forward for 2 * BR <= NR, grad_input for 2 * BC <= NR: output slices of G = NR / S
// consecutive narrow block lines (S = BR: block rows of y; S = BC: block columns of dx). A
// slice's K entries are the union of its lines' blocks' other coordinates (block columns of x,
// block rows of dy), ascending: a k-way merge of the lines' index lists, which visits each block
// exactly once even if a list were unsorted. Entry u is K block ukey[u], with ublk[u*G + d] the
// position (in ptr/idx order) of line d's block there, or -1. Block position p holds values
// w[perm[p]] (perm null: p); its element (k, n) sits at k*sk + n*sn.
template <typename T, typename OutT>
void narrow_slice_gemm(const Kernels<T>& ks, const T* a, int64_t B, int64_t F, OutT* out, int64_t out_cols,
                       const OutT* bias, const int32_t* ptr, const int32_t* idx, const int32_t* perm, const T* w,
                       int64_t S, int64_t KS, int64_t sk, int64_t sn) {
  const int NR = ks.nr;
  const int64_t G = NR / S, n_lines = cdiv(out_cols, S), ng = cdiv(n_lines, G), blk = S * KS;
  std::vector<int64_t> uptr(ng + 1, 0), ukey, pos(G), end(G);
  std::vector<int32_t> ublk;
  ukey.reserve(ptr[n_lines]);
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t l0 = g * G, nd = std::min(G, n_lines - l0);
    for (int64_t d = 0; d < G; ++d) pos[d] = end[d] = 0;
    for (int64_t d = 0; d < nd; ++d) pos[d] = ptr[l0 + d], end[d] = ptr[l0 + d + 1];
    for (;;) {
      int64_t key = -1;
      for (int64_t d = 0; d < nd; ++d)
        if (pos[d] < end[d] && (key < 0 || idx[pos[d]] < key)) key = idx[pos[d]];
      if (key < 0) break;
      ukey.push_back(key);
      for (int64_t d = 0; d < G; ++d)
        ublk.push_back(pos[d] < end[d] && idx[pos[d]] == key ? static_cast<int32_t>(pos[d]++) : -1);
    }
    uptr[g + 1] = static_cast<int64_t>(ukey.size());
  }
  auto extent = [&](int64_t u) { return std::min(KS, F - ukey[u] * KS); };
  auto make = [&](int64_t u, int64_t k0, int64_t len) { return Seg<T>{ukey[u] * KS + k0, nullptr, len, u}; };
  auto blocks = [&](int64_t g) { return std::make_tuple(uptr[g], uptr[g + 1], extent, make); };
  // B[k][d*S + n] = element (k, n) of line d's block at the entry (zero if none), columns past
  // nv zero; one panel (G * S <= NR).
  auto pack_b = [&](const std::vector<Seg<T>>& sg, int64_t, int64_t nv, int64_t, T* bp) {
    for (const Seg<T>& s : sg) {
      const int64_t k0 = s.a_off - ukey[s.item] * KS;
      std::fill(bp, bp + s.k * NR, T(0));
      for (int64_t d = 0; d < G; ++d) {
        const int32_t p = ublk[s.item * G + d];
        const int64_t cols = std::min(S, nv - d * S);
        if (p < 0 || cols <= 0) continue;
        const T* src = w + (perm ? perm[p] : p) * blk + k0 * sk;
        T* dst = bp + d * S;
        for (int64_t k = 0; k < s.k; ++k, src += sk, dst += NR)
          for (int64_t n = 0; n < cols; ++n) dst[n] = src[n * sn];
      }
      bp += s.k * NR;
    }
  };
  // the next slice's blocks: those of its G lines, contiguous in ptr/idx order
  auto lines = [&](int64_t g, int64_t part, int64_t nparts, std::vector<LineRange>& out_lines) {
    const int64_t q0 = ptr[g * G], q1 = ptr[std::min(n_lines, (g + 1) * G)];
    lines_part(q1 - q0, blk * int64_t{sizeof(T)}, [&](int64_t b) { return w + (perm ? perm[q0 + b] : q0 + b) * blk; },
               part, nparts, out_lines);
  };
  slice_gemm<T, OutT>(ks, a, B, F, out, out_cols, ng, G * S, out_cols, bias, B * ptr[n_lines] * blk, blocks, pack_b,
                lines);
}

// grad_weight for narrow_grad_weight(BC, NR): a task is a run of consecutive stored blocks of one block row
// (at most kRunCols gathered columns); their x columns are gathered into dense panels
// xg[q][b][n] = x[b][column q*NR + n of the run], so each [BR x B] @ [B x NR] product fills
// whole tiles, whose entries are then scattered to their blocks.
template <typename T>
void grad_weight_narrow_kernel(const Kernels<T>& ks, const T* dy, const T* x, const int32_t* row, const int32_t* col,
                               const int32_t* mask_ids, const bool* patterns, T* dw, int64_t nnzb, int64_t B,
                               int64_t M, int64_t N, int64_t BR, int64_t BC, T* db) {
  const int NR = ks.nr, MR = ks.mr;
  const int64_t kRunCols = 8 * NR;
  if (nnzb == 0) {
    if (db) bias_grad(dy, B, M, db);
    return;
  }
  const int64_t ntr = cdiv(BR, MR), blk = BR * BC, per_run = std::max<int64_t>(1, kRunCols / BC);
  std::vector<int64_t> runs{0};  // task r: blocks [runs[r], runs[r+1])
  for (int64_t p = 1; p <= nnzb; ++p)
    if (p == nnzb || row[p] != row[runs.back()] || p - runs.back() == per_run) runs.push_back(p);
  const int64_t zero = 0, max_cols = cdiv(per_run * BC, NR) * NR;
  const at::Tensor dyp_t = pack_dy_panels(ks, dy, B, M, BR, db);
  const T* dyp = dyp_t.defined() ? dyp_t.data_ptr<T>() : nullptr;
  if (db && !dyp) bias_grad(dy, B, M, db);
  struct Scratch {
    std::vector<T> apack, xg;
    std::vector<int64_t> src;  // x column of each gathered column, -1: zero
    int64_t row;               // block row held in apack, -1: none
  };
  auto init = [&] { return Scratch{std::vector<T>(dyp ? 0 : ntr * B * MR), std::vector<T>(max_cols * B),
                                   std::vector<int64_t>(max_cols), -1}; };
  parallel_dynamic(static_cast<int64_t>(runs.size()) - 1, nnzb * B * blk, init,
                   [&](Scratch& st, int64_t r0, int64_t r1) {
    alignas(64) T tile[kMaxTileBytes / sizeof(T)];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p0 = runs[r], p1 = runs[r + 1], i = row[p0], L = (p1 - p0) * BC, nqr = cdiv(L, NR);
      if (!dyp && i != st.row) {
        pack_dy_row(dy, B, M, i, BR, MR, st.apack.data());
        st.row = i;
      }
      const T* ap = dyp ? dyp + i * ntr * B * MR : st.apack.data();
      for (int64_t c = 0; c < nqr * NR; ++c) {
        const int64_t n = c < L ? col[p0 + c / BC] * BC + c % BC : N;
        st.src[c] = n < N ? n : -1;
      }
      for (int64_t q = 0; q < nqr; ++q) {
        const int64_t* sc = st.src.data() + q * NR;
        T* dst = st.xg.data() + q * B * NR;
        for (int64_t b = 0; b < B; ++b, dst += NR) {
          const T* xb = x + b * N;
          for (int n = 0; n < NR; ++n) dst[n] = sc[n] >= 0 ? xb[sc[n]] : T(0);
        }
      }
      for (int64_t t = 0; t < ntr; ++t) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, BR - t * MR));
        for (int64_t q = 0; q < nqr; ++q) {
          // nothing to prefetch: the gathered panels were just written and sit in cache
          ks.tile[mr](ap + t * B * MR, &zero, &B, 1, st.xg.data() + q * B * NR, tile, false, Prefetch<T>{});
          for (int64_t n = 0, nv = std::min<int64_t>(NR, L - q * NR); n < nv; ++n) {
            const int64_t c = q * NR + n, p = p0 + c / BC, off = (t * MR) * BC + c % BC;
            const bool* mk = patterns ? patterns + mask_ids[p] * blk + off : nullptr;
            T* out = dw + p * blk + off;
            for (int m = 0; m < mr; ++m)
              out[m * BC] = (mk && !mk[m * BC]) ? T(0) : tile[m * NR + n];  // exactly 0, even for NaN inputs
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------ forward
// Batches up to this size run the forward as matrix-vector products where the ISA has them
// (Kernels::gemv): memory-bound, the weights are read once and not transposed into panels.
constexpr int64_t kGemvBatch = 2;

// y = x W^T + bias by gemv(w_segments, x_segments, len, nseg, rows, ldw, out) per block row and
// sample. WT: the weights' element type; OutT: y's and bias's (uint16_t: bfloat16 bits, each
// output rounded once from its float sum plus the widened bias).
template <typename T, typename WT, typename OutT, typename Gemv>
void forward_gemv(Gemv gemv, const T* x, const WT* w, const OutT* bias, const int32_t* crow, const int32_t* col,
                  OutT* y, int64_t B, int64_t N, int64_t M, int64_t BR, int64_t BC) {
  constexpr bool kBf16Out = std::is_same_v<OutT, uint16_t>;
  auto in = [](OutT v) -> T {
    if constexpr (kBf16Out) return widen_bf16(v); else return v;
  };
  auto out = [](T v) -> OutT {
    if constexpr (kBf16Out) return bf16_bits_of(v); else return v;
  };
  const int64_t nbr = cdiv(M, BR);
  struct Scratch {
    std::vector<const WT*> ws;
    std::vector<const T*> xs;
    std::vector<int64_t> len;
    std::vector<T> out;
  };
  auto init = [&] { return Scratch{{}, {}, {}, std::vector<T>(BR)}; };
  parallel_dynamic(nbr, B * crow[nbr] * BR * BC, init, [&](Scratch& st, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t rows = std::min(BR, M - i * BR), p0 = crow[i], p1 = crow[i + 1];
      st.ws.resize(p1 - p0);
      st.xs.resize(p1 - p0);
      st.len.resize(p1 - p0);
      for (int64_t p = p0; p < p1; ++p) {
        st.ws[p - p0] = w + p * BR * BC;
        st.len[p - p0] = std::min(BC, N - col[p] * BC);
      }
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t p = p0; p < p1; ++p) st.xs[p - p0] = x + b * N + col[p] * BC;
        OutT* o = y + b * M + i * BR;
        if (p1 > p0) {
          gemv(st.ws.data(), st.xs.data(), st.len.data(), static_cast<int>(p1 - p0), rows, BC, st.out.data());
          for (int64_t r = 0; r < rows; ++r) o[r] = out(bias ? st.out[r] + in(bias[i * BR + r]) : st.out[r]);
        } else {
          for (int64_t r = 0; r < rows; ++r) o[r] = bias ? bias[i * BR + r] : out(T(0));
        }
      }
    }
  });
}

// y = x W^T + bias with the kernels ks. OutT != T: the bf16 pair kernels, x and w viewed as
// 32-bit words (N and BC counted in words: pairs of bfloat16 along K), y and bias bfloat16.
template <typename T, typename OutT = T>
void forward_kernel(const Kernels<T>& ks, const T* x, const T* w, const OutT* bias, const int32_t* crow,
                    const int32_t* col, OutT* y, int64_t B, int64_t N, int64_t M, int64_t BR, int64_t BC) {
  // gemv first, narrow blocks included: at batch <= 2 the forward is bound by reading the
  // weights, which gemv does once in place; the narrow path would copy them all into panels
  // to fill tile columns whose rows (the batch) are mostly empty anyway.
  if constexpr (std::is_same_v<T, OutT>) {
    if (B <= kGemvBatch && ks.gemv) return forward_gemv<T, T, T>(ks.gemv, x, w, bias, crow, col, y, B, N, M, BR, BC);
  }
  const int NR = ks.nr;
  if (2 * BR <= NR)
    return narrow_slice_gemm<T, OutT>(ks, x, B, N, y, M, bias, crow, col, nullptr, w, BR, BC, 1, BC);
  auto extent = [=](int64_t p) { return std::min(BC, N - col[p] * BC); };
  auto make = [=](int64_t p, int64_t k0, int64_t k) { return Seg<T>{col[p] * BC + k0, w + p * BR * BC + k0, k}; };
  auto blocks = [=](int64_t i) { return std::make_tuple(int64_t{crow[i]}, int64_t{crow[i + 1]}, extent, make); };
  // B[k][n] = W[q*NR + n][k]: the group's blocks transposed, rows past nv zero.
  auto pack_b = [=, &ks](const std::vector<Seg<T>>& sg, int64_t, int64_t nv, int64_t q, T* bp) {
    for (const Seg<T>& sgm : sg) {
      ks.pack_transposed(sgm.w + q * NR * BC, BC, std::min<int64_t>(NR, nv - q * NR), sgm.k, bp);
      bp += sgm.k * NR;
    }
  };
  auto lines = [=](int64_t i, int64_t part, int64_t nparts, std::vector<LineRange>& out) {  // contiguous
    const T* first = w + int64_t{crow[i]} * BR * BC;
    lines_part(1, (int64_t{crow[i + 1]} - crow[i]) * BR * BC * int64_t{sizeof(T)}, [=](int64_t) { return first; },
               part, nparts, out);
  };
  slice_gemm<T, OutT>(ks, x, B, N, y, M, cdiv(M, BR), BR, M, bias, B * crow[cdiv(M, BR)] * BR * BC, blocks, pack_b,
                      lines);
}

// ------------------------------------------------------------------------------ grad_input
template <typename T>
void grad_input_kernel(const T* dy, const T* w, const int32_t* ccol, const int32_t* t_row, const int32_t* t_perm,
                       T* dx, int64_t B, int64_t M, int64_t N, int64_t BR, int64_t BC) {
  const Kernels<T>& ks = active_kernels<T>();
  const int NR = ks.nr;
  if (2 * BC <= NR)
    return narrow_slice_gemm<T, T>(ks, dy, B, M, dx, N, nullptr, ccol, t_row, t_perm, w, BC, BR, BC, 1);
  auto extent = [=](int64_t k) { return std::min(BR, M - t_row[k] * BR); };
  auto make = [=](int64_t k, int64_t r0, int64_t len) {
    return Seg<T>{t_row[k] * BR + r0, w + t_perm[k] * BR * BC + r0 * BC, len};
  };
  auto blocks = [=](int64_t j) { return std::make_tuple(int64_t{ccol[j]}, int64_t{ccol[j + 1]}, extent, make); };
  // B[k][n] = W[k][q*NR + n]: rows of the group's blocks, columns past nv zero.
  auto pack_b = [=, &ks](const std::vector<Seg<T>>& sg, int64_t, int64_t nv, int64_t q, T* bp) {
    for (const Seg<T>& sgm : sg) {
      ks.pack_copy(sgm.w + q * NR, BC, sgm.k, std::min<int64_t>(NR, nv - q * NR), bp, false);
      bp += sgm.k * NR;
    }
  };
  auto lines = [=](int64_t j, int64_t part, int64_t nparts, std::vector<LineRange>& out) {
    lines_part(ccol[j + 1] - ccol[j], BR * BC * int64_t{sizeof(T)},
               [=](int64_t b) { return w + t_perm[ccol[j] + b] * BR * BC; }, part, nparts, out);
  };
  slice_gemm<T, T>(ks, dy, B, M, dx, N, cdiv(N, BC), BC, N, nullptr, B * ccol[cdiv(N, BC)] * BR * BC, blocks, pack_b,
                lines);
}

// ------------------------------------------------------------------------------ grad_weight
// x is packed once into per-block-column panels X[j][q][b][n] = x[b][j*BC + q*NR + n] (each is
// read by every block of its column), dy per block row into a thread's A[t][b][m] =
// dy[b][i*BR + t*MR + m] (zero out of range); then each stored block is a [BR x B] @ [B x BC]
// product over those panels. dW is written with streaming stores: it is not read back here (where
// no mask applies, straight from the registers: Kernels::tile_stream).
// Where db is not null, also the bias gradient (BiasSums), fused into the pass over dy where
// pack_dy_panels runs.
// Bf16Out (T float only): dW rounded to bfloat16 as each tile is stored, into dw16 (bfloat16)
// in place of dw, or (round) widened back into dw.
struct Bf16Out {
  uint16_t* dw16 = nullptr;
  bool round = false;
};

template <typename T>
void grad_weight_kernel(const T* dy, const T* x, const int32_t* row, const int32_t* col, const int32_t* mask_ids,
                        const bool* patterns, T* dw, int64_t nnzb, int64_t B, int64_t M, int64_t N, int64_t BR,
                        int64_t BC, T* db, Bf16Out bf = {}) {
  const Kernels<T>& ks = active_kernels<T>();
  const int NR = ks.nr, MR = ks.mr;
  if (narrow_grad_weight(BC, NR))
    return grad_weight_narrow_kernel(ks, dy, x, row, col, mask_ids, patterns, dw, nnzb, B, M, N, BR, BC, db);
  const int64_t ntr = cdiv(BR, MR), nq = cdiv(BC, NR), blk = BR * BC, nbc = cdiv(N, BC);
  at::Tensor x_t = pooled_empty({nbc * nq * B * NR}, c10::CppTypeToScalarType<T>::value);
  T* xp = x_t.data_ptr<T>();
  const bool stream = x_t.numel() * int64_t{sizeof(T)} >= kStreamBytes;
  constexpr int64_t kRows = 16;  // batch rows at a time: kRows sequential read streams, whole-line writes
  at::parallel_for(0, cdiv(B, kRows), grain_for(kRows * N), [&](int64_t c0, int64_t c1) {
    for (int64_t b0 = c0 * kRows; b0 < std::min(B, c1 * kRows); b0 += kRows) {
      const int64_t b1 = std::min(B, b0 + kRows);
      for (int64_t j = 0; j < nbc; ++j) {
        const int64_t cols = std::min(BC, N - j * BC);
        for (int64_t q = 0; q < nq; ++q)
          ks.pack_copy(x + b0 * N + j * BC + q * NR, N, b1 - b0, std::min<int64_t>(NR, cols - q * NR),
                       xp + ((j * nq + q) * B + b0) * NR, stream);
      }
    }
    if (stream) store_fence();
  });
  const int64_t zero = 0;
  const at::Tensor dyp_t = pack_dy_panels(ks, dy, B, M, BR, db);
  const T* dyp = dyp_t.defined() ? dyp_t.data_ptr<T>() : nullptr;
  if (db && !dyp) bias_grad(dy, B, M, db);
  // the lines of a block column's x panels and a block row's dy panels, cut into one part per
  // product of a block (its prefetches: the next block's panels, over this block's products)
  std::vector<int64_t> xcut(ntr * nq + 1), acut(ntr * nq + 1);
  for (int64_t k = 0; k <= ntr * nq; ++k) {
    xcut[k] = cdiv(nq * B * NR * int64_t{sizeof(T)}, 64) * k / (ntr * nq);
    acut[k] = cdiv(ntr * B * MR * int64_t{sizeof(T)}, 64) * k / (ntr * nq);
  }
  // products streamed from the registers straight into dW: no mask to apply, float32 out, whole
  // aligned lines (BC a multiple of NR: rows and tiles start on 128-byte boundaries of dw)
  const bool direct = ks.tile_stream[1] && !patterns && dw && !bf.round && BC % NR == 0 &&
                      reinterpret_cast<uintptr_t>(dw) % 64 == 0;
  struct Scratch {
    std::vector<T> apack;
    int64_t row;  // block row held in apack, -1: none
    std::vector<LineRange> pf;
  };
  auto init = [&] { return Scratch{std::vector<T>(dyp ? 0 : ntr * B * MR), -1, {}}; };
  parallel_dynamic(nnzb, nnzb * B * blk, init, [&](Scratch& st, int64_t p0, int64_t p1) {
    alignas(64) T tile[kMaxTileBytes / sizeof(T)];
    const T* ap = st.apack.data();
    // without dyp: dy of the next block row of this range, prefetched over the current row's
    // products (its B rows are M apart, a gather whose memory latency would otherwise stall the
    // packing)
    int64_t pf_row = -1, pf_part = 0, pf_parts = 1;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = row[p], j = col[p];
      if (dyp) {
        ap = dyp + i * ntr * B * MR;
      } else if (i != st.row) {
        pack_dy_row(dy, B, M, i, BR, MR, st.apack.data());
        st.row = i;
        int64_t next = p + 1;
        while (next < p1 && row[next] == i) ++next;
        pf_row = next < p1 ? row[next] : -1;
        pf_part = 0;
        pf_parts = (next - p) * ntr * nq;
      }
      const bool* mask = patterns ? patterns + mask_ids[p] * blk : nullptr;
      T* out = dw ? dw + p * blk : nullptr;  // null: bfloat16 out (Bf16Out)
      for (int64_t t = 0; t < ntr; ++t) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, BR - t * MR));
        for (int64_t q = 0; q < nq; ++q) {
          st.pf.clear();
          if (pf_row >= 0)
            lines_part(B, std::min(BR, M - pf_row * BR) * int64_t{sizeof(T)},
                       [=](int64_t b) { return dy + b * M + pf_row * BR; }, pf_part++, pf_parts, st.pf);
          if (dyp && p + 1 < p1) {  // the next block's panels, over this block's products
            const int64_t part = t * nq + q;
            const char* xn = reinterpret_cast<const char*>(xp + col[p + 1] * nq * B * NR);
            st.pf.push_back({xn + xcut[part] * 64, xcut[part + 1] - xcut[part]});
            if (row[p + 1] != i) {
              const char* an = reinterpret_cast<const char*>(dyp + row[p + 1] * ntr * B * MR);
              st.pf.push_back({an + acut[part] * 64, acut[part + 1] - acut[part]});
            }
          }
          const Prefetch<T> pf{nullptr, st.pf.data(), static_cast<int>(st.pf.size())};
          if (direct) {
            ks.tile_stream[mr](ap + t * B * MR, B, xp + (j * nq + q) * B * NR, out + t * MR * BC + q * NR, BC, pf);
            continue;
          }
          ks.tile[mr](ap + t * B * MR, &zero, &B, 1, xp + (j * nq + q) * B * NR, tile, false, pf);
          const int64_t nv = std::min<int64_t>(NR, BC - q * NR);
          if (mask) {
            for (int m = 0; m < mr; ++m) {
              const bool* mk = mask + (t * MR + m) * BC + q * NR;
              for (int64_t n = 0; n < nv; ++n)
                if (!mk[n]) tile[m * NR + n] = T(0);  // exactly 0, even for NaN inputs
            }
          }
          if constexpr (std::is_same_v<T, float>) {
            const int64_t off = p * blk + t * MR * BC + q * NR;
            if (bf.dw16 && ks.isa == Isa::kAvx512) {
              store_rows_bf16(tile, NR, mr, nv, bf.dw16 + off, BC, nullptr);
              continue;
            }
            if (bf.dw16) {
              for (int m = 0; m < mr; ++m)
                for (int64_t n = 0; n < nv; ++n) bf.dw16[off + m * BC + n] = bf16_bits_of(tile[m * NR + n]);
              continue;
            }
            if (bf.round) to_f32_rows(tile, NR, mr, nv, tile, NR);  // in place
          }
          ks.store_rows(tile, mr, nv, out + t * MR * BC + q * NR, BC, nullptr);
        }
      }
    }
    store_fence();
  });
}

// ------------------------------------------------------------------------------ ops
// The values of a bfloat16 op as the float32 kernels read them: bfloat16 bits widened, or float32
// master values rounded to bfloat16 (autocast).
struct Bf16Values {
  const float* f32 = nullptr;
  const uint16_t* b16 = nullptr;
  const char* bytes;
  int64_t esize;
  explicit Bf16Values(const at::Tensor& v)
      : bytes(reinterpret_cast<const char*>(v.data_ptr())), esize(v.element_size()) {
    if (v.scalar_type() == at::kFloat) f32 = v.data_ptr<float>();
    else b16 = reinterpret_cast<const uint16_t*>(v.data_ptr());
  }
  // to_f32_rows of the values from element offset off
  void rows(int64_t off, int64_t ld, int64_t rows, int64_t cols, float* dst, int64_t ldd) const {
    if (f32) to_f32_rows(f32 + off, ld, rows, cols, dst, ldd);
    else to_f32_rows(b16 + off, ld, rows, cols, dst, ldd);
  }
  const char* block(int64_t p, int64_t blk) const { return bytes + p * blk * esize; }
};

// The bfloat16 forward on the float32 kernels: x widened into the batch tiles, the values
// (bfloat16, or float32 master values rounded to bfloat16) widened into the B panels, y rounded
// once: bit for bit the float32 forward of the widened copies, rounded. Blocks that fill a tile,
// batches past the gemv ones; nullopt otherwise.
std::optional<at::Tensor> forward_bf16_f32(const at::Tensor& x, const at::Tensor& values,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& crow_ptr,
                                           const at::Tensor& col_idx, int64_t M) {
  const Kernels<float>& ks = active_kernels<float>();
  const int64_t B = x.size(0), N = x.size(1), BR = values.size(1), BC = values.size(2);
  const Bf16Values w(values);
  const int32_t *crow = crow_ptr.data_ptr<int32_t>(), *col = col_idx.data_ptr<int32_t>();
  if (B <= kGemvBatch && ks.gemv) {  // the weights read once, as bfloat16, by the float gemv's chains
    at::Tensor xf = at::empty({B, N}, x.options().dtype(at::kFloat));
    to_f32_rows(reinterpret_cast<const uint16_t*>(x.data_ptr()), N, B, N, xf.data_ptr<float>(), N);
    at::Tensor y = pooled_empty({B, M}, at::kBFloat16);
    const uint16_t* b16 = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->data_ptr()) : nullptr;
    auto* y16 = reinterpret_cast<uint16_t*>(y.data_ptr());
    const float* xp = xf.data_ptr<float>();
    // gemv_bf16 of float32 or bfloat16 weights, whichever the values hold
    const auto gemv = [](auto ws, const float* const* xs, const int64_t* len, int nseg, int64_t rows, int64_t ldw,
                         float* out) { gemv_bf16(ws, xs, len, nseg, rows, ldw, out); };
    if (w.f32)
      forward_gemv(gemv, xp, w.f32, b16, crow, col, y16, B, N, M, BR, BC);
    else
      forward_gemv(gemv, xp, w.b16, b16, crow, col, y16, B, N, M, BR, BC);
    return y;
  }
  if (2 * BR <= ks.nr) return std::nullopt;
  const int NR = ks.nr;
  const int64_t blk = BR * BC;
  at::Tensor y = pooled_empty({B, M}, at::kBFloat16);
  auto extent = [=](int64_t p) { return std::min(BC, N - col[p] * BC); };
  auto make = [=](int64_t p, int64_t k0, int64_t k) { return Seg<float>{col[p] * BC + k0, nullptr, k, p * blk + k0}; };
  auto blocks = [=](int64_t i) { return std::make_tuple(int64_t{crow[i]}, int64_t{crow[i + 1]}, extent, make); };
  auto pack_b = [=, &ks](const std::vector<Seg<float>>& sg, int64_t, int64_t nv, int64_t q, float* bp) {
    thread_local std::vector<float> buf;
    buf.resize(NR * kKMax);
    const int64_t rows = std::min<int64_t>(NR, nv - q * NR);
    for (const Seg<float>& sgm : sg) {
      w.rows(sgm.item + q * NR * BC, BC, rows, sgm.k, buf.data(), sgm.k);
      ks.pack_transposed(buf.data(), sgm.k, rows, sgm.k, bp);
      bp += sgm.k * NR;
    }
  };
  auto lines = [=](int64_t i, int64_t part, int64_t nparts, std::vector<LineRange>& out) {  // contiguous
    const char* first = w.block(crow[i], blk);
    lines_part(1, (int64_t{crow[i + 1]} - crow[i]) * blk * w.esize, [=](int64_t) { return first; }, part, nparts, out);
  };
  slice_gemm<float, at::BFloat16>(ks, nullptr, B, N, y.data_ptr<at::BFloat16>(), M, cdiv(M, BR), BR, M,
                                  bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr,
                                  B * crow[cdiv(M, BR)] * blk, blocks, pack_b, lines,
                                  reinterpret_cast<const uint16_t*>(x.data_ptr()));
  return y;
}

// The bfloat16 grad_input on the float32 kernels (as forward_bf16_f32): dy widened into the
// batch tiles, the blocks' rows widened (or rounded, for float32 values) into the B panels.
// Blocks wider than half a tile; nullopt otherwise.
std::optional<at::Tensor> grad_input_bf16_f32(const at::Tensor& dy, const at::Tensor& values,
                                              const at::Tensor& ccol_ptr, const at::Tensor& t_row_idx,
                                              const at::Tensor& t_perm, int64_t N) {
  const Kernels<float>& ks = active_kernels<float>();
  const int64_t B = dy.size(0), M = dy.size(1), BR = values.size(1), BC = values.size(2);
  if (2 * BC <= ks.nr) return std::nullopt;
  const int NR = ks.nr;
  const int64_t blk = BR * BC;
  const int32_t *ccol = ccol_ptr.data_ptr<int32_t>(), *t_row = t_row_idx.data_ptr<int32_t>(),
                *perm = t_perm.data_ptr<int32_t>();
  const Bf16Values w(values);
  at::Tensor dx = pooled_empty({B, N}, at::kBFloat16);
  auto extent = [=](int64_t k) { return std::min(BR, M - t_row[k] * BR); };
  auto make = [=](int64_t k, int64_t r0, int64_t len) {
    return Seg<float>{t_row[k] * BR + r0, nullptr, len, perm[k] * blk + r0 * BC};
  };
  auto blocks = [=](int64_t j) { return std::make_tuple(int64_t{ccol[j]}, int64_t{ccol[j + 1]}, extent, make); };
  auto pack_b = [=, &ks](const std::vector<Seg<float>>& sg, int64_t, int64_t nv, int64_t q, float* bp) {
    thread_local std::vector<float> buf;
    buf.resize(kKMax * NR);
    const int64_t cols = std::min<int64_t>(NR, nv - q * NR);
    for (const Seg<float>& sgm : sg) {
      w.rows(sgm.item + q * NR, BC, sgm.k, cols, buf.data(), NR);
      ks.pack_copy(buf.data(), NR, sgm.k, cols, bp, false);
      bp += sgm.k * NR;
    }
  };
  auto lines = [=](int64_t j, int64_t part, int64_t nparts, std::vector<LineRange>& out) {
    lines_part(ccol[j + 1] - ccol[j], blk * w.esize, [=](int64_t b) { return w.block(perm[ccol[j] + b], blk); }, part,
               nparts, out);
  };
  slice_gemm<float, at::BFloat16>(ks, nullptr, B, M, dx.data_ptr<at::BFloat16>(), N, cdiv(N, BC), BC, N, nullptr,
                                  B * ccol[cdiv(N, BC)] * blk, blocks, pack_b, lines,
                                  reinterpret_cast<const uint16_t*>(dy.data_ptr()));
  return dx;
}

// The bfloat16 grad_weight on the float32 kernels: dy and x widened into float32 buffers (one
// pass each), dW rounded once to bfloat16 as each tile is stored, as bfloat16 or widened to
// float32 (dw_dtype); db summed in float32 from the widened dy (the bits of bias_grad_of).
// Blocks as wide as the float32 kernel's wide path; nullopt otherwise.
std::optional<at::Tensor> grad_weight_bf16_f32(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx,
                                               const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                                               const std::optional<at::Tensor>& mask_patterns, int64_t BR, int64_t BC,
                                               at::ScalarType dw_dtype, at::Tensor* db) {
  const Kernels<float>& ks = active_kernels<float>();
  if (narrow_grad_weight(BC, ks.nr)) return std::nullopt;
  const int64_t B = dy.size(0), M = dy.size(1), N = x.size(1), nnzb = row_idx.numel();
  at::Tensor dy32 = pooled_empty({B, M}, at::kFloat), x32 = pooled_empty({B, N}, at::kFloat);
  const uint16_t *dy16 = reinterpret_cast<const uint16_t*>(dy.data_ptr()),
                 *x16 = reinterpret_cast<const uint16_t*>(x.data_ptr());
  float *dyf = dy32.data_ptr<float>(), *xf = x32.data_ptr<float>();
  at::parallel_for(0, B, grain_for(M + N), [&](int64_t b0, int64_t b1) {
    to_f32_rows(dy16 + b0 * M, M, b1 - b0, M, dyf + b0 * M, M);
    to_f32_rows(x16 + b0 * N, N, b1 - b0, N, xf + b0 * N, N);
  });
  at::Tensor dw = pooled_empty({nnzb, BR, BC}, dw_dtype);
  at::Tensor db_f = db ? at::empty({M}, dy.options().dtype(at::kFloat)) : at::Tensor();
  const bool widen = dw_dtype == at::kFloat;
  grad_weight_kernel<float>(dyf, xf, row_idx.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                            mask_ids.has_value() ? mask_ids->data_ptr<int32_t>() : nullptr,
                            mask_patterns.has_value() ? mask_patterns->data_ptr<bool>() : nullptr,
                            widen ? dw.data_ptr<float>() : nullptr, nnzb, B, M, N, BR, BC,
                            db ? db_f.data_ptr<float>() : nullptr,
                            Bf16Out{widen ? nullptr : reinterpret_cast<uint16_t*>(dw.data_ptr()), widen});
  if (db) *db = db_f.to(at::kBFloat16);
  return dw;
}

// The bfloat16 forward on AVX512_BF16 dot products (bf16_pair_kernels), where the CPU has them
// and each pair of bfloat16 along K sits in one aligned 32-bit word of x and of every block
// (even N and BC); nullopt otherwise (the caller computes in float32).
std::optional<at::Tensor> forward_bf16_pairs(const at::Tensor& x, const at::Tensor& values,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& crow_ptr,
                                             const at::Tensor& col_idx, int64_t M) {
  const Kernels<float>* pairs = bf16_pair_kernels();
  const int64_t B = x.size(0), N = x.size(1), BR = values.size(1), BC = values.size(2);
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0; };
  if (!pairs || N % 2 != 0 || BC % 2 != 0 || !aligned(x) || !aligned(values)) return std::nullopt;
  at::Tensor y = pooled_empty({B, M}, at::kBFloat16);
  forward_kernel<float, at::BFloat16>(*pairs, reinterpret_cast<const float*>(x.data_ptr()),
                                      reinterpret_cast<const float*>(values.data_ptr()),
                                      bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr,
                                      crow_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                                      y.data_ptr<at::BFloat16>(), B, N / 2, M, BR, BC / 2);
  return y;
}

// The bfloat16 forward against float32 values (autocast's float32 master weights), each rounded to
// bfloat16 as it is packed, as values.to(bfloat16) would round it: the result of
// forward_bf16_pairs on that copy, bit for bit, without making it. Where the CPU has the pair
// kernels and the blocks fill a tile (no grouped narrow forward), N and BC even; nullopt otherwise.
std::optional<at::Tensor> forward_bf16_pairs_f32w(const at::Tensor& x, const at::Tensor& values,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& crow_ptr,
                                                  const at::Tensor& col_idx, int64_t M) {
  const Kernels<float>* pairs = bf16_pair_kernels();
  const int64_t B = x.size(0), N = x.size(1), BR = values.size(1), BC = values.size(2);
  if (!pairs || N % 2 != 0 || BC % 2 != 0 || 2 * BR <= pairs->nr || reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 != 0)
    return std::nullopt;
  const Kernels<float>& ks = *pairs;
  const int NR = ks.nr;
  const int64_t BCw = BC / 2, Nw = N / 2, blk = BR * BC;
  const int32_t *crow = crow_ptr.data_ptr<int32_t>(), *col = col_idx.data_ptr<int32_t>();
  const float* w = values.data_ptr<float>();
  at::Tensor y = pooled_empty({B, M}, at::kBFloat16);
  auto extent = [=](int64_t p) { return std::min(BCw, Nw - col[p] * BCw); };
  // item: the element offset of the segment's first entry in the values (k0 words in)
  auto make = [=](int64_t p, int64_t k0, int64_t k) { return Seg<float>{col[p] * BCw + k0, nullptr, k, p * blk + 2 * k0}; };
  auto blocks = [=](int64_t i) { return std::make_tuple(int64_t{crow[i]}, int64_t{crow[i + 1]}, extent, make); };
  // as forward_kernel's pack_b on the rounded rows: B[kw][n] = the pair (W[q*NR + n][2kw], W[..][2kw + 1])
  auto pack_b = [=, &ks](const std::vector<Seg<float>>& sg, int64_t, int64_t nv, int64_t q, float* bp) {
    thread_local std::vector<uint16_t> rounded;
    rounded.resize(NR * 2 * kKMax);
    const int64_t rows = std::min<int64_t>(NR, nv - q * NR);
    for (const Seg<float>& sgm : sg) {
      round_rows_bf16(w + sgm.item + q * NR * BC, BC, rows, 2 * sgm.k, rounded.data(), 2 * sgm.k);
      ks.pack_transposed(reinterpret_cast<const float*>(rounded.data()), sgm.k, rows, sgm.k, bp);
      bp += sgm.k * NR;
    }
  };
  auto lines = [=](int64_t i, int64_t part, int64_t nparts, std::vector<LineRange>& out) {  // contiguous
    const float* first = w + int64_t{crow[i]} * blk;
    lines_part(1, (int64_t{crow[i + 1]} - crow[i]) * blk * int64_t{sizeof(float)}, [=](int64_t) { return first; },
               part, nparts, out);
  };
  slice_gemm<float, at::BFloat16>(ks, reinterpret_cast<const float*>(x.data_ptr()), B, Nw, y.data_ptr<at::BFloat16>(),
                                  M, cdiv(M, BR), BR, M, bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr,
                                  B * crow[cdiv(M, BR)] * blk / 2, blocks, pack_b, lines);
  return y;
}

// grad_input in bfloat16 on the bf16 pair kernels: K (the rows of W, entries of dy) taken in
// pairs, so dy is read as 32-bit words and each group's block rows are interleaved two by two
// (pack_bf16_pairs). Where the CPU has them and the shape allows (M and BR even, blocks wider
// than half a tile, dy word-aligned); nullopt otherwise. float32 values (autocast's master
// weights) are rounded to bfloat16 as they are packed, with the bits values.to(bfloat16) gives.
std::optional<at::Tensor> grad_input_bf16_pairs(const at::Tensor& dy, const at::Tensor& values,
                                                const at::Tensor& ccol_ptr, const at::Tensor& t_row_idx,
                                                const at::Tensor& t_perm, int64_t N) {
  const Kernels<float>* pairs = bf16_pair_kernels();
  const int64_t B = dy.size(0), M = dy.size(1), BR = values.size(1), BC = values.size(2);
  if (!pairs || M % 2 != 0 || BR % 2 != 0 || 2 * BC <= pairs->nr ||
      reinterpret_cast<uintptr_t>(dy.data_ptr()) % 4 != 0)
    return std::nullopt;
  const Kernels<float>& ks = *pairs;
  const int NR = ks.nr;
  const int64_t BRw = BR / 2, Mw = M / 2, blk = BR * BC;
  const int32_t *ccol = ccol_ptr.data_ptr<int32_t>(), *t_row = t_row_idx.data_ptr<int32_t>(),
                *perm = t_perm.data_ptr<int32_t>();
  const Bf16Values w(values);
  at::Tensor dx = pooled_empty({B, N}, at::kBFloat16);
  auto extent = [=](int64_t k) { return std::min(BRw, Mw - t_row[k] * BRw); };
  // item: the element offset of the segment's first row in the values
  auto make = [=](int64_t k, int64_t r0, int64_t len) {
    return Seg<float>{t_row[k] * BRw + r0, nullptr, len, perm[k] * blk + 2 * r0 * BC};
  };
  auto blocks = [=](int64_t j) { return std::make_tuple(int64_t{ccol[j]}, int64_t{ccol[j + 1]}, extent, make); };
  // B[kp][n] = (W[2kp][q*NR + n], W[2kp + 1][q*NR + n]): row pairs of the group's blocks
  auto pack_b = [=](const std::vector<Seg<float>>& sg, int64_t, int64_t nv, int64_t q, float* bp) {
    const int64_t cols = std::min<int64_t>(NR, nv - q * NR);
    for (const Seg<float>& sgm : sg) {
      if (w.f32)
        pack_bf16_pairs_f32(w.f32 + sgm.item + q * NR, BC, 2 * sgm.k, cols, NR, bp);
      else
        pack_bf16_pairs(w.b16 + sgm.item + q * NR, BC, 2 * sgm.k, cols, NR, bp);
      bp += sgm.k * NR;
    }
  };
  auto lines = [=](int64_t j, int64_t part, int64_t nparts, std::vector<LineRange>& out) {
    lines_part(ccol[j + 1] - ccol[j], blk * w.esize, [=](int64_t b) { return w.block(perm[ccol[j] + b], blk); }, part,
               nparts, out);
  };
  slice_gemm<float, at::BFloat16>(ks, reinterpret_cast<const float*>(dy.data_ptr()), B, Mw,
                                  dx.data_ptr<at::BFloat16>(), N, cdiv(N, BC), BC, N, nullptr,
                                  B * ccol[cdiv(N, BC)] * blk / 2, blocks, pack_b, lines);
  return dx;
}

// grad_weight in bfloat16 on the bf16 pair kernels: K (the batch) taken in pairs of rows of dy
// and x, interleaved once per call into per-block-column x panels and per-block-row dy panels
// (pack_bf16_pairs), then one [BR x B] @ [B x BC] product per block as in the float kernel.
// Where the CPU has them and the shape allows (blocks as wide as grad_weight's wide path, BR a
// multiple of the tile height); nullopt otherwise. dw_dtype float32: the bfloat16 results widened
// (autocast's gradient for float32 master values, without a bfloat16 temporary).
std::optional<at::Tensor> grad_weight_bf16_pairs(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx,
                                                 const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                                                 const std::optional<at::Tensor>& mask_patterns, int64_t BR,
                                                 int64_t BC, at::ScalarType dw_dtype) {
  const Kernels<float>* pairs = bf16_pair_kernels();
  if (!pairs || narrow_grad_weight(BC, pairs->nr) || BR % pairs->mr != 0) return std::nullopt;
  const Kernels<float>& ks = *pairs;
  const int NR = ks.nr, MR = ks.mr;
  const int64_t B = dy.size(0), M = dy.size(1), N = x.size(1), nnzb = row_idx.numel();
  const int64_t Bp = cdiv(B, 2), ntr = BR / MR, nq = cdiv(BC, NR), blk = BR * BC, nbc = cdiv(N, BC);
  const int64_t nchunks = cdiv(M, BR) * ntr;
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* dy16 = reinterpret_cast<const uint16_t*>(dy.data_ptr());
  at::Tensor dw = pooled_empty({nnzb, BR, BC}, dw_dtype);
  at::Tensor xp_t = pooled_empty({nbc * nq * Bp * NR}, at::kFloat), dyp_t = pooled_empty({nchunks * Bp * MR}, at::kFloat);
  float *xp = xp_t.data_ptr<float>(), *dyp = dyp_t.data_ptr<float>();
  // kRows batch rows at a time, each read in order across all panels
  constexpr int64_t kRows = 16;
  at::parallel_for(0, cdiv(B, kRows), grain_for(kRows * (N + M)), [&](int64_t c0, int64_t c1) {
    for (int64_t b0 = c0 * kRows; b0 < std::min(B, c1 * kRows); b0 += kRows) {
      const int64_t rows = std::min(B, b0 + kRows) - b0;
      for (int64_t j = 0; j < nbc; ++j)
        for (int64_t q = 0; q < nq; ++q)
          pack_bf16_pairs(x16 + b0 * N + j * BC + q * NR, N, rows, std::min<int64_t>(NR, std::min(BC, N - j * BC) - q * NR),
                          NR, xp + ((j * nq + q) * Bp + b0 / 2) * NR);
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t i = c / ntr, r0 = i * BR + (c % ntr) * MR;  // first dy column of the chunk
        pack_bf16_pairs(dy16 + b0 * M + r0, M, rows, std::min<int64_t>(MR, std::min(BR * (i + 1), M) - r0), MR,
                        dyp + (c * Bp + b0 / 2) * MR);
      }
    }
  });
  const int32_t *row = row_idx.data_ptr<int32_t>(), *col = col_idx.data_ptr<int32_t>();
  const int32_t* mids = mask_ids.has_value() ? mask_ids->data_ptr<int32_t>() : nullptr;
  const bool* patterns = mask_patterns.has_value() ? mask_patterns->data_ptr<bool>() : nullptr;
  const bool widen = dw_dtype == at::kFloat;
  uint16_t* out16 = widen ? nullptr : reinterpret_cast<uint16_t*>(dw.data_ptr());
  float* out32 = widen ? dw.data_ptr<float>() : nullptr;
  const int64_t zero = 0;
  parallel_dynamic(nnzb, nnzb * B * blk, [] { return 0; }, [&](int, int64_t p0, int64_t p1) {
    alignas(64) float tile[kMaxTileBytes / sizeof(float)];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = row[p], j = col[p];
      const bool* mask = patterns ? patterns + mids[p] * blk : nullptr;
      for (int64_t t = 0; t < ntr; ++t) {
        for (int64_t q = 0; q < nq; ++q) {
          ks.tile[MR](dyp + (i * ntr + t) * Bp * MR, &zero, &Bp, 1, xp + (j * nq + q) * Bp * NR, tile, false,
                      Prefetch<float>{});
          const int64_t nv = std::min<int64_t>(NR, BC - q * NR);
          if (mask) {
            for (int m = 0; m < MR; ++m) {
              const bool* mk = mask + (t * MR + m) * BC + q * NR;
              for (int64_t n = 0; n < nv; ++n)
                if (!mk[n]) tile[m * NR + n] = 0.0f;  // exactly 0, even for NaN inputs
            }
          }
          const int64_t off = p * blk + t * MR * BC + q * NR;
          if (widen)
            round_rows_f32(tile, NR, MR, nv, out32 + off, BC);
          else
            store_rows_bf16(tile, NR, MR, nv, out16 + off, BC, nullptr);
        }
      }
    }
  });
  return dw;
}

// The dtype an op computes in: that of values, or that of a bfloat16/float16 operand a against
// float32 values (autocast's float32 master weights), as against values.to(a's dtype).
at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& values) {
  return values.scalar_type() == at::kFloat && is_half(a.scalar_type()) ? a.scalar_type() : values.scalar_type();
}

at::Tensor bsr_forward_cpu(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                           const at::Tensor& crow_ptr, const at::Tensor& col_idx, const at::Tensor& row_idx,
                           int64_t M) {
  check_values(values);
  const at::ScalarType ct = compute_dtype(x, values);
  check_operand(x, "x", ct);
  const int64_t B = x.size(0), N = x.size(1), nnzb = values.size(0), BR = values.size(1), BC = values.size(2);
  TORCH_CHECK(M >= 0, "M: expected >= 0, got ", M);
  const int64_t nbr = cdiv(M, BR), nbc = cdiv(N, BC);
  check_index(col_idx, "col_idx", nnzb);
  check_index(row_idx, "row_idx", nnzb);
  check_pointers(crow_ptr, "crow_ptr", nbr, nnzb);
  check_range(col_idx, "col_idx", nbc);
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == ct, "bias: dtype ", bias->scalar_type(), " does not match ", ct);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == M, "bias: expected shape [", M, "], got ", bias->sizes());
    TORCH_CHECK(bias->is_contiguous(), "bias: expected a contiguous tensor");
  }
  if (ct == at::kBFloat16 && B > 0 && M > 0) {  // bfloat16 or float32 values
    const bool f32w = values.scalar_type() == at::kFloat;
    std::optional<at::Tensor> y;
    if (bf16_pair_kernels())
      y = f32w ? forward_bf16_pairs_f32w(x, values, bias, crow_ptr, col_idx, M)
               : forward_bf16_pairs(x, values, bias, crow_ptr, col_idx, M);
    if (!y) y = forward_bf16_f32(x, values, bias, crow_ptr, col_idx, M);
    if (y) return *y;
  }
  if (ct != values.scalar_type()) return bsr_forward_cpu(x, values.to(ct), bias, crow_ptr, col_idx, row_idx, M);
  if (is_half(values.scalar_type())) {
    std::optional<at::Tensor> bias_f;
    if (bias.has_value()) bias_f = bias->to(at::kFloat);
    return bsr_forward_cpu(x.to(at::kFloat), values.to(at::kFloat), bias_f, crow_ptr, col_idx, row_idx, M)
        .to(values.scalar_type());
  }
  at::Tensor y = pooled_empty({B, M}, x.scalar_type());
  if (B == 0 || M == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bsr_forward_cpu", [&] {
    forward_kernel<scalar_t>(active_kernels<scalar_t>(), x.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
                             bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, crow_ptr.data_ptr<int32_t>(),
                             col_idx.data_ptr<int32_t>(), y.data_ptr<scalar_t>(), B, N, M, BR, BC);
  });
  return y;
}

at::Tensor bsr_grad_input_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol_ptr,
                              const at::Tensor& t_row_idx, const at::Tensor& t_perm, int64_t N) {
  check_values(values);
  const at::ScalarType ct = compute_dtype(dy, values);
  check_operand(dy, "dy", ct);
  const int64_t B = dy.size(0), M = dy.size(1), nnzb = values.size(0), BR = values.size(1), BC = values.size(2);
  TORCH_CHECK(N >= 0, "N: expected >= 0, got ", N);
  const int64_t nbr = cdiv(M, BR), nbc = cdiv(N, BC);
  check_index(t_row_idx, "t_row_idx", nnzb);
  check_index(t_perm, "t_perm", nnzb);
  check_pointers(ccol_ptr, "ccol_ptr", nbc, nnzb);
  check_range(t_row_idx, "t_row_idx", nbr);
  check_range(t_perm, "t_perm", nnzb);
  if (ct == at::kBFloat16 && B > 0 && N > 0) {  // bfloat16 or float32 values
    std::optional<at::Tensor> dx;
    if (bf16_pair_kernels()) dx = grad_input_bf16_pairs(dy, values, ccol_ptr, t_row_idx, t_perm, N);
    if (!dx) dx = grad_input_bf16_f32(dy, values, ccol_ptr, t_row_idx, t_perm, N);
    if (dx) return *dx;
  }
  if (ct != values.scalar_type()) return bsr_grad_input_cpu(dy, values.to(ct), ccol_ptr, t_row_idx, t_perm, N);
  if (is_half(values.scalar_type()))
    return bsr_grad_input_cpu(dy.to(at::kFloat), values.to(at::kFloat), ccol_ptr, t_row_idx, t_perm, N)
        .to(values.scalar_type());
  at::Tensor dx = pooled_empty({B, N}, dy.scalar_type());
  if (B == 0 || N == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bsr_grad_input_cpu", [&] {
    grad_input_kernel<scalar_t>(dy.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), ccol_ptr.data_ptr<int32_t>(),
                                t_row_idx.data_ptr<int32_t>(), t_perm.data_ptr<int32_t>(), dx.data_ptr<scalar_t>(),
                                B, M, N, BR, BC);
  });
  return dx;
}

void check_grad_weight_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx,
                            const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                            const std::optional<at::Tensor>& mask_patterns, int64_t BR, int64_t BC) {
  check_cpu(dy, "dy");
  TORCH_CHECK(is_float_type(dy.scalar_type()), "dy: expected a floating dtype, got ", dy.scalar_type());
  check_operand(dy, "dy", dy.scalar_type());
  check_operand(x, "x", dy.scalar_type());
  TORCH_CHECK(dy.size(0) == x.size(0), "dy and x: batch sizes differ: ", dy.size(0), " vs ", x.size(0));
  TORCH_CHECK(BR > 0 && BC > 0, "block shape: expected positive sides, got (", BR, ", ", BC, ")");
  const int64_t M = dy.size(1), N = x.size(1), nnzb = row_idx.numel();
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
}

// The dtype grad_weight returns dW in: dy's (None), or float32 for a bfloat16/float16 dy (the
// half-precision result widened: autocast's gradient of float32 master values).
at::ScalarType dw_dtype_of(const at::Tensor& dy, const std::optional<at::ScalarType>& dw_dtype) {
  const at::ScalarType t = dy.scalar_type(), want = dw_dtype.value_or(t);
  TORCH_CHECK(want == t || (want == at::kFloat && is_half(t)), "dw_dtype: expected ", t,
              " (that of dy) or float32 for a half-precision dy, got ", want);
  return want;
}

// dW in dw_dtype (dw_dtype_of), and where db is not null the bias gradient into it (float32
// sums for half types).
at::Tensor grad_weight_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx,
                           const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                           const std::optional<at::Tensor>& mask_patterns, int64_t BR, int64_t BC, at::Tensor* db,
                           at::ScalarType dw_dtype) {
  const int64_t B = dy.size(0), M = dy.size(1), N = x.size(1), nnzb = row_idx.numel();
  if (dy.scalar_type() == at::kBFloat16 && B > 0 && nnzb > 0) {
    if (bf16_pair_kernels()) {
      if (auto dw = grad_weight_bf16_pairs(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, dw_dtype)) {
        if (db) *db = bias_grad_of(dy);
        return *dw;
      }
    }
    if (auto dw = grad_weight_bf16_f32(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, dw_dtype, db))
      return *dw;
  }
  if (db) *db = at::empty({M}, dy.options());
  if (is_half(dy.scalar_type())) {
    at::Tensor db_f;
    at::Tensor dw = grad_weight_cpu(dy.to(at::kFloat), x.to(at::kFloat), row_idx, col_idx, mask_ids, mask_patterns, BR,
                                    BC, db ? &db_f : nullptr, at::kFloat);
    if (db) db->copy_(db_f);
    dw = dw.to(dy.scalar_type());  // rounded once to dy's dtype, whatever it is returned in
    return dw_dtype == dw.scalar_type() ? dw : dw.to(dw_dtype);
  }
  if (B == 0) {
    if (db) db->zero_();
    return at::zeros({nnzb, BR, BC}, dy.options());
  }
  at::Tensor dw = pooled_empty({nnzb, BR, BC}, dy.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bsr_grad_weight_cpu", [&] {
    grad_weight_kernel<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), row_idx.data_ptr<int32_t>(),
                                 col_idx.data_ptr<int32_t>(),
                                 mask_ids.has_value() ? mask_ids->data_ptr<int32_t>() : nullptr,
                                 mask_patterns.has_value() ? mask_patterns->data_ptr<bool>() : nullptr,
                                 dw.data_ptr<scalar_t>(), nnzb, B, M, N, BR, BC,
                                 db ? db->data_ptr<scalar_t>() : nullptr);
  });
  return dw;
}

at::Tensor bsr_grad_weight_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx,
                               const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                               const std::optional<at::Tensor>& mask_patterns, int64_t BR, int64_t BC) {
  check_grad_weight_args(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC);
  return grad_weight_cpu(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, nullptr, dy.scalar_type());
}

// bsr_grad_weight returned in dw_dtype (dw_dtype_of): float32 for a half-precision dy gives the
// half-precision dW widened, written so where the kernel can (no half-precision temporary).
at::Tensor bsr_grad_weight_as_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx,
                                  const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                                  const std::optional<at::Tensor>& mask_patterns, int64_t BR, int64_t BC,
                                  at::ScalarType dw_dtype) {
  check_grad_weight_args(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC);
  return grad_weight_cpu(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, nullptr, dw_dtype_of(dy, dw_dtype));
}

// db alone, summed as bsr_grad_weight_bias sums it (the same bits): for the backward's paths
// that do not fuse it (gradient accumulation in place, no weight gradient).
at::Tensor bsr_bias_grad_cpu(const at::Tensor& dy) {
  check_cpu(dy, "dy");
  TORCH_CHECK(is_float_type(dy.scalar_type()), "dy: expected a floating dtype, got ", dy.scalar_type());
  check_operand(dy, "dy", dy.scalar_type());
  return bias_grad_of(dy);
}

// (dW, db): the bias gradient summed in the pass that packs dy where the kernel has one.
std::tuple<at::Tensor, at::Tensor> bsr_grad_weight_bias_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                            const at::Tensor& row_idx, const at::Tensor& col_idx,
                                                            const std::optional<at::Tensor>& mask_ids,
                                                            const std::optional<at::Tensor>& mask_patterns, int64_t BR,
                                                            int64_t BC, std::optional<at::ScalarType> dw_dtype) {
  check_grad_weight_args(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC);
  at::Tensor db;
  at::Tensor dw = grad_weight_cpu(dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC, &db, dw_dtype_of(dy, dw_dtype));
  return {dw, db};
}

// The ISA of the micro-kernels for this process: `request` "avx512" | "avx2" | "generic" selects
// that one, capped at what the CPU has; "best" the best it has; "" changes nothing. Returns the
// name of the ISA now active.
std::string cpu_isa(const std::string& request) {
  Isa isa;
  try {
    isa = request.empty() ? active_isa() : request == "best" ? set_isa(best_isa()) : set_isa(parse_isa(request.c_str()));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what(), " (or 'best', or '' to query)");
  }
  return isa_name(isa);
}

}  // namespace
}  // namespace efcn_cpu

// Not a tensor op: no dispatch key, one kernel for every device.
// Whether bfloat16 ops run on AVX512_BF16 dot products now (the CPU has them and the active
// ISA is AVX-512), where their shapes allow (forward_bf16_pairs).
bool cpu_bf16_dot() { return efcn_cpu::bf16_pair_kernels() != nullptr; }

TORCH_LIBRARY_FRAGMENT(efcn_sparse_C, m) {
  m.def("cpu_isa(str request) -> str", &efcn_cpu::cpu_isa);
  m.def("cpu_bf16_dot() -> bool", &cpu_bf16_dot);
}

TORCH_LIBRARY_IMPL(efcn_sparse_C, CPU, m) {
  m.impl("bsr_forward", &efcn_cpu::bsr_forward_cpu);
  m.impl("bsr_grad_input", &efcn_cpu::bsr_grad_input_cpu);
  m.impl("bsr_grad_weight", &efcn_cpu::bsr_grad_weight_cpu);
  m.impl("bsr_grad_weight_bias", &efcn_cpu::bsr_grad_weight_bias_cpu);
  m.impl("bsr_grad_weight_as", &efcn_cpu::bsr_grad_weight_as_cpu);
  m.impl("bsr_bias_grad", &efcn_cpu::bsr_bias_grad_cpu);
}
