// Device primitives of the BSR kernels: element types, checked global access, cp.async,
// ldmatrix and mma.sync. With EFCN_EMULATE the same names run on the CPU (emulate.h), which is
// how the kernels are tested on machines without a GPU; every global access goes through these
// helpers so that the emulator can bounds-check it.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef EFCN_EMULATE
#include "emulate.h"
#else
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace efcn_cuda {

#ifdef EFCN_EMULATE
using half_t = c10::Half;
using bf16_t = c10::BFloat16;
#define EFCN_DEV inline
#define EFCN_HD
#define EFCN_DYNAMIC_SMEM(name) unsigned char* name = ::efcn_emu::dynamic_smem()
#define EFCN_KERNEL_ASSERT(cond) ::efcn_emu::check((cond), #cond, __FILE__, __LINE__)
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
#define EFCN_DEV __device__ __forceinline__
#define EFCN_HD __host__ __device__
#define EFCN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define EFCN_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#endif

// ------------------------------------------------------------------ element types
// Acc: accumulator type; kTensorCore: 16-bit types run on mma.sync, the others on FMA units.
template <typename T>
struct Elem;

template <>
struct Elem<half_t> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  static constexpr bool kBf16 = false;
#ifdef EFCN_EMULATE
  static float to_acc(half_t v) { return static_cast<float>(v); }
  static half_t from_acc(float v) { return half_t(v); }
#else
  static EFCN_DEV float to_acc(half_t v) { return __half2float(v); }
  static EFCN_DEV half_t from_acc(float v) { return __float2half_rn(v); }
#endif
};

template <>
struct Elem<bf16_t> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  static constexpr bool kBf16 = true;
#ifdef EFCN_EMULATE
  static float to_acc(bf16_t v) { return static_cast<float>(v); }
  static bf16_t from_acc(float v) { return bf16_t(v); }
#else
  static EFCN_DEV float to_acc(bf16_t v) { return __bfloat162float(v); }
  static EFCN_DEV bf16_t from_acc(float v) { return __float2bfloat16_rn(v); }
#endif
};

template <>
struct Elem<float> {
  using Acc = float;
  static constexpr bool kTensorCore = false;
  static EFCN_DEV float to_acc(float v) { return v; }
  static EFCN_DEV float from_acc(float v) { return v; }
};

template <>
struct Elem<double> {
  using Acc = double;
  static constexpr bool kTensorCore = false;
  static EFCN_DEV double to_acc(double v) { return v; }
  static EFCN_DEV double from_acc(double v) { return v; }
};

// ------------------------------------------------------------------ global memory
template <typename T>
EFCN_DEV T ldg(const T* p) {
#ifdef EFCN_EMULATE
  efcn_emu::check_global(p, sizeof(T), false);
  return *p;
#else
  return __ldg(p);
#endif
}

template <typename T>
EFCN_DEV void stg(T* p, T v) {
#ifdef EFCN_EMULATE
  efcn_emu::check_global(p, sizeof(T), true);
#endif
  *p = v;
}

EFCN_DEV void stg16(void* p, uint4 v) {
#ifdef EFCN_EMULATE
  efcn_emu::check_global(p, 16, true);
  efcn_emu::check_aligned(p, 16);
#endif
  *reinterpret_cast<uint4*>(p) = v;
}

// ------------------------------------------------------------------ shared memory
EFCN_DEV uint4 lds16(const void* p) {
#ifdef EFCN_EMULATE
  efcn_emu::check_shared(p, 16);
#endif
  return *reinterpret_cast<const uint4*>(p);
}

EFCN_DEV void sts16(void* p, uint4 v) {
#ifdef EFCN_EMULATE
  efcn_emu::check_shared(p, 16);
#endif
  *reinterpret_cast<uint4*>(p) = v;
}

#ifndef EFCN_EMULATE
EFCN_DEV unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
#endif

// ------------------------------------------------------------------ cp.async (sm_80+)
// 16 bytes global -> shared, bypassing L1 (.cg): activations are reused across CTAs through L2.
EFCN_DEV void cp_async16(void* smem, const void* gmem) {
#ifdef EFCN_EMULATE
  efcn_emu::cp_async(smem, gmem, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
#endif
}

EFCN_DEV void cp_async_commit() {
#ifdef EFCN_EMULATE
  efcn_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
EFCN_DEV void cp_async_wait() {
#ifdef EFCN_EMULATE
  efcn_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ------------------------------------------------------------------ ldmatrix / mma.sync
// Four 8x8 b16 matrices; lanes 8i..8i+7 address the rows of matrix i (16-byte aligned rows).
EFCN_DEV void ldsm_x4(uint32_t (&r)[4], const void* smem) {
#ifdef EFCN_EMULATE
  efcn_emu::ldmatrix_x4(r, smem, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
#endif
}

// The same, each matrix transposed on the way (for operands stored with the other dimension contiguous).
EFCN_DEV void ldsm_x4_trans(uint32_t (&r)[4], const void* smem) {
#ifdef EFCN_EMULATE
  efcn_emu::ldmatrix_x4(r, smem, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
#endif
}

// d += a b for one m16n8k16 tile, float accumulators.
template <typename T>
EFCN_DEV void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef EFCN_EMULATE
  efcn_emu::mma_16816(d, a, b, Elem<T>::kBf16);
#else
  if constexpr (Elem<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

}  // namespace efcn_cuda
