"""The Triton kernels of the ``triton`` backend (launched from ``triton_bsr``).

One source for GPU and interpreter. Conventions shared by the three kernels:

* Block sides ``BR``, ``BC`` are padded to powers of two ``BRP``, ``BCP`` (>= 16, as ``tl.dot``
  needs); padded lanes, rows past ``M``/``N`` and batch rows past ``B`` are masked on load
  (read as 0) and on store, so no input is ever copied or padded in memory.
* Feature masks are compiled in only where needed (``EVEN_M``: M % BR == 0 and BR == BRP;
  likewise ``EVEN_N``): a mask that varies along the contiguous axis stops 16-byte vector loads
  and the cp.async/TMA pipelining that depends on them.
* Batch-times-features and block-times-block-size offsets are computed in int64.
* Loop variables over loaded bounds are cast with ``tl.cast`` (plain ints under the interpreter).
* The values may be float32 with half-precision activations (autocast's master weights): they
  are rounded to the activations' dtype as they are loaded, and a float32 dW is the
  half-precision result widened.
* Accumulation is float32; ``DOT_PREC`` is the ``input_precision`` of ``tl.dot`` ("ieee" for
  exact float32, "tf32" only when asked for). float64 (``ACC_F64``) never reaches ``tl.dot``,
  whose float64 lowering differs between Triton releases and GPUs: it takes ``_fma_outer``,
  rank-1 updates on the FMA units, with float64 accumulation.
* ``B_KEY`` and ``BPR_KEY`` are unused in the body: they are autotuning keys (batch bucket,
  blocks-per-row bucket).
"""

import triton
import triton.language as tl


@triton.jit
def _fma_outer(acc, a_ptrs, a_ok, a_step, b_ptrs, b_ok, b_step, K):
    """acc[p, q] += sum_{k < K} A[p, k] B[k, q] by rank-1 updates, where A[:, k] is at
    ``a_ptrs + k * a_step`` and B[k, :] at ``b_ptrs + k * b_step`` (the float64 path: no tl.dot)."""
    for k in range(0, K):
        k64 = tl.cast(k, tl.int64)
        a = tl.load(a_ptrs + k64 * a_step, mask=a_ok, other=0.0)
        b = tl.load(b_ptrs + k64 * b_step, mask=b_ok, other=0.0)
        acc += a.to(acc.dtype)[:, None] * b.to(acc.dtype)[None, :]
    return acc


@triton.jit
def bsr_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, crow_ptr, col_ptr,
    B, M, N, B_KEY, BPR_KEY,
    BR: tl.constexpr, BC: tl.constexpr, BRP: tl.constexpr, BCP: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Y[b, i*BR + r] = sum_k X[b, col_k*BC + c] W_k[r, c] + bias: one program per (block row, batch tile)."""
    pid = tl.program_id(0)
    n_btiles = tl.cdiv(B, BLOCK_B)
    i = pid // n_btiles  # consecutive programs share a block row, so its weights stay in L2
    bt = pid % n_btiles
    offs_b = bt * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * N
    rr = tl.arange(0, BRP)
    cc = tl.arange(0, BCP)
    wt_offs = rr[None, :] * BC + cc[:, None]  # W_k^T as a [BCP, BRP] tile
    wt_ok = (rr[None, :] < BR) & (cc[:, None] < BC)
    start = tl.load(crow_ptr + i)
    end = tl.load(crow_ptr + i + 1)
    acc = tl.zeros((BLOCK_B, BRP), dtype=tl.float64 if ACC_F64 else tl.float32)
    for k in range(start, end):
        k64 = tl.cast(k, tl.int64)
        if ACC_F64:
            col0 = tl.load(col_ptr + k64) * BC
            acc = _fma_outer(acc, x_ptr + offs_b.to(tl.int64) * N + col0, b_ok, 1,
                             w_ptr + k64 * (BR * BC) + rr * BC, rr < BR, 1, tl.minimum(BC, N - col0))
        else:
            cols = tl.load(col_ptr + k64) * BC + cc
            if EVEN_N:
                x = tl.load(x_rows + cols[None, :], mask=b_ok[:, None], other=0.0)
            else:
                x = tl.load(x_rows + cols[None, :], mask=b_ok[:, None] & ((cols < N) & (cc < BC))[None, :], other=0.0)
            if BR == BRP and BC == BCP:
                wt = tl.load(w_ptr + k64 * (BR * BC) + wt_offs)
            else:
                wt = tl.load(w_ptr + k64 * (BR * BC) + wt_offs, mask=wt_ok, other=0.0)
            # float32 master values with a half-precision x (autocast): rounded here, not copied
            acc = tl.dot(x, wt.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PREC)
    rows = i * BR + rr
    y_ptrs = y_ptr + offs_b.to(tl.int64)[:, None] * M + rows[None, :]
    if EVEN_M:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows).to(acc.dtype)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None])
    else:
        row_ok = (rows < M) & (rr < BR)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(acc.dtype)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & row_ok[None, :])


@triton.jit
def bsr_grad_input_kernel(
    dy_ptr, w_ptr, dx_ptr, ccol_ptr, trow_ptr, tperm_ptr,
    B, M, N, B_KEY, BPR_KEY,
    BR: tl.constexpr, BC: tl.constexpr, BRP: tl.constexpr, BCP: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_PREC: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """dX[b, j*BC + c] = sum_k dY[b, row_k*BR + r] W_{perm_k}[r, c]: one program per (block column, batch tile).

    Walks block column j through the transpose metadata; the block is read in place from
    ``values[t_perm[k]]``, never copied."""
    pid = tl.program_id(0)
    n_btiles = tl.cdiv(B, BLOCK_B)
    j = pid // n_btiles
    bt = pid % n_btiles
    offs_b = bt * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    dy_rows = dy_ptr + offs_b.to(tl.int64)[:, None] * M
    rr = tl.arange(0, BRP)
    cc = tl.arange(0, BCP)
    w_offs = rr[:, None] * BC + cc[None, :]
    w_ok = (rr[:, None] < BR) & (cc[None, :] < BC)
    start = tl.load(ccol_ptr + j)
    end = tl.load(ccol_ptr + j + 1)
    acc = tl.zeros((BLOCK_B, BCP), dtype=tl.float64 if ACC_F64 else tl.float32)
    for k in range(start, end):
        k64 = tl.cast(k, tl.int64)
        p = tl.load(tperm_ptr + k64).to(tl.int64)
        if ACC_F64:
            row0 = tl.load(trow_ptr + k64) * BR
            acc = _fma_outer(acc, dy_ptr + offs_b.to(tl.int64) * M + row0, b_ok, 1,
                             w_ptr + p * (BR * BC) + cc, cc < BC, BC, tl.minimum(BR, M - row0))
        else:
            rows = tl.load(trow_ptr + k64) * BR + rr
            if EVEN_M:
                dy = tl.load(dy_rows + rows[None, :], mask=b_ok[:, None], other=0.0)
            else:
                dy = tl.load(dy_rows + rows[None, :], mask=b_ok[:, None] & ((rows < M) & (rr < BR))[None, :], other=0.0)
            if BR == BRP and BC == BCP:
                w = tl.load(w_ptr + p * (BR * BC) + w_offs)
            else:
                w = tl.load(w_ptr + p * (BR * BC) + w_offs, mask=w_ok, other=0.0)
            acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc, input_precision=DOT_PREC)
    cols = j * BC + cc
    dx_ptrs = dx_ptr + offs_b.to(tl.int64)[:, None] * N + cols[None, :]
    if EVEN_N:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=b_ok[:, None])
    else:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=b_ok[:, None] & ((cols < N) & (cc < BC))[None, :])


@triton.jit
def bsr_grad_weight_kernel(
    dy_ptr, x_ptr, dw_ptr, row_ptr, col_ptr, mask_id_ptr, mask_pat_ptr,
    B, M, N, B_KEY,
    BR: tl.constexpr, BC: tl.constexpr, BRP: tl.constexpr, BCP: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, ACC_F64: tl.constexpr,
    ACCUMULATE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """dW_k[r, c] = sum_b dY[b, row_k*BR + r] X[b, col_k*BC + c], times the element mask:
    one program per stored block, reducing over the whole batch (deterministic, no atomics).
    ``ACCUMULATE``: dw += dW instead (dW rounded to dw's dtype first, as ``dw += grad_weight`` does)."""
    k64 = tl.program_id(0).to(tl.int64)
    rr = tl.arange(0, BRP)
    cc = tl.arange(0, BCP)
    bb = tl.arange(0, BLOCK_B)
    rows = tl.load(row_ptr + k64) * BR + rr
    cols = tl.load(col_ptr + k64) * BC + cc
    row_ok = (rows < M) & (rr < BR)  # used only when not EVEN_M
    col_ok = (cols < N) & (cc < BC)
    acc = tl.zeros((BRP, BCP), dtype=tl.float64 if ACC_F64 else tl.float32)
    if ACC_F64:
        acc = _fma_outer(acc, dy_ptr + rows, row_ok, M, x_ptr + cols, col_ok, N, B)
    else:
        for b0 in range(0, B, BLOCK_B):
            offs_b = tl.cast(b0, tl.int64) + bb
            b_ok = offs_b < B
            if EVEN_M:
                dyt = tl.load(dy_ptr + offs_b[None, :] * M + rows[:, None], mask=b_ok[None, :], other=0.0)
            else:
                dyt = tl.load(dy_ptr + offs_b[None, :] * M + rows[:, None], mask=row_ok[:, None] & b_ok[None, :],
                              other=0.0)
            if EVEN_N:
                x = tl.load(x_ptr + offs_b[:, None] * N + cols[None, :], mask=b_ok[:, None], other=0.0)
            else:
                x = tl.load(x_ptr + offs_b[:, None] * N + cols[None, :], mask=b_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(dyt, x, acc, input_precision=DOT_PREC)
    w_offs = rr[:, None] * BC + cc[None, :]
    w_ok = (rr[:, None] < BR) & (cc[None, :] < BC)
    full = BR == BRP and BC == BCP
    if HAS_MASK:
        pat = tl.load(mask_id_ptr + k64).to(tl.int64)
        if full:
            keep = tl.load(mask_pat_ptr + pat * (BR * BC) + w_offs)
        else:
            keep = tl.load(mask_pat_ptr + pat * (BR * BC) + w_offs, mask=w_ok, other=0)
        acc = tl.where(keep != 0, acc, 0.0)  # exact zeros, even where the sums are NaN
    # rounded to dy's dtype, then stored in dw's (float32 for autocast's master values: widened)
    out = acc.to(dy_ptr.dtype.element_ty).to(dw_ptr.dtype.element_ty)
    if full:
        if ACCUMULATE:
            out = (tl.load(dw_ptr + k64 * (BR * BC) + w_offs).to(acc.dtype) + out.to(acc.dtype)).to(out.dtype)
        tl.store(dw_ptr + k64 * (BR * BC) + w_offs, out)
    else:
        if ACCUMULATE:
            old = tl.load(dw_ptr + k64 * (BR * BC) + w_offs, mask=w_ok, other=0.0)
            out = (old.to(acc.dtype) + out.to(acc.dtype)).to(out.dtype)
        tl.store(dw_ptr + k64 * (BR * BC) + w_offs, out, mask=w_ok)
