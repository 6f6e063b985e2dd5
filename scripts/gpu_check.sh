#!/usr/bin/env bash
# The one prepared GPU check (issue 6) for an H100/H200-class machine; under 8 minutes (caps sum to 470 s):
#   1. the `gpu`-marked tests (bf16 kernels vs the references, etc.)      cap ${GPU_CHECK_TESTS_S:-135} s
#   2. z2all bench kernels   (per-op fwd+bwd time / memory table)        cap ${GPU_CHECK_KERNELS_S:-170} s
#   3. z2all bench ablation --short   (the seed's ablation table)         cap ${GPU_CHECK_ABLATION_S:-165} s
#
#   scripts/gpu_check.sh            (or: make gpu-check)
#   OUT=/some/dir scripts/gpu_check.sh
#
# Logs and tables go to $OUT when set, else runs/gpu-check/<timestamp>/ (git-ignored): <step>.log per
# step (the ablation table ends bench-ablation.log), kernels.md, nvidia-smi.txt and summary.txt. Every step
# runs even if an earlier one fails; the exit status is non-zero when any step failed or hit its cap.
# Python: $PY, else .venv/bin/python, else python3 (the repo goes on PYTHONPATH, so an environment with the
# dependencies but no editable install works too). The tests run with Z2ALL_TRITON_AUTOTUNE=0 (the default
# config of each attention kernel, no search) so they spend their time testing, not compiling; the
# benchmark autotunes.
set -uo pipefail

cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export Z2ALL_NO_PROGRESS=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing to check" >&2
  exit 2
fi
LOG="${OUT:-runs/gpu-check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG"
nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
           'triton', triton.__version__)" | tee "$LOG/summary.txt"

failed=0
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  echo "== $name (cap ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  local msg="$name: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 124 ] && msg="$msg (hit the ${limit}s cap)"
  echo "$msg" | tee -a "$LOG/summary.txt"
  tail -n 40 "$LOG/$name.log"
  [ "$rc" -ne 0 ] && failed=1
  return 0
}

# only the files that hold gpu tests: collecting the whole suite would import the data stage's orjson/ijson/
# zstandard, which GPU images often lack (an import error at collection would run no test at all)
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" -r tests --include="test_*.py" | sort)
step gpu-tests "${GPU_CHECK_TESTS_S:-135}" \
  env Z2ALL_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
step bench-kernels "${GPU_CHECK_KERNELS_S:-170}" "$PY" -m z2all bench kernels --out "$LOG/kernels.md"
step bench-ablation "${GPU_CHECK_ABLATION_S:-165}" "$PY" -m z2all bench ablation --short

echo "gpu_check: logs in $LOG"
exit "$failed"
