// Register-tile micro-kernels for the CPU BSR ops (csrc/cpu/bsr_cpu.cpp).
//
// One primitive serves all three ops: C[m][n] = sum_k A[k][m] * B[k][n] over packed panels.
// A comes in segments (the blocks of a block row sit at different columns of x):
//   segment s: A + a_off[s] is a [a_k[s]][kMR] panel (only the first mr of each kMR-group read);
//   B: [sum of a_k][kNR<T>], contiguous across segments; C: [kMR][kNR<T>] (first mr rows written).
// The caller packs operands into these contiguous panels (which also removes the cache-set
// aliasing of rows that are a power of two apart in x and dy) and runs its own epilogue.
//
// Each C entry is one chain of multiply-adds in ascending k (segments in order), so the result
// does not depend on how the caller splits work between threads. The kernel is picked by CPU
// features (AVX2+FMA, else portable C++; always portable under AddressSanitizer), so results
// are bit-identical run to run on a machine.
#pragma once

#include <cstdint>

namespace efcn_cpu {

constexpr int kMR = 6;  // rows of a register tile
template <typename T>
constexpr int kNR = 64 / static_cast<int>(sizeof(T));  // columns: two 256-bit registers

template <typename T>
using MicroKernel = void (*)(const T* A, const int64_t* a_off, const int64_t* a_k, int nseg, const T* B, T* C);

// The kernel computing an mr x kNR<T> tile, 1 <= mr <= kMR.
template <typename T>
MicroKernel<T> micro_kernel(int mr);

// dst[k][n] = n < rows ? src[n * ld + k] : 0 for k < K, n < kNR<T>: kNR<T> rows of a row-major
// matrix transposed into a B panel (vectorised 8x8 / 4x4 transposes where AVX2 is available).
template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t rows, int64_t K, T* dst);

// out[m * ld + n] = tile[m][n] for m < mr, n < nv, with non-temporal (cache-bypassing) stores
// where a row is whole and aligned; store_fence() orders them before the data is used elsewhere.
template <typename T>
void store_rows(const T* tile, int mr, int64_t nv, T* out, int64_t ld);
void store_fence();

}  // namespace efcn_cpu
