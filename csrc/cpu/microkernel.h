// Register-tile micro-kernels for the CPU BSR ops (csrc/cpu/bsr_cpu.cpp), one set per ISA.
//
// One primitive serves all three ops: C[m][n] = sum_k A[k][m] * B[k][n] over packed panels.
// The tile shape (mr rows x nr columns) belongs to the ISA, chosen at run time, and the caller
// packs its panels for that shape (Kernels<T>::mr, ::nr):
//   A comes in segments (the blocks of a block row sit at different columns of x):
//   segment s: A + a_off[s] is a [a_k[s]][mr] panel (only the first m of each mr-group read by
//   tile[m]); B: [sum of a_k][nr], contiguous across segments; C: [mr][nr] (first m rows written;
//   with load_c, the accumulators start from them, so a product split over several calls along K
//   continues one chain instead of adding partial sums).
// The caller packs operands into these contiguous panels (which also removes the cache-set
// aliasing of rows that are a power of two apart in x and dy) and runs its own epilogue.
//
// Each C entry is one chain of multiply-adds in ascending k (segments in order, calls in order
// with load_c), so the result does not depend on how the caller splits work between threads or
// along K, nor on the tile shape. The
// AVX2 and AVX-512 tile kernels both use fused multiply-adds, so they give the same bits (the
// AVX-512 matrix-vector forward for batch <= 2 sums in another order); the
// portable kernel (no FMA contraction guaranteed) may differ in the last bits. Which ISA runs:
// the best the CPU has (AVX-512F, AVX2+FMA, portable C++; always portable under
// AddressSanitizer, which cannot see the intrinsics' loads), lowered by EFCN_CPU_ISA at first
// use or by set_isa() (torch.ops.efcn_sparse_C.cpu_isa); results are bit-identical run to run
// and across thread counts for a given ISA. bfloat16 has its own tile kernels where the CPU has
// AVX512_BF16 (bf16_pair_kernels: panel entries are pairs of bf16 along K, float accumulators).
#pragma once

#include <cstdint>

// Defined in AddressSanitizer builds, which run the portable kernels only (ASan does not see the
// loads of intrinsics) and recycle no buffers (buffer_pool.h).
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EFCN_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) && !defined(EFCN_ASAN)
#define EFCN_ASAN 1
#endif

namespace efcn_cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

constexpr int kMaxMR = 12;        // most rows of a register tile, over all ISAs
constexpr int kMaxTileBytes = kMaxMR * 128;  // most bytes of one mr x nr tile

// n consecutive cache lines from p.
struct LineRange {
  const char* p;
  int64_t n;
};

// What a micro-kernel call fetches for the caller's later work while it multiplies (the
// portable kernel ignores it), so that memory latency overlaps the multiply-adds instead of
// stalling the next call: next_a, the A panel base of the next call (its segments at this
// call's offsets), walked line by line alongside A; ranges[0..n), further cache lines (the next
// slice's blocks), one every few k steps, the rest at the end.
template <typename T>
struct Prefetch {
  const T* next_a = nullptr;
  const LineRange* ranges = nullptr;
  int n = 0;
};

template <typename T>
using MicroKernel = void (*)(const T* A, const int64_t* a_off, const int64_t* a_k, int nseg, const T* B, T* C,
                             bool load_c, const Prefetch<T>& pf);

// The micro-kernels of one ISA for T, with the panel helpers that agree with its tile shape.
template <typename T>
struct Kernels {
  Isa isa;
  int mr, nr;                       // tile shape; panels are packed for it
  MicroKernel<T> tile[kMaxMR + 1];  // tile[m] computes the first m rows, 1 <= m <= mr
  // dst[k][n] = n < rows ? src[n * ld + k] : 0 for k < K, n < nr: nr rows of a row-major matrix
  // transposed into a B panel (vectorised 8x8 / 4x4 transposes on the SIMD ISAs).
  void (*pack_transposed)(const T* src, int64_t ld, int64_t rows, int64_t K, T* dst);
  // out[m * ld + n] = tile[m][n] (+ bias[n] where bias is not null) for m < rows, n < nv (tile
  // rows nr apart), with non-temporal (cache-bypassing) stores where a row is whole and aligned
  // (SIMD ISAs); store_fence() orders them before the data is used elsewhere.
  void (*store_rows)(const T* tile, int rows, int64_t nv, T* out, int64_t ld, const T* bias);
  // dst[f][m] = m < rows ? src[m * ld + f] : 0 for f < F, m < mr: one batch tile of a row-major
  // [rows, F] operand (rows <= mr) as the A panel the tile kernels read (vectorised where mr
  // allows 8x8 / 4x4 transposes; with stream, non-temporal stores where dst is aligned: for
  // packed operands larger than the caches, store_fence() before use).
  void (*pack_rows)(const T* src, int64_t ld, int64_t rows, int64_t F, T* dst, bool stream);
  // dst[k][n] = n < cols ? src[k * ld + n] : 0 for k < K, n < nr: K rows of cols <= nr entries
  // copied into a B panel (masked vector loads on the SIMD ISAs; stream as for pack_rows).
  void (*pack_copy)(const T* src, int64_t ld, int64_t K, int64_t cols, T* dst, bool stream);
  // dst[c][b][m] = c * mr + m < cols ? src[b * ld + c * mr + m] : 0 for c < nchunks, m < mr and
  // rows b0 <= b < b1 of a [rows, cols] matrix: every row's consecutive mr-entry chunks as the A
  // panels of grad_weight (dy's block rows, where the block height is a multiple of mr), reading
  // each row in order and writing whole cache lines with non-temporal stores where aligned
  // (store_fence() before use); b0 even. Where sums is not null, also sums[j] += src[b * ld + j]
  // for j < cols, rows b in ascending order (the bias gradient, fused into this pass). Null
  // where the ISA has none.
  void (*pack_chunks)(const T* src, int64_t ld, int64_t rows, int64_t cols, int64_t nchunks, T* dst, int64_t b0,
                      int64_t b1, T* sums);
  // out[r] = sum over segments s of sum_{k < len[s]} w[s][r * ldw + k] * x[s][k], for r < rows: a
  // matrix-vector product over the blocks of a block row (the forward at batch 1, which streams the
  // weights once and should not transpose them). Per row: lane-wise sums in ascending k, then a
  // fixed reduction. Null where the ISA has none (the caller then uses the tile kernels).
  void (*gemv)(const T* const* w, const T* const* x, const int64_t* len, int nseg, int64_t rows, int64_t ldw,
               T* out);
  // tile_stream[m]: tile[m] over one segment (A: [K][mr], B: [K][nr]) from zero, its m x nr result
  // stored with non-temporal stores straight to out (rows ldc apart; out and ldc aligned to whole
  // cache lines; store_fence() before use), skipping the tile buffer: grad_weight's blocks.
  // Null where the ISA has none.
  void (*tile_stream[kMaxMR + 1])(const T* A, int64_t K, const T* B, T* out, int64_t ldc, const Prefetch<T>& pf);
};

// The kernels of the active ISA. Read once per op call: an ISA change between calls is safe.
template <typename T>
const Kernels<T>& kernels();

// Float kernels whose tile kernels take each 32-bit entry of their A and B panels as a pair of
// bfloat16 along K and add both products into the float accumulators (AVX512_BF16 dot
// products): a bfloat16 operand viewed as 32-bit words is packed by the float helpers with K
// halved. Null unless the active ISA is AVX-512 and the CPU has AVX512_BF16. No gemv, and
// store_rows is not for their outputs (floats the caller converts).
// They are used by default where they outrun the float32 kernels (AMD); EFCN_CPU_BF16_DOT=1 or 0
// in the environment (read at each call) turns them on or off: off, bfloat16 is computed by the
// float32 kernels on widened operands, as on CPUs without AVX512_BF16.
const Kernels<float>* bf16_pair_kernels();

// dst[k * width + n] = the pair (src[(2k) * ld + n], src[(2k + 1) * ld + n]) of bfloat16 as one
// 32-bit word (the second half zero where 2k + 1 == rows), zero for n >= cols; k < cdiv(rows, 2),
// n < width <= 32: pairs of consecutive rows of a bfloat16 matrix interleaved into the panels of
// the bf16 pair kernels, with K running down the rows (grad_input's blocks, grad_weight's x
// and dy). Only while bf16_pair_kernels() is not null.
void pack_bf16_pairs(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, int width, float* dst);

// out[m * ld + n] = bfloat16(tile[m][n] (+ bias[n])), rounded as torch rounds (to nearest even,
// subnormals kept), for m < rows, n < nv (tile rows nr floats apart): bfloat16 outputs of float
// accumulators. Only where the active ISA is AVX-512.
void store_rows_bf16(const float* tile, int nr, int rows, int64_t nv, uint16_t* out, int64_t ld,
                     const uint16_t* bias);

// dst[r * ldd + c] = src[r * ld + c] rounded to bfloat16 as torch's conversion rounds it (to
// nearest even, subnormals kept, NaN as 0xFFFF), for r < rows, c < cols: float32 weights
// converted as they are packed for the bf16 pair kernels (autocast: values.to(bfloat16)
// without the copy). Only where the active ISA is AVX-512.
void round_rows_bf16(const float* src, int64_t ld, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd);

// dst[r * ldd + c] = src[r * ld + c] as float32 for r < rows, c < cols: bfloat16 bits widened
// (widen_bf16_rows), or float32 entries rounded to bfloat16 as round_rows_bf16 rounds them and
// widened back (round_rows_f32; dst may be src; also the float32 weight gradient of the bf16
// kernels, exactly their bfloat16 result widened). Only where the active ISA is AVX-512 (the
// callers' portable loops give the same bits elsewhere).
void widen_bf16_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, float* dst, int64_t ldd);
void round_rows_f32(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst, int64_t ldd);

// Kernels<float>::gemv (AVX-512) with the weights read as bfloat16: their bits (uint16_t), or
// float32 values rounded to bfloat16 as they are loaded; x float32. The same bits as the float
// gemv on widened copies. Only where the active ISA is AVX-512.
void gemv_bf16(const uint16_t* const* w, const float* const* x, const int64_t* len, int nseg, int64_t rows, int64_t ldw,
               float* out);
void gemv_bf16(const float* const* w, const float* const* x, const int64_t* len, int nseg, int64_t rows, int64_t ldw,
               float* out);

// pack_bf16_pairs of float32 rows, each entry rounded as round_rows_bf16 rounds it.
void pack_bf16_pairs_f32(const float* src, int64_t ld, int64_t rows, int64_t cols, int width, float* dst);

Isa best_isa();    // the best ISA of this CPU and build
Isa active_isa();  // best_isa(), or what EFCN_CPU_ISA or set_isa() asked for, capped at best_isa()
Isa set_isa(Isa want);  // makes min(want, best_isa()) active and returns it
const char* isa_name(Isa isa);
// "avx512" | "avx2" | "generic" -> the ISA; throws std::invalid_argument naming the choices otherwise.
Isa parse_isa(const char* name);

void store_fence();

}  // namespace efcn_cpu
