// Large CPU buffers for the BSR ops (bsr_cpu.cpp), recycled between calls.
//
// A fresh allocation of many megabytes costs one page fault per page, each page zeroed by the
// kernel: up to a quarter of grad_weight's time (its output is as large as the weights), and a
// few percent of the other ops' (their outputs and packed operands). A training step requests
// the same sizes every iteration, so buffers of at least 4 MiB come from a pool: 2 MiB aligned,
// backed by transparent huge pages where available, and kept when released (at most
// EFCN_CPU_POOL_MIB MiB idle in all, default 2048, oldest dropped first; 0 keeps nothing) for the
// next request of the same size, rounded up to 2 MiB. The tensors are ordinary resizable CPU
// tensors. Sanitized builds keep nothing, so that AddressSanitizer sees every free.
#pragma once

#include <ATen/core/Tensor.h>

namespace efcn_cpu {

// at::empty(sizes, dtype) on the CPU, from the pool when large.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Bytes held idle by the pool now (for tests and diagnostics).
size_t pool_idle_bytes();

}  // namespace efcn_cpu
