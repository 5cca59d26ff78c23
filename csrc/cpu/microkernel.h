// Register-tile micro-kernels for the CPU BSR ops (csrc/cpu/bsr_cpu.cpp).
//
// One primitive serves all three ops: C[m][n] = sum_k A[k][m] * B[k][n] over packed panels,
//   A: [K][kMR] (only the first mr of each kMR-group are read), B: [K][kNR<T>], C: [kMR][kNR<T>].
// The caller packs operands into these contiguous panels (which also removes the cache-set
// aliasing of rows that are a power of two apart in x and dy) and runs its own epilogue.
//
// Each C entry is one chain of multiply-adds in ascending k, so the result does not depend on
// how the caller splits work between threads. The kernel is picked once per process by CPU
// features (AVX2+FMA, else portable C++), so results are bit-identical run to run on a machine.
#pragma once

#include <cstdint>

namespace efcn_cpu {

constexpr int kMR = 6;  // rows of a register tile
template <typename T>
constexpr int kNR = 64 / static_cast<int>(sizeof(T));  // columns: two 256-bit registers

template <typename T>
using MicroKernel = void (*)(int64_t K, const T* A, const T* B, T* C);

// The kernel computing an mr x kNR<T> tile, 1 <= mr <= kMR.
template <typename T>
MicroKernel<T> micro_kernel(int mr);

// "avx2" or "generic": which implementation micro_kernel returns on this machine.
const char* micro_kernel_isa();

}  // namespace efcn_cpu
