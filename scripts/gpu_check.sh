#!/usr/bin/env bash
# The one prepared GPU check (issue 15 §3) for an H100/H200-class machine that brings only CUDA torch + triton.
# One command, under 10 minutes (the device tool's limit per command): the stage caps sum to 480 s.
#
#   scripts/gpu_check.sh            (or: make gpu-check)
#   OUT=/some/dir scripts/gpu_check.sh
#
# Stages (each capped; every stage runs even when an earlier one failed):
#   0. deps        pytest, numpy, safetensors present? else pip install them (a GPU box may have no internet:
#                  then it says which are missing and skips only the stages that need them)     cap  ${GPU_CHECK_DEPS_S:-20} s
#   1. ops-tests   ALL of tests/ops on CUDA: every kernel compiled (not interpreted) vs ops/reference.py on odd
#                  shapes in fp32, fp16 and bf16, both attention backwards, the whole model with every
#                  kernel vs the reference model, and the `gpu`-marked bf16 tests           cap ${GPU_CHECK_OPS_S:-130} s
#   2. train-gpu   tests/train/test_train_gpu.py: bf16 + fused AdamW runs with MFU from the peak table,
#                  use_all (split and atomic dQ) trained 8 steps vs 4 + resume + 4, activation checkpointing
#                                                                                             cap ${GPU_CHECK_TRAIN_S:-60} s
#   3. kernels     z2all bench kernels (attention first: split vs atomic-dQ backward vs SDPA flash/cuDNN)
#                                                                                             cap ${GPU_CHECK_KERNELS_S:-150} s
#   4. ablation    z2all bench ablation --short (the seed's table: naive, sdpa, use_all, w/o each op, compile)
#                                                                                             cap ${GPU_CHECK_ABLATION_S:-120} s
#
# Nothing is lost to a cap: every table row is appended (and flushed) to its file under $OUT the moment it is
# measured, pytest and the benchmarks run unbuffered into <stage>.log, and summary.md gets one line per
# stage as it ends (exit status, seconds, whether it hit its cap) plus the total. Files in $OUT (default
# runs/gpu-check/<timestamp>/, git-ignored): summary.md, kernels.md, ablation.md, <stage>.log, nvidia-smi.txt.
# Exit status: 0 only when every stage ran and passed.
# Python: $PY, else .venv/bin/python, else python3 (the repo goes on PYTHONPATH, so an environment with the
# dependencies but no editable install works too). The tests run with Z2ALL_TRITON_AUTOTUNE=0 (the default
# config of each attention kernel, no search) so they spend their time testing, not compiling; the
# benchmarks autotune.
set -uo pipefail

T_START=$SECONDS
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export Z2ALL_NO_PROGRESS=1 PYTHONUNBUFFERED=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing to check" >&2
  exit 2
fi
LOG="${OUT:-runs/gpu-check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG"
SUMMARY="$LOG/summary.md"
nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1 || true
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  "$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA',
            torch.version.cuda, '| triton', triton.__version__)" 2>&1
  echo
  echo "| stage | rc | seconds | cap | note |"
  echo "| --- | --- | --- | --- | --- |"
} | tee "$SUMMARY"

failed=0
note() {  # note STAGE RC SECONDS CAP TEXT: one summary row, flushed now
  echo "| $1 | $2 | $3 | $4 | $5 |" | tee -a "$SUMMARY"
}
stage() {  # stage NAME CAP CMD...: run under a cap, output to $LOG/NAME.log, its tail to the console
  local name=$1 cap=$2
  shift 2
  echo "== $name (cap ${cap}s, $((SECONDS - T_START)) s elapsed): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$LOG/$name.log" 2>&1
  local rc=$? msg=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && msg="hit the cap: rows measured so far are in its file"
  [ "$rc" -ne 0 ] && failed=1
  note "$name" "$rc" "$((SECONDS - t0))" "$cap" "$msg"
  tail -n 25 "$LOG/$name.log"
  return 0
}
skip() {  # skip NAME WHY
  failed=1
  note "$1" "-" 0 "-" "skipped: $2"
}

# ---- 0. dependencies: CUDA images bring torch + triton; the check also needs these
t0=$SECONDS
missing() { for m in "$@"; do "$PY" -c "import $m" 2>/dev/null || printf '%s ' "$m"; done; }
need=$(missing pytest numpy safetensors)
if [ -n "$need" ]; then
  echo "gpu_check: installing missing packages: $need"
  # shellcheck disable=SC2086
  timeout "${GPU_CHECK_DEPS_S:-20}" "$PY" -m pip install -q --disable-pip-version-check --timeout 5 --retries 1 \
    $need > "$LOG/deps.log" 2>&1
  need=$(missing pytest numpy safetensors)
fi
optional=$(missing psutil tqdm)  # nice to have only: the benches fall back without them
if [ -n "$need" ]; then
  note deps 1 "$((SECONDS - t0))" "${GPU_CHECK_DEPS_S:-20}" "missing after pip install (no internet?): $need;\
 the stages that need them are skipped; install them (pip install $need) and rerun"
else
  note deps 0 "$((SECONDS - t0))" "${GPU_CHECK_DEPS_S:-20}" "ok${optional:+ (not installed, not needed: $optional)}"
fi
has() { for m in "$@"; do case " $need " in *" $m "*) return 1 ;; esac; done; return 0; }

# ---- 1. every ops test on the compiled kernels (the whole model first: it touches every kernel)
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider -m "not slow" --durations=8)
if has pytest; then
  stage ops-tests "${GPU_CHECK_OPS_S:-130}" env Z2ALL_TRITON_AUTOTUNE=0 "${PYTEST[@]}" \
    tests/ops/test_triton_model.py tests/ops/test_triton_attention.py tests/ops/test_triton_cross_entropy.py \
    tests/ops/test_triton_pointwise.py tests/ops/test_ops_reference.py tests/ops/test_triton_bench_kernels.py
else
  skip ops-tests "needs pytest"
fi

# ---- 2. training on the GPU: bf16, fused AdamW, MFU, use_all with resume
if has pytest numpy safetensors; then
  stage train-gpu "${GPU_CHECK_TRAIN_S:-60}" env Z2ALL_TRITON_AUTOTUNE=0 "${PYTEST[@]}" tests/train/test_train_gpu.py
else
  skip train-gpu "needs pytest, numpy and safetensors"
fi

# ---- 3. kernel table, row by row into kernels.md
stage kernels "${GPU_CHECK_KERNELS_S:-150}" "$PY" -m z2all bench kernels --out "$LOG/kernels.md" \
  --ops=attention,cross_entropy,rmsnorm,swiglu,rope

# ---- 4. the seed's ablation table, row by row into ablation.md
if has numpy; then
  stage ablation "${GPU_CHECK_ABLATION_S:-120}" "$PY" -m z2all bench ablation --short --out "$LOG/ablation.md"
else
  skip ablation "needs numpy"
fi

note total "$failed" "$((SECONDS - T_START))" "-" "files in $LOG"
echo "gpu_check: $((SECONDS - T_START)) s; tables: $LOG/kernels.md $LOG/ablation.md; summary: $SUMMARY"
exit "$failed"
