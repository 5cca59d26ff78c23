#!/usr/bin/env bash
# GPU check, one script for a GPU machine without network (see benchmarks/gpu_check.py):
# builds efcn_sparse there (C++/CUDA extension included), then checks parity of every GPU backend
# against the reference, runs compute-sanitizer on small cases, and times each op against cuDNN,
# the dense eFCN and torch.sparse BSR. The Markdown table comes last; logs go under $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh        # whole run, under 8 minutes
#   EFCN_GPU_CHECK_BUDGET_S=470                       # seconds from start to the Python deadline
#   EFCN_GPU_CHECK_ARGS=--smoke                       # extra gpu_check.py arguments (--smoke: CPU dry run)
#
# Exit status: 0 when every check passed, 1 when one failed, 2 when the build failed.
set -uo pipefail
START=$(date +%s)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
BUDGET="${EFCN_GPU_CHECK_BUDGET_S:-470}"
mkdir -p "$OUT"
cd "$REPO" || exit 2

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/efcn_triton_cache}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the package imports even if the install fails

say() { echo "[gpu_check.sh $(( $(date +%s) - START ))s] $*"; }

{
  date -u
  nvidia-smi || true
  nvcc --version || true
  command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" || true
  python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git -C "$REPO" log -1 --oneline 2>/dev/null || true
  git -C "$REPO" status --short 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
say "environment in $OUT/env.txt"

# ---------------------------------------------------------------- build (into the Python that has torch)
# The running python3 is used as it is: on the GPU machine it is itself a virtual environment
# that has torch (a --system-site-packages venv made from it would see none), so no venv is made.
# Only a system Python marked externally managed (PEP 668) needs pip's --break-system-packages.
PY=python3
PIP_EXTRA=()
if ! python3 -c "import torch" >"$OUT/venv.log" 2>&1; then
  say "python3 cannot import torch (see $OUT/venv.log): the build will fail; checks run what imports"
elif python3 -c "import os, sys, sysconfig; sys.exit(sys.prefix != sys.base_prefix or not os.path.exists(
    os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"; then
  PIP_EXTRA=(--break-system-packages)
fi
say "python: $(command -v "$PY") ($("$PY" -c 'import sys, torch; print(sys.prefix, "torch", torch.__version__)' 2>&1))"
BUILD_RC=0
say "building: pip install -e . (log $OUT/build.log, -v keeps ptxas -v register and spill lines)"
timeout 300 "$PY" -m pip install -v -e . --no-build-isolation --no-deps "${PIP_EXTRA[@]}" >"$OUT/build.log" 2>&1 || BUILD_RC=$?
if [ "$BUILD_RC" != 0 ] && [ "$BUILD_RC" != 124 ] && ! grep -q "ninja: build stopped\|error: command" "$OUT/build.log"; then
  say "pip install failed (rc=$BUILD_RC) before compiling; trying setup.py build_ext --inplace"
  BUILD_RC=0
  timeout 300 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || BUILD_RC=$?
fi
if [ "$BUILD_RC" != 0 ]; then
  say "BUILD FAILED (rc=$BUILD_RC); continuing with the Python and Triton backends. Tail of the log:"
  tail -n 25 "$OUT/build.log"
else
  say "build ok"
fi
grep -E "[1-9][0-9]* bytes spill (stores|loads)" -B2 "$OUT/build.log" >"$OUT/spills.txt" 2>/dev/null
if [ -s "$OUT/spills.txt" ]; then
  say "register spills in CUDA kernels: $(grep -c 'bytes spill' "$OUT/spills.txt") line(s), see $OUT/spills.txt"
else
  say "no register spills reported by ptxas (or no CUDA sources compiled)"
fi

# ---------------------------------------------------------------- checks and timings (table printed last)
say "running benchmarks/gpu_check.py (log $OUT/gpu_check.log)"
# shellcheck disable=SC2086
"$PY" benchmarks/gpu_check.py --out "$OUT" --deadline "$(( START + BUDGET ))" ${EFCN_GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT/gpu_check.log"
RC=${PIPESTATUS[0]}
if [ "$BUILD_RC" != 0 ]; then exit 2; fi
exit "$RC"
