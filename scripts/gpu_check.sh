#!/usr/bin/env bash
# The one prepared GPU check (issue 15 §3) for an H100/H200-class machine that brings only CUDA torch + triton.
# One command, under 10 minutes (the device tool's limit per command): the stage caps sum to 540 s.
#
#   scripts/gpu_check.sh            (or: make gpu-check)
#   OUT=/some/dir scripts/gpu_check.sh
#   scripts/gpu_check.sh --fetch-wheels [DIR]   # on a machine WITH internet: download the wheels of pytest,
#                                               # numpy and safetensors (manylinux x86_64, CPython
#                                               # $GPU_CHECK_PYTHONS, default "3.10 3.11 3.12")
#                                               # into DIR (default runs/gpu-wheels) to take to a box without
#                                               # it; the check installs from there first ($GPU_CHECK_WHEELS)
#
# Stages (each capped; every stage runs even when an earlier one failed):
#   0. deps        pytest, numpy, safetensors present? else pip install them (a GPU box may have no internet:
#                  then it says which are missing and skips only what needs them)          cap  ${GPU_CHECK_DEPS_S:-20} s
#   1. tests       seven pytest processes side by side (Triton compiles are CPU-bound, the box has cores):
#                  ALL of tests/ops on CUDA, i.e. every kernel compiled (not interpreted) vs ops/reference.py
#                  on odd shapes in fp32, fp16 and bf16, both attention backwards (split and atomic dQ, one
#                  shard each; the varlen / segment-ids kernels in two more), the whole model with every
#                  kernel vs the reference model (fp32, and bf16 autocast), the `gpu`-marked tests; and
#                  tests/train/test_train_gpu.py: bf16 + fused AdamW with MFU from the peak table, use_all
#                  trained 8 steps vs 4 + resume + 4 (both backwards), activation checkpointing
#                                                                                               cap ${GPU_CHECK_TESTS_S:-200} s
#   2. kernels     z2all bench kernels (attention first: split vs atomic-dQ backward vs SDPA flash/cuDNN;
#                  last, attention_varlen: packed rows, varlen kernel vs SDPA with the block mask vs the
#                  segment-blind causal kernel)                                                 cap ${GPU_CHECK_KERNELS_S:-200} s
#   3. ablation    z2all bench ablation --short (the seed's table: naive, sdpa, use_all, w/o each op, compile)
#                                                                                               cap ${GPU_CHECK_ABLATION_S:-120} s
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
WHEELS="${GPU_CHECK_WHEELS:-runs/gpu-wheels}"
DEPS=(pytest numpy safetensors)
if [ "${1:-}" = "--fetch-wheels" ]; then
  dir="${2:-$WHEELS}"
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  for v in ${GPU_CHECK_PYTHONS:-3.10 3.11 3.12}; do  # three numpy wheels ~48 MB: under the device tool's 64 MiB
    "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$v" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$dir" "${DEPS[@]}" || { echo "gpu_check: pip download failed for Python $v" >&2; exit 1; }
  done
  echo "gpu_check: wheels in $dir ($(du -sh "$dir" | cut -f1)); the check installs from there when a package is missing"
  exit 0
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
need=$(missing "${DEPS[@]}")
if [ -n "$need" ]; then
  # local wheels first (a GPU box often has no internet: see --fetch-wheels), then the index
  src=()
  [ -d "$WHEELS" ] && src=(--no-index --find-links "$WHEELS")
  echo "gpu_check: installing missing packages: $need${src:+ from $WHEELS}"
  # shellcheck disable=SC2086
  timeout "${GPU_CHECK_DEPS_S:-20}" "$PY" -m pip install -q --disable-pip-version-check --timeout 5 --retries 1 \
    "${src[@]}" $need > "$LOG/deps.log" 2>&1
  need=$(missing "${DEPS[@]}")
fi
optional=$(missing psutil tqdm)  # nice to have only: the benches fall back without them
if [ -n "$need" ]; then
  note deps 1 "$((SECONDS - t0))" "${GPU_CHECK_DEPS_S:-20}" "missing after pip install (no internet?): $need;\
 the stages that need them are skipped; install them (pip install $need, or bring wheels: --fetch-wheels) and rerun"
else
  note deps 0 "$((SECONDS - t0))" "${GPU_CHECK_DEPS_S:-20}" "ok${optional:+ (not installed, not needed: $optional)}"
fi
has() { for m in "$@"; do case " $need " in *" $m "*) return 1 ;; esac; done; return 0; }

# ---- 1. the tests, in parallel shards (the whole model first: it touches every kernel)
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider -m "not slow" --durations=5)
shard() {  # shard NAME CMD...: one background pytest under the stage's cap; its rc lands in NAME.rc
  local name=$1
  shift
  ( timeout --kill-after=10 "${GPU_CHECK_TESTS_S:-200}" env Z2ALL_TRITON_AUTOTUNE=0 "$@" > "$LOG/$name.log" 2>&1
    echo $? > "$LOG/$name.rc" ) &
}
t0=$SECONDS
echo "== tests (cap ${GPU_CHECK_TESTS_S:-200}s, $((SECONDS - T_START)) s elapsed)"
shards=()
if has pytest; then
  shard ops-model "${PYTEST[@]}" tests/ops/test_triton_model.py tests/ops/test_ops_reference.py
  shard ops-attention-split "${PYTEST[@]}" tests/ops/test_triton_attention.py -k "not atomic"
  shard ops-attention-atomic "${PYTEST[@]}" tests/ops/test_triton_attention.py -k "atomic"
  # the varlen (segment ids) kernels compile their own variants: shards of their own, not on the ones above
  shard ops-varlen-split "${PYTEST[@]}" tests/ops/test_triton_varlen.py -k "not atomic"
  shard ops-varlen-atomic "${PYTEST[@]}" tests/ops/test_triton_varlen.py -k "atomic"
  shard ops-ce-pointwise "${PYTEST[@]}" tests/ops/test_triton_cross_entropy.py tests/ops/test_triton_pointwise.py \
    tests/ops/test_triton_bench_kernels.py
  shards+=(ops-model ops-attention-split ops-attention-atomic ops-varlen-split ops-varlen-atomic ops-ce-pointwise)
else
  skip ops-tests "needs pytest"
fi
if has pytest numpy safetensors; then
  shard train-gpu "${PYTEST[@]}" tests/train/test_train_gpu.py
  shards+=(train-gpu)
else
  skip train-gpu "needs pytest, numpy and safetensors"
fi
wait
for name in "${shards[@]}"; do
  rc=$(cat "$LOG/$name.rc" 2>/dev/null || echo "?")
  msg=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)" "$LOG/$name.log" | tail -n 1 | tr -d '=|')
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && msg="hit the cap; ${msg:-no pytest summary}"
  [ "$rc" != 0 ] && failed=1
  note "$name" "$rc" "$((SECONDS - t0))" "${GPU_CHECK_TESTS_S:-200}" "$msg"
  grep -E "^(FAILED|ERROR)" "$LOG/$name.log" | head -n 10
done

# ---- 2. kernel table, row by row into kernels.md
# (attention_varlen last: its autotuning compiles a second set of kernels, and a cut keeps the rows before it)
stage kernels "${GPU_CHECK_KERNELS_S:-200}" "$PY" -m z2all bench kernels --out "$LOG/kernels.md" \
  --ops=attention,cross_entropy,rmsnorm,swiglu,rope,attention_varlen

# ---- 3. the seed's ablation table, row by row into ablation.md
if has numpy; then
  stage ablation "${GPU_CHECK_ABLATION_S:-120}" "$PY" -m z2all bench ablation --short --out "$LOG/ablation.md"
else
  skip ablation "needs numpy"
fi

note total "$failed" "$((SECONDS - T_START))" "-" "files in $LOG"
echo "gpu_check: $((SECONDS - T_START)) s; tables: $LOG/kernels.md $LOG/ablation.md; summary: $SUMMARY"
exit "$failed"
