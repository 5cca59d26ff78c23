// CPU emulation of the slice of CUDA that the kernels of this folder use (EFCN_EMULATE builds only).
//
// Why: the kernels must be checked on machines without a GPU. Compiled with EFCN_EMULATE, the
// unchanged kernel source runs on the CPU: every CUDA thread of a block is a coroutine
// (ucontext), scheduled round-robin and switched only at barriers, so a block's threads really
// interleave at __syncthreads and at warp-collective instructions. Emulated faithfully, from the
// PTX ISA: ldmatrix (.x4, .trans), mma.sync m16n8k16 (f16/bf16 -> f32 fragment layouts), and
// cp.async with commit/wait groups (a copy lands in shared memory only when a wait_group covers
// it, so a read that races ahead of its wait sees stale data). Checks, each a failed launch with a
// message: global accesses outside the registered tensors, shared accesses outside the dynamic
// allocation, barrier deadlock or divergence, cp.async left pending at exit, failed
// EFCN_KERNEL_ASSERTs. Shared memory starts as NaN (0xFF bytes) so stale reads propagate.
// Not emulated: timing, memory-model subtleties beyond barrier ordering, anything not used here.
#pragma once

#include <cuda_runtime_api.h>  // dim3, uint4, cudaStream_t: host-usable declarations only
#include <ucontext.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __launch_bounds__(...)
#define __syncthreads() ::efcn_emu::syncthreads()
#define threadIdx (::efcn_emu::cur().thread_idx)
#define blockIdx (::efcn_emu::blk().block_idx)
#define blockDim (::efcn_emu::state().block_dim)
#define gridDim (::efcn_emu::state().grid_dim)

namespace efcn_emu {

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Thread {
  ucontext_t ctx;
  dim3 thread_idx;
  int warp = 0, lane = 0;
  Wait wait = Wait::kNone;
  unsigned wait_gen = 0;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
};

struct Warp {
  int live = 0, arrived = 0;
  const char* kind = nullptr;  // the collective in flight: all lanes must be in the same one
  unsigned gen = 0;
  uint32_t in[32][8];   // lane inputs of the collective in flight
  const void* ptr[32];  // lane addresses (ldmatrix)
  uint32_t out[32][4];  // lane results, computed by the last lane to arrive
};

struct Block {
  dim3 block_idx;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int live = 0, arrived = 0;
  unsigned gen = 0;
};

struct Buffer {
  const char* lo;
  const char* hi;
  bool writable;
};

struct State {
  dim3 grid_dim, block_dim;
  Block* block = nullptr;
  Thread* thread = nullptr;
  ucontext_t scheduler;
  std::vector<unsigned char> smem;
  std::vector<Buffer> buffers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::string error;
};

inline State& state() {
  static State s;
  return s;
}
inline Thread& cur() { return *state().thread; }
inline Block& blk() { return *state().block; }

// Ends the calling thread with an error; the launch then fails with the message.
[[noreturn]] inline void fail(const std::string& msg) {
  State& s = state();
  if (s.error.empty()) s.error = msg;
  s.thread->wait = Wait::kDone;
  swapcontext(&s.thread->ctx, &s.scheduler);
  std::abort();  // never resumed
}

inline void check(bool ok, const char* what, const char* file, int line) {
  if (!ok) fail(std::string("kernel assertion failed: ") + what + " at " + file + ":" + std::to_string(line));
}

// Tensors the kernel may touch; accesses elsewhere fail the launch.
inline void register_buffer(const void* p, size_t bytes, bool writable) {
  const char* c = static_cast<const char*>(p);
  state().buffers.push_back({c, c + bytes, writable});
}
inline void clear_buffers() { state().buffers.clear(); }

inline std::string where(const void* p) {
  const State& s = state();
  char buf[160];
  std::snprintf(buf, sizeof buf, " at %p (block %u, thread %u)", p, s.block->block_idx.x, s.thread->thread_idx.x);
  return buf;
}

inline void check_global(const void* p, size_t bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (const Buffer& b : state().buffers)
    if (c >= b.lo && c + bytes <= b.hi) {
      if (write && !b.writable) fail("write to a read-only tensor" + where(p));
      return;
    }
  fail(std::string("out-of-bounds global ") + (write ? "write" : "read") + " of " + std::to_string(bytes) + " bytes" + where(p));
}

inline void check_shared(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const std::vector<unsigned char>& m = state().smem;
  if (m.empty() || c < m.data() || c + bytes > m.data() + m.size())
    fail("out-of-bounds shared access of " + std::to_string(bytes) + " bytes" + where(p));
  if (reinterpret_cast<uintptr_t>(c) % std::min<size_t>(bytes, 16) != 0) fail("misaligned shared access" + where(p));
}

inline unsigned char* dynamic_smem() { return state().smem.data(); }

// ---------------------------------------------------------------- barriers
inline void yield(Wait w, unsigned gen) {
  State& s = state();
  s.thread->wait = w;
  s.thread->wait_gen = gen;
  swapcontext(&s.thread->ctx, &s.scheduler);
}

inline void syncthreads() {
  Block& b = blk();
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  yield(Wait::kBlock, b.gen);
}

// Warp collective: every lane deposits its inputs, the last lane to arrive computes all results.
inline void warp_collective(const char* kind, const std::function<void(Warp&)>& compute) {
  Warp& w = blk().warps[cur().warp];
  if (w.live != 32) fail(std::string(kind) + " with a partial warp" + where(nullptr));
  if (w.arrived == 0) w.kind = kind;
  if (std::strcmp(w.kind, kind) != 0) fail(std::string("divergent warp: lanes in ") + w.kind + " and " + kind + where(nullptr));
  if (++w.arrived == w.live) {
    compute(w);
    w.arrived = 0;
    ++w.gen;
    return;
  }
  yield(Wait::kWarp, w.gen);
}

// ---------------------------------------------------------------- cp.async
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail("misaligned " + std::to_string(bytes) + "-byte global access" + where(p));
}

inline void cp_async(void* dst, const void* src, int bytes) {
  check_global(src, bytes, false);
  check_aligned(src, bytes);
  check_shared(dst, bytes);
  cur().open.push_back({dst, src, bytes});
}
inline void cp_async_commit() {
  Thread& t = cur();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}
inline void cp_async_wait(int pending) {
  Thread& t = cur();
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const Copy& c : t.groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    t.groups.erase(t.groups.begin());
  }
}

// ---------------------------------------------------------------- ldmatrix / mma
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i; lane l receives in register i the pair (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i,
// or with .trans the pair (rows 2(l%4), 2(l%4)+1, col l/4). Lower column/row in the low half.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  check_shared(p, 16);
  Warp& w = blk().warps[cur().warp];
  const int lane = cur().lane;
  w.ptr[lane] = p;
  warp_collective(trans ? "ldmatrix.trans" : "ldmatrix", [trans](Warp& w) {
    auto elem = [&](int mat, int row, int col) {
      uint16_t v;
      std::memcpy(&v, static_cast<const char*>(w.ptr[8 * mat + row]) + 2 * col, 2);
      return static_cast<uint32_t>(v);
    };
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        const int a = l / 4, b = 2 * (l % 4);
        w.out[l][i] = trans ? (elem(i, b, a) | elem(i, b + 1, a) << 16) : (elem(i, a, b) | elem(i, a, b + 1) << 16);
      }
  });
  for (int i = 0; i < 4; ++i) r[i] = w.out[lane][i];
}

inline float bits_to_float(uint16_t v, bool bf16) {
  return bf16 ? static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()))
              : static_cast<float>(c10::Half(v, c10::Half::from_bits()));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d = a b + d. Lane l, g = l/4,
// t = l%4. A (16x16): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..).
// B (16x8, k x n): b0 (2t..2t+1, g), b1 (2t+8.., g). C/D: d0,d1 (g, 2t..2t+1), d2,d3 (g+8, 2t..).
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  Warp& w = blk().warps[cur().warp];
  const int lane = cur().lane;
  for (int i = 0; i < 4; ++i) w.in[lane][i] = a[i];
  w.in[lane][4] = b[0];
  w.in[lane][5] = b[1];
  for (int i = 0; i < 4; ++i) std::memcpy(&w.out[lane][i], &d[i], 4);
  warp_collective("mma", [bf16](Warp& w) {
    float A[16][16], B[16][8], C[16][8];
    auto lo = [&](uint32_t v) { return bits_to_float(static_cast<uint16_t>(v & 0xFFFF), bf16); };
    auto hi = [&](uint32_t v) { return bits_to_float(static_cast<uint16_t>(v >> 16), bf16); };
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const uint32_t* in = w.in[l];
      for (int h = 0; h < 2; ++h) {  // h: k half (0..7 or 8..15)
        A[g][2 * t + 8 * h] = lo(in[2 * h]);
        A[g][2 * t + 1 + 8 * h] = hi(in[2 * h]);
        A[g + 8][2 * t + 8 * h] = lo(in[2 * h + 1]);
        A[g + 8][2 * t + 1 + 8 * h] = hi(in[2 * h + 1]);
        B[2 * t + 8 * h][g] = lo(in[4 + h]);
        B[2 * t + 1 + 8 * h][g] = hi(in[4 + h]);
      }
      float c[4];
      std::memcpy(c, w.out[l], 16);
      C[g][2 * t] = c[0];
      C[g][2 * t + 1] = c[1];
      C[g + 8][2 * t] = c[2];
      C[g + 8][2 * t + 1] = c[3];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      float r[4];
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float s = C[row][col];
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        r[i] = s;
      }
      std::memcpy(w.out[l], r, 16);
    }
  });
  std::memcpy(d, w.out[lane], 16);
}

// ---------------------------------------------------------------- launch
constexpr size_t kStackBytes = 256 * 1024;

inline std::function<void()>& kernel_body() {
  static std::function<void()> body;
  return body;
}

inline void thread_entry() {
  kernel_body()();
  Thread& t = cur();
  if (!t.open.empty() || !t.groups.empty()) fail("thread exits with cp.async copies not waited for" + where(nullptr));
  t.wait = Wait::kDone;
  swapcontext(&t.ctx, &state().scheduler);
}

// Runs one block to completion; returns false (with state().error set) when it failed.
inline bool run_block(Block& b) {
  State& s = state();
  s.block = &b;
  for (;;) {
    bool any = false, ran = false;
    for (Thread& t : b.threads) {
      if (t.wait == Wait::kDone) continue;
      any = true;
      const bool ready = t.wait == Wait::kNone || (t.wait == Wait::kBlock && b.gen != t.wait_gen) ||
                         (t.wait == Wait::kWarp && b.warps[t.warp].gen != t.wait_gen);
      if (!ready) continue;
      t.wait = Wait::kNone;
      s.thread = &t;
      swapcontext(&s.scheduler, &t.ctx);
      ran = true;
      if (!s.error.empty()) return false;
      if (t.wait == Wait::kDone) {  // exited: no one may be left waiting for it
        --b.live;
        --b.warps[t.warp].live;
        if (b.arrived > 0 || b.warps[t.warp].arrived > 0) {
          s.error = "a thread exited while others wait at a barrier (divergent barrier)" + where(nullptr);
          return false;
        }
      }
    }
    if (!any) return true;
    if (!ran) {
      s.error = "deadlock: the threads wait at different barriers";
      return false;
    }
  }
}

// Runs kernel(args...) over the grid, one block after another; throws std::runtime_error when
// the kernel fails a check.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A&&... args) {
  State& s = state();
  s.grid_dim = grid;
  s.block_dim = block;
  s.error.clear();
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024) throw std::runtime_error("emulated launch: bad block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("emulated launch: empty grid");
  while (static_cast<int>(s.stacks.size()) < nthreads) s.stacks.emplace_back(new char[kStackBytes]);
  kernel_body() = [&] { kernel(args...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.block_idx = dim3(bx, by, bz);
        b.threads.resize(nthreads);
        b.warps.resize((nthreads + 31) / 32);
        b.live = nthreads;
        s.smem.assign(smem_bytes, 0xFF);  // NaN in every float type: stale reads show
        for (int i = 0; i < nthreads; ++i) {
          Thread& t = b.threads[i];
          t.thread_idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          t.warp = i / 32;
          t.lane = i % 32;
          ++b.warps[t.warp].live;
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = s.stacks[i].get();
          t.ctx.uc_stack.ss_size = kStackBytes;
          t.ctx.uc_link = nullptr;
          makecontext(&t.ctx, thread_entry, 0);
        }
        const bool ok = run_block(b);
        s.block = nullptr;
        s.thread = nullptr;
        if (!ok) throw std::runtime_error("emulated kernel failed in block (" + std::to_string(bx) + ", " + std::to_string(by) + "): " + s.error);
      }
}

}  // namespace efcn_emu
