"""Compile the Triton kernels for a GPU architecture without a GPU (ahead of time).

The interpreter only emulates the kernels; this runs the real compiler (frontend, layouts,
software pipelining, ptxas) so CI on a CPU machine catches what only a GPU build would, and reads
shared memory, registers and spills off the result. It needs the kernels as JIT functions, so it
must run in a process where ``TRITON_INTERPRET`` is unset:

    python -m efcn_sparse.kernels.triton_aot            # one JSON line per compiled case
    python -m efcn_sparse.kernels.triton_aot 90 fp64    # the float64 (FMA) cases for sm_90
    python -m efcn_sparse.kernels.triton_aot 90 autocast  # bfloat16 activations, float32 values
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from . import triton_bsr as tb

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_INDEX_PTRS = {"crow_ptr", "col_ptr", "ccol_ptr", "trow_ptr", "tperm_ptr", "row_ptr", "mask_id_ptr"}
_KERNELS = {"forward": "bsr_forward_kernel", "grad_input": "bsr_grad_input_kernel", "grad_weight": "bsr_grad_weight_kernel"}

# (kind, dtype, block shape, M, N, batch): the reference layer's shapes, and masked odd ones
DEFAULT_CASES = [(k, torch.bfloat16, (64, 64), 65536, 65536, 256) for k in _KERNELS] + [
    (k, torch.float32, (80, 48), 1000, 700, 33) for k in _KERNELS]
# float64 takes the FMA path (no tl.dot): aligned and masked odd shapes
FLOAT64_CASES = [(k, torch.float64, (64, 64), 4096, 4096, 256) for k in _KERNELS] + [
    (k, torch.float64, (24, 20), 1000, 700, 33) for k in _KERNELS]
# autocast: bfloat16 activations with float32 master values (rounded as loaded; float32 dW)
AUTOCAST_CASES = [(k, torch.bfloat16, (64, 64), 65536, 65536, 256, torch.float32) for k in _KERNELS] + [
    (k, torch.bfloat16, (80, 48), 1000, 700, 33, torch.float32) for k in _KERNELS]


def compile_case(kind, dtype, block_shape, M, N, batch, values_dtype=None, cc=90, config=None, ptxas=True) -> dict:
    """Compile one kernel specialisation as a launch of these sizes would; return its resources.

    ``values_dtype``: the values' (and dW's) dtype when it is not the activations' ``dtype``.

    ``config``: dict(BLOCK_B, num_warps, num_stages), default the heuristic launch's. Integers
    divisible by 16 and all pointers are marked 16-divisible, as Triton's launcher does.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if tb.interpreted():
        raise RuntimeError("triton_aot needs compiled kernels: unset TRITON_INTERPRET")
    from . import triton_bsr_kernels as tk

    fn = getattr(tk, _KERNELS[kind])
    BR, BC = block_shape
    BRP, BCP = tb._side(BR), tb._side(BC)
    values_dtype = values_dtype or dtype
    staged = values_dtype if values_dtype.itemsize > dtype.itemsize else dtype  # as triton_bsr._staged
    meta = dict(config or tb._heuristic(kind, batch, BRP, BCP, staged))
    consts = dict(BR=BR, BC=BC, BRP=BRP, BCP=BCP, **tb._even(M, N, BR, BC), DOT_PREC=tb._dot_prec(dtype),
                  ACC_F64=dtype == torch.float64, BLOCK_B=meta["BLOCK_B"], HAS_BIAS=True, HAS_MASK=True,
                  ACCUMULATE=False)
    ints = dict(B=batch, M=M, N=N, B_KEY=min(tb._pow2(batch), 4096), BPR_KEY=8)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            elem = values_dtype if name in ("w_ptr", "dw_ptr") else dtype
            sig[name] = "*i32" if name in _INDEX_PTRS else "*u8" if name == "mask_pat_ptr" else "*" + _TRITON_TYPES[elem]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, {k: v for k, v in consts.items() if k in sig}, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=meta["num_warps"], num_stages=meta["num_stages"]))
    ptx = k.asm["ptx"]
    out = dict(kind=kind, dtype=_TRITON_TYPES[dtype], values_dtype=_TRITON_TYPES[values_dtype],
               block_shape=list(block_shape), M=M, N=N, batch=batch, cc=cc,
               **meta, shared_bytes=k.metadata.shared,
               # tiles pipelined through shared memory in 16-byte asynchronous copies
               cp_async_16B=len(re.findall(r"cp\.async\.\w+\.shared\.global.*, 0x10", ptx)),
               mma=len(re.findall(r"^\s*(?:wg)?mma\.", ptx, re.M)),  # tensor-core instructions (mma.sync, wgmma)
               vector_stores=len(re.findall(r"st\.global\.v[248]", ptx)))
    if ptxas:
        out.update(_ptxas_info(ptx, cc))
    return out


def _ptxas_info(ptx: str, cc: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (Triton's bundled ptxas)."""
    import triton

    try:
        exe = triton.knobs.nvidia.ptxas.path
    except AttributeError:  # older triton: the bundled binary
        exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        r = subprocess.run([exe, f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return dict(registers=int(regs.group(1)) if regs else None, spill_bytes=sum(spills) if spills else None,
                ptxas_ok=r.returncode == 0)


def main(argv=None) -> int:
    """Arguments: compute capabilities (default 90 80); ``fp64`` compiles the float64 cases instead,
    ``autocast`` the bfloat16-activation, float32-values ones."""
    args = argv or sys.argv[1:]
    ccs = [int(c) for c in args if c.isdigit()] or [90, 80]
    cases = FLOAT64_CASES if "fp64" in args else AUTOCAST_CASES if "autocast" in args else DEFAULT_CASES
    for cc in ccs:
        for case in cases:
            print(json.dumps(compile_case(*case, cc=cc)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
