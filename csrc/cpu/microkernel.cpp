// Micro-kernels declared in microkernel.h: an AVX2+FMA version chosen at run time on x86 CPUs
// that have it (the file itself is compiled for the baseline ISA), and a portable C++ version.
#include "microkernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EFCN_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace efcn_cpu {
namespace {

template <typename T, int MR>
void micro_generic(int64_t K, const T* A, const T* B, T* C) {
  constexpr int NR = kNR<T>;
  T acc[MR][NR] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int m = 0; m < MR; ++m) {
      const T a = A[k * kMR + m];
      for (int n = 0; n < NR; ++n) acc[m][n] += a * B[k * NR + n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) C[m * NR + n] = acc[m][n];
}

#ifdef EFCN_HAVE_AVX2_PATH
template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_f32(int64_t K, const float* A, const float* B, float* C) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k, A += kMR, B += 16) {
    const __m256 b0 = _mm256_loadu_ps(B), b1 = _mm256_loadu_ps(B + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_broadcast_ss(A + m);
      c0[m] = _mm256_fmadd_ps(a, b0, c0[m]);
      c1[m] = _mm256_fmadd_ps(a, b1, c1[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(C + m * 16, c0[m]);
    _mm256_storeu_ps(C + m * 16 + 8, c1[m]);
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_f64(int64_t K, const double* A, const double* B, double* C) {
  __m256d c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm256_setzero_pd();
  for (int64_t k = 0; k < K; ++k, A += kMR, B += 8) {
    const __m256d b0 = _mm256_loadu_pd(B), b1 = _mm256_loadu_pd(B + 4);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256d a = _mm256_broadcast_sd(A + m);
      c0[m] = _mm256_fmadd_pd(a, b0, c0[m]);
      c1[m] = _mm256_fmadd_pd(a, b1, c1[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_pd(C + m * 8, c0[m]);
    _mm256_storeu_pd(C + m * 8 + 4, c1[m]);
  }
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

template <typename T, template <int> class Table>
MicroKernel<T> pick(int mr) {
  switch (mr) {
    case 1: return Table<1>::fn;
    case 2: return Table<2>::fn;
    case 3: return Table<3>::fn;
    case 4: return Table<4>::fn;
    case 5: return Table<5>::fn;
    default: return Table<6>::fn;
  }
}

template <typename T>
struct Generic {
  template <int MR>
  struct Of {
    static constexpr MicroKernel<T> fn = &micro_generic<T, MR>;
  };
};

#ifdef EFCN_HAVE_AVX2_PATH
template <int MR>
struct Avx2F32 {
  static constexpr MicroKernel<float> fn = &micro_avx2_f32<MR>;
};
template <int MR>
struct Avx2F64 {
  static constexpr MicroKernel<double> fn = &micro_avx2_f64<MR>;
};
#endif

static_assert(kMR == 6, "pick() covers mr = 1..6");

}  // namespace

template <>
MicroKernel<float> micro_kernel<float>(int mr) {
#ifdef EFCN_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return pick<float, Avx2F32>(mr);
#endif
  return pick<float, Generic<float>::Of>(mr);
}

template <>
MicroKernel<double> micro_kernel<double>(int mr) {
#ifdef EFCN_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return pick<double, Avx2F64>(mr);
#endif
  return pick<double, Generic<double>::Of>(mr);
}

const char* micro_kernel_isa() {
#ifdef EFCN_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return "avx2";
#endif
  return "generic";
}

}  // namespace efcn_cpu
