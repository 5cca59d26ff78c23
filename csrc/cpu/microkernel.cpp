// Micro-kernels declared in microkernel.h: an AVX2+FMA version chosen at run time on x86 CPUs
// that have it (the file itself is compiled for the baseline ISA), and a portable C++ version.
#include "microkernel.h"

#include <cstdint>

// AddressSanitizer does not see loads made by intrinsics, so sanitized builds use the portable
// kernels, whose accesses are exactly those of the AVX2 ones (same panels, same extents).
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EFCN_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EFCN_ASAN 1
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(EFCN_ASAN)
#define EFCN_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace efcn_cpu {
namespace {

template <typename T, int MR>
void micro_generic(const T* A0, const int64_t* a_off, const int64_t* a_k, int nseg, const T* B, T* C) {
  constexpr int NR = kNR<T>;
  T acc[MR][NR] = {};
  for (int s = 0; s < nseg; ++s) {
    const T* A = A0 + a_off[s];
    for (int64_t k = 0; k < a_k[s]; ++k, A += kMR, B += NR) {
      for (int m = 0; m < MR; ++m)
        for (int n = 0; n < NR; ++n) acc[m][n] += A[m] * B[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) C[m * NR + n] = acc[m][n];
}

#ifdef EFCN_HAVE_AVX2_PATH
template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_f32(const float* A0, const int64_t* a_off, const int64_t* a_k,
                                                        int nseg, const float* B, float* C) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm256_setzero_ps();
  for (int s = 0; s < nseg; ++s) {
    const float* A = A0 + a_off[s];
    for (int64_t k = a_k[s]; k > 0; --k, A += kMR, B += 16) {
      const __m256 b0 = _mm256_loadu_ps(B), b1 = _mm256_loadu_ps(B + 8);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 a = _mm256_broadcast_ss(A + m);
        c0[m] = _mm256_fmadd_ps(a, b0, c0[m]);
        c1[m] = _mm256_fmadd_ps(a, b1, c1[m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(C + m * 16, c0[m]);
    _mm256_storeu_ps(C + m * 16 + 8, c1[m]);
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_f64(const double* A0, const int64_t* a_off, const int64_t* a_k,
                                                        int nseg, const double* B, double* C) {
  __m256d c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm256_setzero_pd();
  for (int s = 0; s < nseg; ++s) {
    const double* A = A0 + a_off[s];
    for (int64_t k = a_k[s]; k > 0; --k, A += kMR, B += 8) {
      const __m256d b0 = _mm256_loadu_pd(B), b1 = _mm256_loadu_pd(B + 4);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256d a = _mm256_broadcast_sd(A + m);
        c0[m] = _mm256_fmadd_pd(a, b0, c0[m]);
        c1[m] = _mm256_fmadd_pd(a, b1, c1[m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_pd(C + m * 8, c0[m]);
    _mm256_storeu_pd(C + m * 8 + 4, c1[m]);
  }
}

// The full-tile part of pack_transposed: kNR rows, K rounded down to 8 (float) / 4 (double).
__attribute__((target("avx2,fma"))) int64_t transpose_avx2(const float* src, int64_t ld, int64_t K, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (int h = 0; h < 2; ++h) {
      const float* s = src + h * 8 * ld + k;
      __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ld), r2 = _mm256_loadu_ps(s + 2 * ld),
             r3 = _mm256_loadu_ps(s + 3 * ld), r4 = _mm256_loadu_ps(s + 4 * ld), r5 = _mm256_loadu_ps(s + 5 * ld),
             r6 = _mm256_loadu_ps(s + 6 * ld), r7 = _mm256_loadu_ps(s + 7 * ld);
      __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
             t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
             t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      r0 = _mm256_shuffle_ps(t0, t2, 0x44);
      r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      r2 = _mm256_shuffle_ps(t1, t3, 0x44);
      r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      r4 = _mm256_shuffle_ps(t4, t6, 0x44);
      r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      r6 = _mm256_shuffle_ps(t5, t7, 0x44);
      r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dst + k * 16 + h * 8;
      _mm256_storeu_ps(d + 0 * 16, _mm256_permute2f128_ps(r0, r4, 0x20));
      _mm256_storeu_ps(d + 1 * 16, _mm256_permute2f128_ps(r1, r5, 0x20));
      _mm256_storeu_ps(d + 2 * 16, _mm256_permute2f128_ps(r2, r6, 0x20));
      _mm256_storeu_ps(d + 3 * 16, _mm256_permute2f128_ps(r3, r7, 0x20));
      _mm256_storeu_ps(d + 4 * 16, _mm256_permute2f128_ps(r0, r4, 0x31));
      _mm256_storeu_ps(d + 5 * 16, _mm256_permute2f128_ps(r1, r5, 0x31));
      _mm256_storeu_ps(d + 6 * 16, _mm256_permute2f128_ps(r2, r6, 0x31));
      _mm256_storeu_ps(d + 7 * 16, _mm256_permute2f128_ps(r3, r7, 0x31));
    }
  }
  return k;
}

__attribute__((target("avx2,fma"))) int64_t transpose_avx2(const double* src, int64_t ld, int64_t K, double* dst) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    for (int h = 0; h < 2; ++h) {
      const double* s = src + h * 4 * ld + k;
      const __m256d r0 = _mm256_loadu_pd(s), r1 = _mm256_loadu_pd(s + ld), r2 = _mm256_loadu_pd(s + 2 * ld),
                    r3 = _mm256_loadu_pd(s + 3 * ld);
      const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1),
                    t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
      double* d = dst + k * 8 + h * 4;
      _mm256_storeu_pd(d + 0 * 8, _mm256_permute2f128_pd(t0, t2, 0x20));
      _mm256_storeu_pd(d + 1 * 8, _mm256_permute2f128_pd(t1, t3, 0x20));
      _mm256_storeu_pd(d + 2 * 8, _mm256_permute2f128_pd(t0, t2, 0x31));
      _mm256_storeu_pd(d + 3 * 8, _mm256_permute2f128_pd(t1, t3, 0x31));
    }
  }
  return k;
}

__attribute__((target("avx2"))) void stream_row(const float* src, float* dst) {
  _mm256_stream_ps(dst, _mm256_load_ps(src));
  _mm256_stream_ps(dst + 8, _mm256_load_ps(src + 8));
}

__attribute__((target("avx2"))) void stream_row(const double* src, double* dst) {
  _mm256_stream_pd(dst, _mm256_load_pd(src));
  _mm256_stream_pd(dst + 4, _mm256_load_pd(src + 4));
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

template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t rows, int64_t K, T* dst) {
  constexpr int NR = kNR<T>;
  int64_t k0 = 0;
#ifdef EFCN_HAVE_AVX2_PATH
  if (rows == NR && cpu_has_avx2()) k0 = transpose_avx2(src, ld, K, dst);
#endif
  for (int n = 0; n < NR; ++n) {
    T* d = dst + n;
    if (n < rows) {
      const T* s = src + n * ld;
      for (int64_t k = k0; k < K; ++k) d[k * NR] = s[k];
    } else {
      for (int64_t k = k0; k < K; ++k) d[k * NR] = T(0);
    }
  }
}

template <typename T>
void store_rows(const T* tile, int mr, int64_t nv, T* out, int64_t ld) {
  constexpr int NR = kNR<T>;
  for (int m = 0; m < mr; ++m) {
    T* o = out + m * ld;
    const T* t = tile + m * NR;
#ifdef EFCN_HAVE_AVX2_PATH
    if (nv == NR && reinterpret_cast<uintptr_t>(o) % 32 == 0 && reinterpret_cast<uintptr_t>(t) % 32 == 0 &&
        cpu_has_avx2()) {
      stream_row(t, o);
      continue;
    }
#endif
    for (int64_t n = 0; n < nv; ++n) o[n] = t[n];
  }
}

void store_fence() {
#ifdef EFCN_HAVE_AVX2_PATH
  _mm_sfence();
#endif
}

template void store_rows<float>(const float*, int, int64_t, float*, int64_t);
template void store_rows<double>(const double*, int, int64_t, double*, int64_t);
template void pack_transposed<float>(const float*, int64_t, int64_t, int64_t, float*);
template void pack_transposed<double>(const double*, int64_t, int64_t, int64_t, double*);

}  // namespace efcn_cpu
