// The buffer pool declared in buffer_pool.h.
#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <string>
#include <sys/mman.h>

#include "microkernel.h"  // EFCN_ASAN

namespace efcn_cpu {
namespace {

constexpr size_t kHuge = size_t{2} << 20;
constexpr size_t kMinBytes = 2 * kHuge;  // smaller buffers: at::empty (malloc recycles those itself)

size_t max_idle_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("EFCN_CPU_POOL_MIB");
    if (!env || !*env) return size_t{2048} << 20;
    char* end = nullptr;
    const long long mib = std::strtoll(env, &end, 10);
    TORCH_CHECK(end && *end == 0 && mib >= 0, "EFCN_CPU_POOL_MIB: expected a number of MiB >= 0, got '", env, "'");
    return static_cast<size_t>(mib) << 20;
  }();
#ifdef EFCN_ASAN
  (void)bytes;  // checked all the same
  return 0;
#else
  return bytes;
#endif
}

struct Block {
  void* ptr;
  size_t bytes;
};

class Pool {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->bytes == bytes) {
          void* p = it->ptr;
          idle_bytes_ -= bytes;
          idle_.erase(it);
          return p;
        }
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, bytes) != 0 || !p) {
      // idle buffers of other sizes may be what is missing
      drop_idle(0);
      TORCH_CHECK(posix_memalign(&p, kHuge, bytes) == 0 && p, "efcn_sparse CPU kernels: out of memory allocating ",
                  bytes, " bytes");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: nothing changes where THP is off
#endif
    return p;
  }

  void give(void* p, size_t bytes) {
    const size_t cap = max_idle_bytes();
    if (bytes > cap) {
      std::free(p);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back({p, bytes});
    idle_bytes_ += bytes;
    while (idle_bytes_ > cap) {
      std::free(idle_.front().ptr);
      idle_bytes_ -= idle_.front().bytes;
      idle_.pop_front();
    }
  }

  void drop_idle(size_t keep) {
    std::lock_guard<std::mutex> lock(mu_);
    while (idle_bytes_ > keep && !idle_.empty()) {
      std::free(idle_.front().ptr);
      idle_bytes_ -= idle_.front().bytes;
      idle_.pop_front();
    }
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return idle_bytes_;
  }

 private:
  std::mutex mu_;
  std::deque<Block> idle_;  // oldest first
  size_t idle_bytes_ = 0;
};

// Never destroyed: tensors may be released during interpreter shutdown, after static destructors.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  pool().give(b->ptr, b->bytes);
  delete b;
}

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max(n, size_t{1}) + kHuge - 1) / kHuge * kHuge;
    void* p = pool().take(bytes);
    return {p, new Block{p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (static_cast<size_t>(numel) * c10::elementSize(dtype) < kMinBytes)
    return at::empty(sizes, at::TensorOptions().dtype(dtype));
  max_idle_bytes();  // a bad EFCN_CPU_POOL_MIB fails here, never in a buffer's release
  static PoolAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

size_t pool_idle_bytes() { return pool().idle_bytes(); }

}  // namespace efcn_cpu
