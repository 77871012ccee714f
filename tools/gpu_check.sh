#!/usr/bin/env bash
# Every GPU check in one command that fits one 10-minute device call and never loses what it measured.
#
#   tools/gpu_check.sh                      # on the GPU machine, repo root; results in $OUT (default
#                                           # outputs/gpu_check): summary.jsonl, gpu_check.log, <= 8 files
#   GPU_CHECK_DRY=1 tools/gpu_check.sh      # the same steps on CPU at toy sizes (tests/integration/test_gpu_check.py)
#
# Step 0 (here): install the wheels the GPU image lacks from the carried, git-ignored .whl/ folder that
# tools/gpu_wheels.sh fills on a machine with PyPI, into $GPU_CHECK_TMP/site (nothing installed system-wide),
# then put the repo and them on PYTHONPATH. The steps after it are tools/gpu_check.py's: each with its own
# timeout, each appending one JSON line to $OUT/summary.jsonl, a failure never stopping the next; the whole
# run stays inside GPU_CHECK_BUDGET_S (default 540 s). No `set -e`: every step runs whatever came before.
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-outputs/gpu_check}
export GPU_CHECK_TMP=${GPU_CHECK_TMP:-/tmp/gpu_check}
PY=${PY:-$(command -v python3 || command -v python)}
mkdir -p "$OUT" "$GPU_CHECK_TMP"
OUT=$(cd "$OUT" && pwd)
export OUT

t0=$(date +%s%N)
rc=0
n_wheels=0
if [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; then
  note="dry run: no install"
elif compgen -G ".whl/*.whl" > /dev/null; then
  n_wheels=$(ls .whl/*.whl | wc -l)
  note="installed from .whl"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$GPU_CHECK_TMP/site" .whl/*.whl >> "$OUT/gpu_check.log" 2>&1 || rc=$?
else
  note="no .whl folder: run tools/gpu_wheels.sh first and carry .whl"
  rc=1
fi
export PYTHONPATH="$PWD:$GPU_CHECK_TMP/site${PYTHONPATH:+:$PYTHONPATH}"
t1=$(date +%s%N)
ms=$(( (t1 - t0) / 1000000 ))
printf '{"step": "wheels", "rc": %d, "seconds": %d.%03d, "wheels": %d, "note": "%s"}\n' \
  "$rc" $((ms / 1000)) $((ms % 1000)) "$n_wheels" "$note" >> "$OUT/summary.jsonl"

exec "$PY" tools/gpu_check.py
