// Torch glue of the CUDA kernels: precondition checks, output allocation, device guard and
// current stream; registers the efcn_sparse_C ops (schemas in csrc/ops.cpp) for the CUDA key.
//
// Contract (efcn_sparse/kernels/reference.py): x [B, N], dy [B, M] contiguous, of the values'
// dtype; values [nnzb, BR, BC] contiguous; index tensors int32, 1-D, on the same device. The
// index values themselves are trusted to form a valid layout (BSRLayout.validate() checks them);
// the kernels still assert that every index they use is in range.
//
// With EFCN_EMULATE the same functions take CPU tensors and run the kernels on the CPU emulator
// (csrc/cuda/emulate); then only the registration at the bottom is left out.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "bsr_cuda.h"

#ifndef EFCN_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace efcn_cuda {
namespace {

#ifdef EFCN_EMULATE
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

// Registers the tensors of one launch with the emulator's bounds checks, for its duration.
struct Launch {
  explicit Launch(const at::Tensor& t) { (void)t; }
  ~Launch() { efcn_emu::clear_buffers(); }
  cudaStream_t stream() const { return nullptr; }
  void reads(const at::Tensor& t) const {
    if (t.defined() && t.numel() > 0) efcn_emu::register_buffer(t.data_ptr(), t.nbytes(), false);
  }
  void writes(at::Tensor& t) const {  // poisoned, so that entries the kernel skips show
    if (t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
    updates(t);
  }
  void updates(const at::Tensor& t) const {  // read and written: not poisoned
    if (t.numel() > 0) efcn_emu::register_buffer(t.data_ptr(), t.nbytes(), true);
  }
};
#else
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;

// Device guard and current stream of the launch's device.
struct Launch {
  explicit Launch(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  void reads(const at::Tensor&) const {}
  void writes(at::Tensor&) const {}
  void updates(const at::Tensor&) const {}
};
#endif

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool supported_dtype(c10::ScalarType s) {
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

// Raises for a dtype the kernels do not take. Every entry point calls it before anything reads
// the dtype, so that dtype_of below never sees another one.
void check_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(supported_dtype(t.scalar_type()), "efcn_sparse cuda backend: unsupported dtype ",
              c10::toString(t.scalar_type()), " of ", name, " (float16, bfloat16, float32 and float64 are)");
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kDouble;
    default: return DType::kFloat;  // kFloat; check_dtype has refused the others
  }
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device().type() == kDevice, "efcn_sparse cuda backend: ", name, " must be a ", c10::DeviceTypeName(kDevice),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "efcn_sparse cuda backend: ", name, " is on ", t.device(), ", the other operands on ",
              ref.device());
}

// A dense operand [batch, cols] of the given dtype.
void check_dense(const at::Tensor& t, const char* name, const at::Tensor& ref, c10::ScalarType dtype) {
  check_device(t, name, ref);
  TORCH_CHECK(t.dim() == 2, "efcn_sparse cuda backend: ", name, " must be 2-D [batch, features], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "efcn_sparse cuda backend: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), "efcn_sparse cuda backend: ", name, " must be contiguous");
}

void check_index(const at::Tensor& t, const char* name, int64_t numel, const at::Tensor& ref) {
  check_device(t, name, ref);
  TORCH_CHECK(t.scalar_type() == at::kInt, "efcn_sparse cuda backend: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "efcn_sparse cuda backend: ", name, " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.numel() == numel, "efcn_sparse cuda backend: ", name, " has ", t.numel(), " entries, expected ", numel);
}

// values [nnzb, BR, BC]; returns (BR, BC).
std::pair<int64_t, int64_t> check_values(const at::Tensor& values) {
  TORCH_CHECK(values.device().type() == kDevice, "efcn_sparse cuda backend: values must be a ", c10::DeviceTypeName(kDevice),
              " tensor, got one on ", values.device());
  TORCH_CHECK(values.dim() == 3, "efcn_sparse cuda backend: values must be [nnzb, BR, BC], got shape ", values.sizes());
  TORCH_CHECK(values.is_contiguous(), "efcn_sparse cuda backend: values must be contiguous");
  check_dtype(values, "values");
  const int64_t BR = values.size(1), BC = values.size(2);
  TORCH_CHECK(BR > 0 && BC > 0 && BR <= kIntMax && BC <= kIntMax, "efcn_sparse cuda backend: bad block shape ", values.sizes());
  TORCH_CHECK(values.size(0) <= kIntMax, "efcn_sparse cuda backend: more blocks than int32 indices address");
  return {BR, BC};
}

at::Tensor bsr_forward(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                       const at::Tensor& crow_ptr, const at::Tensor& col_idx, const at::Tensor& row_idx, int64_t M) {
  const auto [BR, BC] = check_values(values);
  check_dense(x, "x", values, values.scalar_type());
  const int64_t nnzb = values.size(0), B = x.size(0), N = x.size(1);
  TORCH_CHECK(M >= 0, "efcn_sparse cuda backend: negative M ", M);
  const int64_t lines = cdiv(M, BR);
  TORCH_CHECK(lines <= kIntMax, "efcn_sparse cuda backend: too many block rows");
  check_index(crow_ptr, "crow_ptr", lines + 1, values);
  check_index(col_idx, "col_idx", nnzb, values);
  check_index(row_idx, "row_idx", nnzb, values);
  if (bias.has_value()) {
    check_device(*bias, "bias", values);
    TORCH_CHECK(bias->scalar_type() == values.scalar_type(), "efcn_sparse cuda backend: bias has dtype ", bias->scalar_type(),
                ", expected ", values.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == M && bias->is_contiguous(),
                "efcn_sparse cuda backend: bias must be a contiguous [M] tensor, M = ", M, ", got shape ", bias->sizes());
  }
  at::Tensor y = at::empty({B, M}, x.options());
  if (B == 0 || M == 0) return y;
  TORCH_CHECK(N > 0, "efcn_sparse cuda backend: x has no features but M = ", M);
  Launch launch(x);
  launch.reads(x), launch.reads(values), launch.reads(crow_ptr), launch.reads(col_idx);
  if (bias.has_value()) launch.reads(*bias);
  launch.writes(y);
  SpmmParams p;
  p.a = x.data_ptr();
  p.w = values.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = y.data_ptr();
  p.ptr = crow_ptr.data_ptr<int32_t>();
  p.a_blk = col_idx.data_ptr<int32_t>();
  p.batch = B, p.lda = N, p.ldo = M, p.nnzb = nnzb;
  p.kb = static_cast<int>(BC), p.nb = static_cast<int>(BR);
  p.a_blocks = cdiv(N, BC);
  p.lines = static_cast<int>(lines);
  launch_forward(p, dtype_of(values), launch.stream());
  return y;
}

at::Tensor bsr_grad_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ccol_ptr,
                          const at::Tensor& t_row_idx, const at::Tensor& t_perm, int64_t N) {
  const auto [BR, BC] = check_values(values);
  check_dense(dy, "dy", values, values.scalar_type());
  const int64_t nnzb = values.size(0), B = dy.size(0), M = dy.size(1);
  TORCH_CHECK(N >= 0, "efcn_sparse cuda backend: negative N ", N);
  const int64_t lines = cdiv(N, BC);
  TORCH_CHECK(lines <= kIntMax, "efcn_sparse cuda backend: too many block columns");
  check_index(ccol_ptr, "ccol_ptr", lines + 1, values);
  check_index(t_row_idx, "t_row_idx", nnzb, values);
  check_index(t_perm, "t_perm", nnzb, values);
  at::Tensor dx = at::empty({B, N}, dy.options());
  if (B == 0 || N == 0) return dx;
  TORCH_CHECK(M > 0, "efcn_sparse cuda backend: dy has no features but N = ", N);
  Launch launch(dy);
  launch.reads(dy), launch.reads(values), launch.reads(ccol_ptr), launch.reads(t_row_idx), launch.reads(t_perm);
  launch.writes(dx);
  SpmmParams p;
  p.a = dy.data_ptr();
  p.w = values.data_ptr();
  p.out = dx.data_ptr();
  p.ptr = ccol_ptr.data_ptr<int32_t>();
  p.a_blk = t_row_idx.data_ptr<int32_t>();
  p.w_perm = t_perm.data_ptr<int32_t>();
  p.batch = B, p.lda = M, p.ldo = N, p.nnzb = nnzb;
  p.kb = static_cast<int>(BR), p.nb = static_cast<int>(BC);
  p.a_blocks = cdiv(M, BR);
  p.lines = static_cast<int>(lines);
  launch_grad_input(p, dtype_of(values), launch.stream());
  return dx;
}

// dW into `dw` (accumulate: dw += dW), after the checks every grad_weight entry point shares.
void grad_weight_into(at::Tensor& dw, bool accumulate, const at::Tensor& dy, const at::Tensor& x,
                      const at::Tensor& row_idx, const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                      const std::optional<at::Tensor>& mask_patterns, int64_t BR, int64_t BC) {
  TORCH_CHECK(dy.device().type() == kDevice, "efcn_sparse cuda backend: dy must be a ", c10::DeviceTypeName(kDevice),
              " tensor, got one on ", dy.device());
  check_dtype(dy, "dy");
  check_dense(dy, "dy", dy, dy.scalar_type());
  check_dense(x, "x", dy, dy.scalar_type());
  TORCH_CHECK(dy.size(0) == x.size(0), "efcn_sparse cuda backend: dy and x differ in batch: ", dy.size(0), " vs ", x.size(0));
  TORCH_CHECK(BR > 0 && BC > 0 && BR <= kIntMax && BC <= kIntMax, "efcn_sparse cuda backend: bad block shape (", BR, ", ", BC, ")");
  const int64_t nnzb = row_idx.numel(), B = dy.size(0), M = dy.size(1), N = x.size(1);
  TORCH_CHECK(nnzb <= kIntMax, "efcn_sparse cuda backend: more blocks than int32 indices address");
  check_index(row_idx, "row_idx", nnzb, dy);
  check_index(col_idx, "col_idx", nnzb, dy);
  TORCH_CHECK(mask_ids.has_value() == mask_patterns.has_value(),
              "efcn_sparse cuda backend: mask_ids and mask_patterns must be given together");
  if (mask_ids.has_value()) {
    check_index(*mask_ids, "mask_ids", nnzb, dy);
    const at::Tensor& mp = *mask_patterns;
    check_device(mp, "mask_patterns", dy);
    TORCH_CHECK(mp.scalar_type() == at::kBool && mp.dim() == 3 && mp.size(1) == BR && mp.size(2) == BC && mp.is_contiguous(),
                "efcn_sparse cuda backend: mask_patterns must be a contiguous bool [n, ", BR, ", ", BC, "] tensor, got ",
                mp.scalar_type(), " ", mp.sizes());
  }
  check_device(dw, "out", dy);
  TORCH_CHECK(dw.scalar_type() == dy.scalar_type() && dw.dim() == 3 && dw.size(0) == nnzb && dw.size(1) == BR &&
                  dw.size(2) == BC && dw.is_contiguous(),
              "efcn_sparse cuda backend: out must be a contiguous ", dy.scalar_type(), " [", nnzb, ", ", BR, ", ", BC,
              "] tensor, got ", dw.scalar_type(), " ", dw.sizes());
  if (nnzb == 0) return;
  if (B == 0) {
    if (!accumulate) dw.zero_();
    return;
  }
  TORCH_CHECK(M > 0 && N > 0, "efcn_sparse cuda backend: dy [B, M] and x [B, N] must have features, got ", dy.sizes(), " and ",
              x.sizes());
  Launch launch(dy);
  launch.reads(dy), launch.reads(x), launch.reads(row_idx), launch.reads(col_idx);
  if (mask_ids.has_value()) launch.reads(*mask_ids), launch.reads(*mask_patterns);
  if (accumulate) {
    launch.updates(dw);
  } else {
    launch.writes(dw);
  }
  GwParams p;
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.out = dw.data_ptr();
  p.row_idx = row_idx.data_ptr<int32_t>();
  p.col_idx = col_idx.data_ptr<int32_t>();
  if (mask_ids.has_value()) {
    p.mask_ids = mask_ids->data_ptr<int32_t>();
    p.mask = reinterpret_cast<const uint8_t*>(mask_patterns->data_ptr<bool>());
    p.n_patterns = mask_patterns->size(0);
  }
  p.batch = B, p.M = M, p.N = N, p.nnzb = nnzb;
  p.BR = static_cast<int>(BR), p.BC = static_cast<int>(BC);
  p.accumulate = accumulate;
  launch_grad_weight(p, dtype_of(dy), launch.stream());
}

at::Tensor bsr_grad_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx, const at::Tensor& col_idx,
                           const std::optional<at::Tensor>& mask_ids, const std::optional<at::Tensor>& mask_patterns,
                           int64_t BR, int64_t BC) {
  check_dtype(dy, "dy");
  at::Tensor dw = at::empty({row_idx.numel(), BR, BC}, dy.options());
  grad_weight_into(dw, false, dy, x, row_idx, col_idx, mask_ids, mask_patterns, BR, BC);
  return dw;
}

void bsr_grad_weight_acc(at::Tensor& out, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_idx,
                         const at::Tensor& col_idx, const std::optional<at::Tensor>& mask_ids,
                         const std::optional<at::Tensor>& mask_patterns) {
  TORCH_CHECK(out.dim() == 3, "efcn_sparse cuda backend: out must be [nnzb, BR, BC], got shape ", out.sizes());
  grad_weight_into(out, true, dy, x, row_idx, col_idx, mask_ids, mask_patterns, out.size(1), out.size(2));
}

}  // namespace
}  // namespace efcn_cuda

#ifndef EFCN_EMULATE
TORCH_LIBRARY_IMPL(efcn_sparse_C, CUDA, m) {
  m.impl("bsr_forward", &efcn_cuda::bsr_forward);
  m.impl("bsr_grad_input", &efcn_cuda::bsr_grad_input);
  m.impl("bsr_grad_weight", &efcn_cuda::bsr_grad_weight);
  m.impl("bsr_grad_weight_acc", &efcn_cuda::bsr_grad_weight_acc);
}
#endif
