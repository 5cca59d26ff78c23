// Micro-kernels declared in microkernel.h: AVX-512F and AVX2+FMA versions chosen at run time on
// x86 CPUs that have them (the file itself is compiled for the baseline ISA; each SIMD function
// carries its own target attribute), and a portable C++ version.
#include "microkernel.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

// AddressSanitizer does not see loads made by intrinsics, so sanitized builds (EFCN_ASAN, see
// microkernel.h) use the portable kernels only, whose accesses are exactly those of the SIMD ones
// (same panels, same extents).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(EFCN_ASAN)
#define EFCN_HAVE_SIMD_PATHS 1
#include <immintrin.h>
#endif

namespace efcn_cpu {
namespace {

// ------------------------------------------------------------------------------ tile shapes
// Portable and AVX2: 6 x (two 256-bit registers); AVX-512: 8 x (two 512-bit registers), 16 of
// the 32 zmm registers accumulating, 2 holding the B row, the A entries broadcast from memory (8
// rows: batch tiles and dy's block rows split evenly at the usual multiples of 8).
template <typename T>
constexpr int kNR256 = 64 / static_cast<int>(sizeof(T));
template <typename T>
constexpr int kNR512 = 128 / static_cast<int>(sizeof(T));
constexpr int kMR256 = 6, kMR512 = 8;
static_assert(kMR512 <= kMaxMR && kMR512 * 128 <= kMaxTileBytes, "tile bounds in microkernel.h");

// ------------------------------------------------------------------------------ portable
template <typename T, int PMR, int NR, int MR>
void micro_generic(const T* A0, const int64_t* a_off, const int64_t* a_k, int nseg, const T* B, T* C, bool load_c,
                   const Prefetch<T>&) {
  T acc[MR][NR] = {};
  if (load_c)
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) acc[m][n] = C[m * NR + n];
  for (int s = 0; s < nseg; ++s) {
    const T* A = A0 + a_off[s];
    for (int64_t k = 0; k < a_k[s]; ++k, A += PMR, B += NR) {
      for (int m = 0; m < MR; ++m)
        for (int n = 0; n < NR; ++n) acc[m][n] += A[m] * B[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) C[m * NR + n] = acc[m][n];
}

template <typename T, int NR>
void pack_transposed_generic(const T* src, int64_t ld, int64_t rows, int64_t K, T* dst, int64_t k0) {
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

template <typename T, int NR>
void pack_transposed_portable(const T* src, int64_t ld, int64_t rows, int64_t K, T* dst) {
  pack_transposed_generic<T, NR>(src, ld, rows, K, dst, 0);
}

template <typename T, int NR>
void store_rows_portable(const T* tile, int rows, int64_t nv, T* out, int64_t ld, const T* bias) {
  for (int m = 0; m < rows; ++m) {
    T* o = out + m * ld;
    const T* t = tile + m * NR;
    for (int64_t n = 0; n < nv; ++n) o[n] = bias ? t[n] + bias[n] : t[n];
  }
}

template <typename T, int MR>
void pack_rows_generic(const T* src, int64_t ld, int64_t rows, int64_t F, T* dst, int64_t f0) {
  for (int64_t f = f0; f < F; ++f)
    for (int m = 0; m < MR; ++m) dst[f * MR + m] = m < rows ? src[m * ld + f] : T(0);
}

template <typename T, int NR>
void pack_copy_portable(const T* src, int64_t ld, int64_t K, int64_t cols, T* dst, bool) {
  for (int64_t k = 0; k < K; ++k, src += ld, dst += NR)
    for (int n = 0; n < NR; ++n) dst[n] = n < cols ? src[n] : T(0);
}

template <typename T, int MR>
void pack_rows_portable(const T* src, int64_t ld, int64_t rows, int64_t F, T* dst, bool) {
  pack_rows_generic<T, MR>(src, ld, rows, F, dst, 0);
}

#ifdef EFCN_HAVE_SIMD_PATHS
// The SIMD kernels' side of Prefetch: an A-panel walk that asks for each line of the next
// call's panel as this call reaches the same offset, and the ranges' lines, one every four k
// steps, the rest at the end.
template <typename T, int MR>
struct Fetcher {
  static constexpr int kLineSteps = 64 / (MR * static_cast<int>(sizeof(T))) >= 2 ? 2 : 1;
  const char* a = nullptr;
  const LineRange* ranges;
  const LineRange* end;
  const char* line = nullptr;
  int64_t left = 0;  // lines left in the current range
  explicit Fetcher(const Prefetch<T>& pf) : ranges(pf.ranges), end(pf.ranges + pf.n) { next_range(); }
  void next_range() {
    while (left == 0 && ranges != end) {
      line = ranges->p;
      left = ranges->n;
      ++ranges;
    }
  }
  void segment(const Prefetch<T>& pf, int64_t a_off) {
    a = pf.next_a ? reinterpret_cast<const char*>(pf.next_a + a_off) : nullptr;
  }
  inline void step(int64_t k) {
    if (a) {
      if (k % kLineSteps == 0) _mm_prefetch(a, _MM_HINT_T0);
      a += MR * sizeof(T);
    }
    if (left > 0 && (k & 3) == 0) {
      _mm_prefetch(line, _MM_HINT_T0);
      line += 64;
      if (--left == 0) next_range();
    }
  }
  void finish() {
    for (; left > 0; next_range())
      for (; left > 0; --left, line += 64) _mm_prefetch(line, _MM_HINT_T0);
  }
};

// ------------------------------------------------------------------------------ AVX2 + FMA
template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_f32(const float* A0, const int64_t* a_off, const int64_t* a_k,
                                                        int nseg, const float* B, float* C, bool load_c,
                                                        const Prefetch<float>& pf) {
  Fetcher<float, kMR256> fetch(pf);
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    c0[m] = load_c ? _mm256_loadu_ps(C + m * 16) : _mm256_setzero_ps();
    c1[m] = load_c ? _mm256_loadu_ps(C + m * 16 + 8) : _mm256_setzero_ps();
  }
  for (int s = 0; s < nseg; ++s) {
    const float* A = A0 + a_off[s];
    fetch.segment(pf, a_off[s]);
    for (int64_t k = a_k[s]; k > 0; --k, A += kMR256, B += 16) {
      fetch.step(k);
      const __m256 b0 = _mm256_loadu_ps(B), b1 = _mm256_loadu_ps(B + 8);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 a = _mm256_broadcast_ss(A + m);
        c0[m] = _mm256_fmadd_ps(a, b0, c0[m]);
        c1[m] = _mm256_fmadd_ps(a, b1, c1[m]);
      }
    }
  }
  fetch.finish();
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(C + m * 16, c0[m]);
    _mm256_storeu_ps(C + m * 16 + 8, c1[m]);
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_f64(const double* A0, const int64_t* a_off, const int64_t* a_k,
                                                        int nseg, const double* B, double* C, bool load_c,
                                                        const Prefetch<double>& pf) {
  Fetcher<double, kMR256> fetch(pf);
  __m256d c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    c0[m] = load_c ? _mm256_loadu_pd(C + m * 8) : _mm256_setzero_pd();
    c1[m] = load_c ? _mm256_loadu_pd(C + m * 8 + 4) : _mm256_setzero_pd();
  }
  for (int s = 0; s < nseg; ++s) {
    const double* A = A0 + a_off[s];
    fetch.segment(pf, a_off[s]);
    for (int64_t k = a_k[s]; k > 0; --k, A += kMR256, B += 8) {
      fetch.step(k);
      const __m256d b0 = _mm256_loadu_pd(B), b1 = _mm256_loadu_pd(B + 4);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256d a = _mm256_broadcast_sd(A + m);
        c0[m] = _mm256_fmadd_pd(a, b0, c0[m]);
        c1[m] = _mm256_fmadd_pd(a, b1, c1[m]);
      }
    }
  }
  fetch.finish();
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_pd(C + m * 8, c0[m]);
    _mm256_storeu_pd(C + m * 8 + 4, c1[m]);
  }
}

// ------------------------------------------------------------------------------ AVX-512F
// t[0] + ... + t[L-1] as a fixed pairwise tree (the lanes of a vector accumulator).
template <typename T, int L>
T tree_sum(T (&t)[L]) {
  for (int w = L / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

template <typename T>
struct Zmm;
template <>
struct Zmm<float> {
  using V = __m512;
  static constexpr int kLanes = 16;
  __attribute__((target("avx512f"))) static V zero() { return _mm512_setzero_ps(); }
  __attribute__((target("avx512f"))) static V load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target("avx512f"))) static V set1(float a) { return _mm512_set1_ps(a); }
  __attribute__((target("avx512f"))) static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  __attribute__((target("avx512f"))) static void stream(float* p, V a) { _mm512_stream_ps(p, a); }
  __attribute__((target("avx512f"))) static V load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  __attribute__((target("avx512f"))) static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  __attribute__((target("avx512f"))) static float sum(V a) {
    alignas(64) float t[kLanes];
    _mm512_store_ps(t, a);
    return tree_sum(t);
  }
};
template <>
struct Zmm<double> {
  using V = __m512d;
  static constexpr int kLanes = 8;
  __attribute__((target("avx512f"))) static V zero() { return _mm512_setzero_pd(); }
  __attribute__((target("avx512f"))) static V load(const double* p) { return _mm512_loadu_pd(p); }
  __attribute__((target("avx512f"))) static V set1(double a) { return _mm512_set1_pd(a); }
  __attribute__((target("avx512f"))) static void store(double* p, V a) { _mm512_storeu_pd(p, a); }
  __attribute__((target("avx512f"))) static void stream(double* p, V a) { _mm512_stream_pd(p, a); }
  __attribute__((target("avx512f"))) static V load(__mmask8 m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  __attribute__((target("avx512f"))) static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  __attribute__((target("avx512f"))) static double sum(V a) {
    alignas(64) double t[kLanes];
    _mm512_store_pd(t, a);
    return tree_sum(t);
  }
};

// ------------------------------------------------------------------------------ AVX-512F tiles
// MR rows x two zmm registers; the A entries broadcast from memory. C rows ldc apart (kStream:
// written with non-temporal stores, aligned).
template <typename T, int MR, bool kStream>
__attribute__((target("avx512f"), always_inline)) inline void micro_avx512_body(const T* A0, const int64_t* a_off,
                                                                                const int64_t* a_k, int nseg,
                                                                                const T* B, T* C, int64_t ldc,
                                                                                bool load_c, const Prefetch<T>& pf) {
  Fetcher<T, kMR512> fetch(pf);
  using Z = Zmm<T>;
  constexpr int L = Z::kLanes;
  typename Z::V c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) {
    c0[m] = load_c ? Z::load(C + m * ldc) : Z::zero();
    c1[m] = load_c ? Z::load(C + m * ldc + L) : Z::zero();
  }
  for (int s = 0; s < nseg; ++s) {
    const T* A = A0 + a_off[s];
    fetch.segment(pf, a_off[s]);
    for (int64_t k = a_k[s]; k > 0; --k, A += kMR512, B += 2 * L) {
      fetch.step(k);
      const auto b0 = Z::load(B), b1 = Z::load(B + L);
#pragma GCC unroll 12
      for (int m = 0; m < MR; ++m) {
        const auto a = Z::set1(A[m]);
        c0[m] = Z::fma(a, b0, c0[m]);
        c1[m] = Z::fma(a, b1, c1[m]);
      }
    }
  }
  fetch.finish();
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) {
    if constexpr (kStream) {
      Z::stream(C + m * ldc, c0[m]);
      Z::stream(C + m * ldc + L, c1[m]);
    } else {
      Z::store(C + m * ldc, c0[m]);
      Z::store(C + m * ldc + L, c1[m]);
    }
  }
}

template <typename T, int MR>
__attribute__((target("avx512f"))) void micro_avx512(const T* A0, const int64_t* a_off, const int64_t* a_k, int nseg,
                                                     const T* B, T* C, bool load_c, const Prefetch<T>& pf) {
  micro_avx512_body<T, MR, false>(A0, a_off, a_k, nseg, B, C, 2 * Zmm<T>::kLanes, load_c, pf);
}

template <typename T, int MR>
__attribute__((target("avx512f"))) void micro_avx512_stream(const T* A, int64_t K, const T* B, T* out, int64_t ldc,
                                                            const Prefetch<T>& pf) {
  const int64_t zero = 0;
  micro_avx512_body<T, MR, true>(A, &zero, &K, 1, B, out, ldc, false, pf);
}

// ------------------------------------------------------------------------------ AVX512_BF16 tiles
// micro_avx512<float> with each panel entry a pair of bfloat16 along K: one dot-product step
// (both products added into the float lane) where the float kernel has a multiply-add.
template <int MR>
__attribute__((target("avx512f,avx512bf16"))) void micro_avx512_bf16(const float* A0, const int64_t* a_off,
                                                                     const int64_t* a_k, int nseg, const float* B,
                                                                     float* C, bool load_c,
                                                                     const Prefetch<float>& pf) {
  constexpr int L = 16;
  Fetcher<float, kMR512> fetch(pf);
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) {
    c0[m] = load_c ? _mm512_loadu_ps(C + m * 2 * L) : _mm512_setzero_ps();
    c1[m] = load_c ? _mm512_loadu_ps(C + m * 2 * L + L) : _mm512_setzero_ps();
  }
  for (int s = 0; s < nseg; ++s) {
    const float* A = A0 + a_off[s];
    fetch.segment(pf, a_off[s]);
    for (int64_t k = a_k[s]; k > 0; --k, A += kMR512, B += 2 * L) {
      fetch.step(k);
      const __m512bh b0 = (__m512bh)_mm512_loadu_ps(B), b1 = (__m512bh)_mm512_loadu_ps(B + L);
#pragma GCC unroll 12
      for (int m = 0; m < MR; ++m) {
        const __m512bh a = (__m512bh)_mm512_set1_ps(A[m]);
        c0[m] = _mm512_dpbf16_ps(c0[m], a, b0);
        c1[m] = _mm512_dpbf16_ps(c1[m], a, b1);
      }
    }
  }
  fetch.finish();
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(C + m * 2 * L, c0[m]);
    _mm512_storeu_ps(C + m * 2 * L + L, c1[m]);
  }
}

// ------------------------------------------------------------------------------ AVX-512F gemv
// Four rows at a time (four independent weight streams), 64 bytes of k per step, masked tails.
template <typename T, int R>
__attribute__((target("avx512f"))) void gemv_rows_avx512(const T* const* w, const T* const* x, const int64_t* len,
                                                         int nseg, int64_t ldw, T* out) {
  using Z = Zmm<T>;
  constexpr int L = Z::kLanes;
  typename Z::V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = Z::zero();
  for (int s = 0; s < nseg; ++s) {
    const T* xs = x[s];
    const T* ws = w[s];
    const int64_t n = len[s];
    int64_t k = 0;
    for (; k + L <= n; k += L) {
      const auto xv = Z::load(xs + k);
      for (int r = 0; r < R; ++r) acc[r] = Z::fma(Z::load(ws + r * ldw + k), xv, acc[r]);
    }
    if (k < n) {
      const unsigned m = (1u << (n - k)) - 1;
      const auto xv = Z::load(m, xs + k);
      for (int r = 0; r < R; ++r) acc[r] = Z::fma(Z::load(m, ws + r * ldw + k), xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = Z::sum(acc[r]);
}

// A gemv's rows four at a time, then one: rows_fn(std::integral_constant<int, R>, w rows, out + r)
// with each weight segment advanced to row r.
template <typename W, typename O, typename RowsFn>
void gemv_by_four(const W* const* w, int nseg, int64_t rows, int64_t ldw, O* out, RowsFn rows_fn) {
  std::vector<const W*> wr(w, w + nseg);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    for (int s = 0; s < nseg; ++s) wr[s] = w[s] + r * ldw;
    rows_fn(std::integral_constant<int, 4>{}, wr.data(), out + r);
  }
  for (; r < rows; ++r) {
    for (int s = 0; s < nseg; ++s) wr[s] = w[s] + r * ldw;
    rows_fn(std::integral_constant<int, 1>{}, wr.data(), out + r);
  }
}

template <typename T>
void gemv_avx512(const T* const* w, const T* const* x, const int64_t* len, int nseg, int64_t rows, int64_t ldw,
                 T* out) {
  gemv_by_four(w, nseg, rows, ldw, out, [&](auto R, const T* const* wr, T* o) {
    gemv_rows_avx512<T, decltype(R)::value>(wr, x, len, nseg, ldw, o);
  });
}

// ------------------------------------------------------------------------------ SIMD panel helpers
// A 32-byte store, non-temporal (dst 32-byte aligned) where NT.
template <bool NT>
__attribute__((target("avx2"))) inline void store8(float* d, __m256 v) {
  if constexpr (NT) _mm256_stream_ps(d, v); else _mm256_storeu_ps(d, v);
}
template <bool NT>
__attribute__((target("avx2"))) inline void store8(double* d, __m256d v) {
  if constexpr (NT) _mm256_stream_pd(d, v); else _mm256_storeu_pd(d, v);
}

// 8 rows x 8 columns of src (leading dim ld) transposed into dst (leading dim ldd).
template <bool NT = false>
__attribute__((target("avx2"))) inline void transpose8x8(const float* s, int64_t ld, float* d, int64_t ldd) {
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
  store8<NT>(d + 0 * ldd, _mm256_permute2f128_ps(r0, r4, 0x20));
  store8<NT>(d + 1 * ldd, _mm256_permute2f128_ps(r1, r5, 0x20));
  store8<NT>(d + 2 * ldd, _mm256_permute2f128_ps(r2, r6, 0x20));
  store8<NT>(d + 3 * ldd, _mm256_permute2f128_ps(r3, r7, 0x20));
  store8<NT>(d + 4 * ldd, _mm256_permute2f128_ps(r0, r4, 0x31));
  store8<NT>(d + 5 * ldd, _mm256_permute2f128_ps(r1, r5, 0x31));
  store8<NT>(d + 6 * ldd, _mm256_permute2f128_ps(r2, r6, 0x31));
  store8<NT>(d + 7 * ldd, _mm256_permute2f128_ps(r3, r7, 0x31));
}

// 4 rows x 4 columns, double.
template <bool NT = false>
__attribute__((target("avx2"))) inline void transpose4x4(const double* s, int64_t ld, double* d, int64_t ldd) {
  const __m256d r0 = _mm256_loadu_pd(s), r1 = _mm256_loadu_pd(s + ld), r2 = _mm256_loadu_pd(s + 2 * ld),
                r3 = _mm256_loadu_pd(s + 3 * ld);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1), t2 = _mm256_unpacklo_pd(r2, r3),
                t3 = _mm256_unpackhi_pd(r2, r3);
  store8<NT>(d + 0 * ldd, _mm256_permute2f128_pd(t0, t2, 0x20));
  store8<NT>(d + 1 * ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
  store8<NT>(d + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
  store8<NT>(d + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
}

// R rows x K columns of src (leading dim ld) transposed into dst[k][r] (K rounded down to 8 for
// float, 4 for double; R a multiple of that); returns the first column left to scalar code.
template <int R, bool NT>
__attribute__((target("avx2"))) int64_t transpose_rows(const float* src, int64_t ld, int64_t K, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int h = 0; h < R / 8; ++h) transpose8x8<NT>(src + h * 8 * ld + k, ld, dst + k * R + h * 8, R);
  return k;
}

template <int R, bool NT>
__attribute__((target("avx2"))) int64_t transpose_rows(const double* src, int64_t ld, int64_t K, double* dst) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int h = 0; h < R / 4; ++h) transpose4x4<NT>(src + h * 4 * ld + k, ld, dst + k * R + h * 4, R);
  return k;
}

// unpacklo_pd / unpackhi_pd (kHigh) of float vectors: pairs of entries as one 64-bit element
template <bool kHigh>
__attribute__((target("avx512f"))) inline __m512 unpack_pairs(__m512 a, __m512 b) {
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_castpd_ps(kHigh ? _mm512_maskz_unpackhi_pd(0xFF, x, y) : _mm512_maskz_unpacklo_pd(0xFF, x, y));
}

// 16 rows x 16 columns of src (leading dim ld) transposed into dst (leading dim ldd): four
// shuffle stages on zmm registers (0.25 shuffles per entry, against 0.375 for the 8 x 8 ones;
// masked forms with every lane set: GCC 12 warns about the unmasked ones' undefined source).
__attribute__((target("avx512f"))) inline void transpose16x16(const float* s, int64_t ld, float* d, int64_t ldd) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(s + i * ld);
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved by entry
    t[i] = _mm512_maskz_unpacklo_ps(0xFFFF, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_ps(0xFFFF, r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {  // then by pairs of entries: 4 rows' entries side by side
    r[i] = unpack_pairs<false>(t[i], t[i + 2]);
    r[i + 1] = unpack_pairs<true>(t[i], t[i + 2]);
    r[i + 2] = unpack_pairs<false>(t[i + 1], t[i + 3]);
    r[i + 3] = unpack_pairs<true>(t[i + 1], t[i + 3]);
  }
  // r[4g + j], 128-bit lane l: rows 4g..4g+3 of column 4l + j; then whole lanes regrouped
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[j], r[4 + j], 0x88);       // lanes 0, 2 of each
    t[4 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[j], r[4 + j], 0xDD);   // lanes 1, 3
    t[8 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[8 + j], r[12 + j], 0xDD);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[j], t[8 + j], 0x88);
    r[4 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[4 + j], t[12 + j], 0x88);
    r[8 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[j], t[8 + j], 0xDD);
    r[12 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[4 + j], t[12 + j], 0xDD);
  }
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) _mm512_storeu_ps(d + c * ldd, r[c]);  // column c of src
}

template <typename T, int NR>
void pack_transposed_avx512(const T* src, int64_t ld, int64_t rows, int64_t K, T* dst) {
  int64_t k0 = 0;
  if constexpr (std::is_same_v<T, float> && NR % 16 == 0) {
    if (rows == NR)
      for (; k0 + 16 <= K; k0 += 16)
        for (int h = 0; h < NR / 16; ++h) transpose16x16(src + h * 16 * ld + k0, ld, dst + k0 * NR + h * 16, NR);
  }
  if (rows == NR && k0 < K) k0 += transpose_rows<NR, false>(src + k0, ld, K - k0, dst + k0 * NR);
  pack_transposed_generic<T, NR>(src, ld, rows, K, dst, k0);
}

template <typename T, int NR>
void pack_transposed_simd(const T* src, int64_t ld, int64_t rows, int64_t K, T* dst) {
  const int64_t k0 = rows == NR ? transpose_rows<NR, false>(src, ld, K, dst) : 0;
  pack_transposed_generic<T, NR>(src, ld, rows, K, dst, k0);
}

template <typename T, int MR>
void pack_rows_simd(const T* src, int64_t ld, int64_t rows, int64_t F, T* dst, bool stream) {
  // whole tiles only, and MR a multiple of the 32-byte transpose's side; then every 32-byte
  // store lands on a 32-byte boundary when dst is aligned
  int64_t f0 = 0;
  if (rows == MR && (MR * sizeof(T)) % 32 == 0) {
    const bool nt = stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0;
    f0 = nt ? transpose_rows<MR, true>(src, ld, F, dst) : transpose_rows<MR, false>(src, ld, F, dst);
  }
  pack_rows_generic<T, MR>(src, ld, rows, F, dst, f0);
}

// AVX2: NR / (32 bytes) masked loads per row.
template <int NR>
__attribute__((target("avx2"))) void pack_copy_avx2(const float* src, int64_t ld, int64_t K, int64_t cols,
                                                    float* dst, bool stream) {
  __m256i mask[NR / 8];
  for (int h = 0; h < NR / 8; ++h)
    mask[h] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols) - 8 * h),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const bool nt = stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0;
  for (int64_t k = 0; k < K; ++k, src += ld, dst += NR)
    for (int h = 0; h < NR / 8; ++h) {
      const __m256 v = _mm256_maskload_ps(src + 8 * h, mask[h]);
      nt ? store8<true>(dst + 8 * h, v) : store8<false>(dst + 8 * h, v);
    }
}

template <int NR>
__attribute__((target("avx2"))) void pack_copy_avx2(const double* src, int64_t ld, int64_t K, int64_t cols,
                                                    double* dst, bool stream) {
  __m256i mask[NR / 4];
  for (int h = 0; h < NR / 4; ++h)
    mask[h] = _mm256_cmpgt_epi64(_mm256_set1_epi64x(cols - 4 * h), _mm256_setr_epi64x(0, 1, 2, 3));
  const bool nt = stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0;
  for (int64_t k = 0; k < K; ++k, src += ld, dst += NR)
    for (int h = 0; h < NR / 4; ++h) {
      const __m256d v = _mm256_maskload_pd(src + 4 * h, mask[h]);
      nt ? store8<true>(dst + 4 * h, v) : store8<false>(dst + 4 * h, v);
    }
}

template <typename T>
using PackCopy = void (*)(const T*, int64_t, int64_t, int64_t, T*, bool);

// AVX-512: two masked zmm loads per row (NR = 2 registers).
template <typename T>
__attribute__((target("avx512f"))) void pack_copy_avx512(const T* src, int64_t ld, int64_t K, int64_t cols, T* dst,
                                                         bool stream) {
  using Z = Zmm<T>;
  constexpr int L = Z::kLanes;
  const auto lanes = [](int64_t c) { return c >= L ? (1u << L) - 1 : c <= 0 ? 0u : (1u << c) - 1; };
  const unsigned m0 = lanes(cols), m1 = lanes(cols - L);
  if (stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    for (int64_t k = 0; k < K; ++k, src += ld, dst += 2 * L) {
      Z::stream(dst, Z::load(m0, src));
      Z::stream(dst + L, Z::load(m1, src + L));
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k, src += ld, dst += 2 * L) {
    Z::store(dst, Z::load(m0, src));
    Z::store(dst + L, Z::load(m1, src + L));
  }
}

// AVX-512, 8-row tiles: a chunk of one row is 32 bytes (float: two rows make a line) or 64
// bytes (double: a line).
template <typename T>
__attribute__((target("avx512f"))) void pack_chunks_avx512(const T* src, int64_t ld, int64_t rows, int64_t cols,
                                                           int64_t nchunks, T* dst, int64_t b0, int64_t b1,
                                                           T* sums) {
  static_assert(kMR512 == 8, "chunks of 8 entries");
  constexpr int MR = kMR512;
  const auto lanes = [](int64_t c) { return c >= MR ? 0xFFu : c <= 0 ? 0u : (1u << c) - 1; };
  // whole lines land on line boundaries: dst aligned, and for float an even row count and start
  const bool nt = reinterpret_cast<uintptr_t>(dst) % 64 == 0 && (sizeof(T) == 8 || (rows % 2 == 0 && b0 % 2 == 0));
  for (int64_t b = b0; b < b1; b += 2) {
    const T* s0 = src + b * ld;
    const T* s1 = s0 + ld;
    const bool pair = b + 1 < b1;
    T* d = dst + b * MR;
    for (int64_t c = 0; c < nchunks; ++c, d += rows * MR) {
      const __mmask8 m = static_cast<__mmask8>(lanes(cols - c * MR));
      if constexpr (sizeof(T) == 4) {
        // lanes 0-7 from row b, 8-15 from row b + 1 (AVX-512F only: masked 512-bit loads)
        __m512 v = _mm512_maskz_loadu_ps(m, s0 + c * MR);
        __m512 acc = sums ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, sums + c * MR), v) : v;
        if (!pair) {
          _mm512_mask_storeu_ps(d, 0xFF, v);
        } else {
          v = _mm512_mask_expandloadu_ps(v, static_cast<__mmask16>(m) << 8, s1 + c * MR);
          nt ? _mm512_stream_ps(d, v) : _mm512_storeu_ps(d, v);
          acc = _mm512_add_ps(acc, _mm512_maskz_shuffle_f32x4(0x00FF, v, v, 0xEE));  // lanes 8-15 (row b + 1) down to 0-7
        }
        if (sums) _mm512_mask_storeu_ps(sums + c * MR, m, acc);
      } else {
        const __m512d v0 = _mm512_maskz_loadu_pd(m, s0 + c * MR);
        nt ? _mm512_stream_pd(d, v0) : _mm512_storeu_pd(d, v0);
        __m512d acc = sums ? _mm512_add_pd(_mm512_maskz_loadu_pd(m, sums + c * MR), v0) : v0;
        if (pair) {
          const __m512d v1 = _mm512_maskz_loadu_pd(m, s1 + c * MR);
          nt ? _mm512_stream_pd(d + MR, v1) : _mm512_storeu_pd(d + MR, v1);
          acc = _mm512_add_pd(acc, v1);
        }
        if (sums) _mm512_mask_storeu_pd(sums + c * MR, m, acc);
      }
    }
  }
}

// A whole tile row (NR * sizeof(T) bytes, a multiple of 64) streamed to a 32-byte aligned dst,
// plus bias (unaligned) where not null.
template <int NR>
__attribute__((target("avx2"))) void stream_row(const float* src, float* dst, const float* bias) {
  for (int n = 0; n < NR; n += 8) {
    const __m256 v = _mm256_load_ps(src + n);
    _mm256_stream_ps(dst + n, bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias + n)) : v);
  }
}

template <int NR>
__attribute__((target("avx2"))) void stream_row(const double* src, double* dst, const double* bias) {
  for (int n = 0; n < NR; n += 4) {
    const __m256d v = _mm256_load_pd(src + n);
    _mm256_stream_pd(dst + n, bias ? _mm256_add_pd(v, _mm256_loadu_pd(bias + n)) : v);
  }
}

template <typename T, int NR>
void store_rows_simd(const T* tile, int rows, int64_t nv, T* out, int64_t ld, const T* bias) {
  for (int m = 0; m < rows; ++m) {
    T* o = out + m * ld;
    const T* t = tile + m * NR;
    if (nv == NR && reinterpret_cast<uintptr_t>(o) % 32 == 0 && reinterpret_cast<uintptr_t>(t) % 32 == 0) {
      stream_row<NR>(t, o, bias);
    } else {
      for (int64_t n = 0; n < nv; ++n) o[n] = bias ? t[n] + bias[n] : t[n];
    }
  }
}

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kGeneric;
}
#else
Isa detect_isa() { return Isa::kGeneric; }
#endif

// ------------------------------------------------------------------------------ tables
template <typename T, int PMR, int NR>
struct GenericOf {
  template <int MR>
  static void fn(const T* A, const int64_t* o, const int64_t* k, int n, const T* B, T* C, bool lc,
                 const Prefetch<T>& pf) {
    micro_generic<T, PMR, NR, MR>(A, o, k, n, B, C, lc, pf);
  }
};

// table[m] = Src::template fn<m> for m in 1..MR (table[0] unused), the rest null.
template <typename T, typename Src, int... Ms>
void fill(MicroKernel<T>* table, std::integer_sequence<int, Ms...>) {
  ((table[Ms + 1] = &Src::template fn<Ms + 1>), ...);
}

template <typename T>
Kernels<T> make_generic() {
  constexpr int NR = kNR256<T>;
  Kernels<T> k{Isa::kGeneric, kMR256, NR, {}, &pack_transposed_portable<T, NR>, &store_rows_portable<T, NR>,
               &pack_rows_portable<T, kMR256>, &pack_copy_portable<T, NR>, nullptr, nullptr, {}};
  fill<T, GenericOf<T, kMR256, NR>>(k.tile, std::make_integer_sequence<int, kMR256>{});
  return k;
}

#ifdef EFCN_HAVE_SIMD_PATHS
struct Avx2F32 {
  template <int MR>
  static void fn(const float* A, const int64_t* o, const int64_t* k, int n, const float* B, float* C, bool lc,
                 const Prefetch<float>& pf) {
    micro_avx2_f32<MR>(A, o, k, n, B, C, lc, pf);
  }
};
struct Avx2F64 {
  template <int MR>
  static void fn(const double* A, const int64_t* o, const int64_t* k, int n, const double* B, double* C, bool lc,
                 const Prefetch<double>& pf) {
    micro_avx2_f64<MR>(A, o, k, n, B, C, lc, pf);
  }
};
template <typename T>
struct Avx512 {
  template <int MR>
  static void fn(const T* A, const int64_t* o, const int64_t* k, int n, const T* B, T* C, bool lc,
                 const Prefetch<T>& pf) {
    micro_avx512<T, MR>(A, o, k, n, B, C, lc, pf);
  }
};

struct Avx512Bf16 {
  template <int MR>
  static void fn(const float* A, const int64_t* o, const int64_t* k, int n, const float* B, float* C, bool lc,
                 const Prefetch<float>& pf) {
    micro_avx512_bf16<MR>(A, o, k, n, B, C, lc, pf);
  }
};

template <typename T, int... Ms>
void fill_stream(Kernels<T>& k, std::integer_sequence<int, Ms...>) {
  ((k.tile_stream[Ms + 1] = &micro_avx512_stream<T, Ms + 1>), ...);
}

template <typename T, typename Src, int MR, int NR>
Kernels<T> make_simd(Isa isa) {
  Kernels<T> k{isa, MR, NR, {}, isa == Isa::kAvx512 ? &pack_transposed_avx512<T, NR> : &pack_transposed_simd<T, NR>,
               &store_rows_simd<T, NR>, &pack_rows_simd<T, MR>,
               isa == Isa::kAvx512 ? &pack_copy_avx512<T> : static_cast<PackCopy<T>>(&pack_copy_avx2<NR>),
               isa == Isa::kAvx512 ? &pack_chunks_avx512<T> : nullptr,
               isa == Isa::kAvx512 ? &gemv_avx512<T> : nullptr, {}};
  fill<T, Src>(k.tile, std::make_integer_sequence<int, MR>{});
  return k;
}

template <typename T>
Kernels<T> make_avx2();
template <>
Kernels<float> make_avx2<float>() { return make_simd<float, Avx2F32, kMR256, kNR256<float>>(Isa::kAvx2); }
template <>
Kernels<double> make_avx2<double>() { return make_simd<double, Avx2F64, kMR256, kNR256<double>>(Isa::kAvx2); }
template <typename T>
Kernels<T> make_avx512() {
  Kernels<T> k = make_simd<T, Avx512<T>, kMR512, kNR512<T>>(Isa::kAvx512);
  fill_stream<T>(k, std::make_integer_sequence<int, kMR512>{});
  return k;
}

Kernels<float> make_bf16_pairs() {
  Kernels<float> k = make_simd<float, Avx512Bf16, kMR512, kNR512<float>>(Isa::kAvx512);
  k.gemv = nullptr;
  return k;
}
#endif

// -1 until first use, then the active Isa
std::atomic<int> g_isa{-1};

}  // namespace

Isa best_isa() {
  static const Isa best = detect_isa();
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

Isa parse_isa(const char* name) {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric})
    if (std::strcmp(name, isa_name(isa)) == 0) return isa;
  throw std::invalid_argument(std::string("CPU ISA: expected one of avx512, avx2, generic, got '") + name + "'");
}

Isa set_isa(Isa want) {
  const Isa isa = static_cast<int>(want) < static_cast<int>(best_isa()) ? want : best_isa();
  g_isa.store(static_cast<int>(isa));
  return isa;
}

Isa active_isa() {
  const int cur = g_isa.load();
  if (cur >= 0) return static_cast<Isa>(cur);
  const char* env = std::getenv("EFCN_CPU_ISA");
  const Isa want = env && *env ? parse_isa(env) : best_isa();  // an unknown name: a clear error each call
  const Isa isa = static_cast<int>(want) < static_cast<int>(best_isa()) ? want : best_isa();
  int expected = -1;
  g_isa.compare_exchange_strong(expected, static_cast<int>(isa));  // set_isa() meanwhile wins
  return static_cast<Isa>(g_isa.load());
}

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T> generic = make_generic<T>();
#ifdef EFCN_HAVE_SIMD_PATHS
  static const Kernels<T> avx2 = make_avx2<T>();
  static const Kernels<T> avx512 = make_avx512<T>();
  switch (active_isa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: break;
  }
#endif
  return generic;
}

const Kernels<float>* bf16_pair_kernels() {
#ifdef EFCN_HAVE_SIMD_PATHS
  static const bool has_bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  static const Kernels<float> pairs = make_bf16_pairs();
  // the default: where VDPBF16PS should outrun float32 FMAs (AMD: 256-bit FMA pipes; not
  // measured); on this project's Intel Xeon it ran at ~60% of the FMA rate, so floats win there
  static const bool by_default = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  const char* env = std::getenv("EFCN_CPU_BF16_DOT");
  const bool want = env && *env ? std::strcmp(env, "0") != 0 : by_default;
  if (has_bf16 && want && active_isa() == Isa::kAvx512) return &pairs;
#endif
  return nullptr;
}

#ifdef EFCN_HAVE_SIMD_PATHS
namespace {
// 16 floats rounded to bfloat16 as ATen's vectorised conversion does (to nearest even, subnormals
// kept, NaN as 0xFFFF), one per 32-bit lane (low half). (Masked shifts with all lanes set: GCC 12
// warns about the unmasked ones' undefined source.)
__attribute__((target("avx512f"))) inline __m512i bf16_bits(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(0xFFFF, b, 16), _mm512_set1_epi32(1));
  const __m512i r =
      _mm512_maskz_srli_epi32(0xFFFF, _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __mmask16 lanes16(int64_t c) {
  return c >= 16 ? 0xFFFF : c <= 0 ? 0 : static_cast<__mmask16>((1u << c) - 1);
}

// 16 entries (masked) as float32: bfloat16 bits widened, or float32 rounded to bfloat16 first
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_as_bf16(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(m, _mm512_maskz_cvtepu16_epi32(m, _mm256_maskz_loadu_epi16(m, p)), 16));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_as_bf16(__mmask16 m, const float* p) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(m, bf16_bits(_mm512_maskz_loadu_ps(m, p)), 16));
}

template <typename S>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void as_bf16_rows(const S* src, int64_t ld, int64_t rows,
                                                                       int64_t cols, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r, src += ld, dst += ldd) {
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 k = lanes16(cols - c);
      _mm512_mask_storeu_ps(dst + c, k, load_as_bf16(k, src + c));
    }
  }
}
}  // namespace

__attribute__((target("avx512f,avx512bw,avx512vl"))) void store_rows_bf16(
    const float* tile, int nr, int rows, int64_t nv, uint16_t* out, int64_t ld, const uint16_t* bias) {
  for (int m = 0; m < rows; ++m) {
    const float* t = tile + m * nr;
    uint16_t* o = out + m * ld;
    for (int64_t n = 0; n < nv; n += 16) {
      const __mmask16 k = lanes16(nv - n);
      __m512 v = _mm512_maskz_loadu_ps(k, t + n);
      if (bias) {  // bfloat16 -> float: the 16 bits shifted into the top half
        const __m512i b = _mm512_maskz_cvtepu16_epi32(k, _mm256_maskz_loadu_epi16(k, bias + n));
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(k, b, 16)));
      }
      _mm256_mask_storeu_epi16(o + n, k, _mm512_maskz_cvtepi32_epi16(k, bf16_bits(v)));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void round_rows_bf16(const float* src, int64_t ld, int64_t rows,
                                                                          int64_t cols, uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r, src += ld, dst += ldd) {
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 k = lanes16(cols - c);
      _mm256_mask_storeu_epi16(dst + c, k, _mm512_maskz_cvtepi32_epi16(k, bf16_bits(_mm512_maskz_loadu_ps(k, src + c))));
    }
  }
}

void widen_bf16_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  as_bf16_rows(src, ld, rows, cols, dst, ldd);
}

void round_rows_f32(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  as_bf16_rows(src, ld, rows, cols, dst, ldd);
}

namespace {
// gemv_rows_avx512<float, R> with the weights read as bfloat16 (W: their bits, or float32 rounded
// as they are loaded): the same chains, so the same bits as on widened copies.
template <typename W, int R>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemv_rows_bf16(const W* const* w, const float* const* x,
                                                                         const int64_t* len, int nseg, int64_t ldw,
                                                                         float* out) {
  using Z = Zmm<float>;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = Z::zero();
  for (int s = 0; s < nseg; ++s) {
    const float* xs = x[s];
    const W* ws = w[s];
    const int64_t n = len[s];
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 m = lanes16(n - k);
      const __m512 xv = Z::load(m, xs + k);
      for (int r = 0; r < R; ++r) acc[r] = Z::fma(load_as_bf16(m, ws + r * ldw + k), xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = Z::sum(acc[r]);
}

template <typename W>
void gemv_bf16_impl(const W* const* w, const float* const* x, const int64_t* len, int nseg, int64_t rows, int64_t ldw,
                    float* out) {
  gemv_by_four(w, nseg, rows, ldw, out, [&](auto R, const W* const* wr, float* o) {
    gemv_rows_bf16<W, decltype(R)::value>(wr, x, len, nseg, ldw, o);
  });
}
}  // namespace

void gemv_bf16(const uint16_t* const* w, const float* const* x, const int64_t* len, int nseg, int64_t rows, int64_t ldw,
               float* out) {
  gemv_bf16_impl(w, x, len, nseg, rows, ldw, out);
}

void gemv_bf16(const float* const* w, const float* const* x, const int64_t* len, int nseg, int64_t rows, int64_t ldw,
               float* out) {
  gemv_bf16_impl(w, x, len, nseg, rows, ldw, out);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void pack_bf16_pairs_f32(
    const float* src, int64_t ld, int64_t rows, int64_t cols, int width, float* dst) {
  for (int64_t r = 0; r < rows; r += 2, src += 2 * ld, dst += width) {
    const float* s1 = r + 1 < rows ? src + ld : nullptr;
    for (int n = 0; n < width; n += 16) {
      const __mmask16 m = lanes16(cols - n);
      const __m512i a = bf16_bits(_mm512_maskz_loadu_ps(m, src + n));  // masked-off lanes: +0.0 -> 0
      const __m512i b = s1 ? bf16_bits(_mm512_maskz_loadu_ps(m, s1 + n)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(dst + n, lanes16(width - n), _mm512_or_si512(a, _mm512_maskz_slli_epi32(0xFFFF, b, 16)));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void pack_bf16_pairs(
    const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, int width, float* dst) {
  // a0 b0 a1 b1 ... a15 b15 from two registers (indices 32 and up: the second)
  alignas(64) static constexpr uint16_t kZip[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i zip = _mm512_load_si512(kZip);
  for (int64_t r = 0; r < rows; r += 2, src += 2 * ld, dst += width) {
    const uint16_t* s1 = r + 1 < rows ? src + ld : nullptr;
    for (int n = 0; n < width; n += 16) {
      const __mmask32 m = lanes16(cols - n);
      const __m512i a = _mm512_maskz_loadu_epi16(m, src + n);
      const __m512i b = s1 ? _mm512_maskz_loadu_epi16(m, s1 + n) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(dst + n, lanes16(width - n), _mm512_permutex2var_epi16(a, zip, b));
    }
  }
}
#else
void store_rows_bf16(const float*, int, int, int64_t, uint16_t*, int64_t, const uint16_t*) {}
void pack_bf16_pairs(const uint16_t*, int64_t, int64_t, int64_t, int, float*) {}
void round_rows_bf16(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {}
void pack_bf16_pairs_f32(const float*, int64_t, int64_t, int64_t, int, float*) {}
void widen_bf16_rows(const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t) {}
void gemv_bf16(const uint16_t* const*, const float* const*, const int64_t*, int, int64_t, int64_t, float*) {}
void gemv_bf16(const float* const*, const float* const*, const int64_t*, int, int64_t, int64_t, float*) {}
void round_rows_f32(const float*, int64_t, int64_t, int64_t, float*, int64_t) {}
#endif

void store_fence() {
#ifdef EFCN_HAVE_SIMD_PATHS
  _mm_sfence();
#endif
}

template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();

}  // namespace efcn_cpu
