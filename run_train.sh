#!/usr/bin/env bash
# Launch titan_mem training: ./run_train.sh [CONFIG.toml] [--section.key=value ...]
#
# Environment:
#   NGPU           processes per node (default: all visible GPUs, or 1 on a CPU-only machine)
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's rank (default 0; with RDZV_ENDPOINT the c10d rendezvous assigns ranks)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous (default 127.0.0.1:29500)
#   RDZV_ID        rendezvous id shared by all nodes of one job (default titan_mem)
#   LOG_RANK       rank(s) whose output is shown (default 0)
#   PYTHON         interpreter to use (default: .venv/bin/python if present, else python3)
#   SHUTDOWN_TIMEOUT seconds torchrun waits for workers to save and exit after SIGTERM/SIGUSR1 (default 600)
set -euo pipefail
cd "$(dirname "$0")"

CONFIG="train_configs/debug_model.toml"
if [[ $# -gt 0 && "$1" != --* ]]; then
  CONFIG="$1"
  shift
fi

# On a fresh machine: make a .venv with the project, keeping a torch that is already installed.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
  elif python3 -c "import titan_mem, torch, tiktoken, torchdata, datasets, faker" >/dev/null 2>&1; then
    PYTHON=python3
  else
    echo "run_train.sh: installing titan_mem into .venv (first run)" >&2
    python3 -m venv --system-site-packages .venv
    if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
      # The CPU wheel; on GPU machines install the CUDA build of torch first and it is kept.
      .venv/bin/pip install --quiet "torch==2.13.0" || .venv/bin/pip install --quiet torch
    fi
    .venv/bin/pip install --quiet -e .
    PYTHON=.venv/bin/python
  fi
fi

if [[ -z "${NGPU:-}" ]]; then
  NGPU=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
LOG_RANK=${LOG_RANK:-0}
for var in NGPU NNODES; do  # a positive whole number, or one line naming the variable
  if ! [[ "${!var}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $var=${!var}: expected a positive whole number of processes/nodes" >&2
    exit 2
  fi
done
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  echo "error: NODE_RANK=$NODE_RANK: expected 0 .. NNODES-1 ($((NNODES - 1)))" >&2
  exit 2
fi

if [[ ! -f "$CONFIG" ]]; then
  echo "run_train.sh: config file not found: $CONFIG" >&2
  exit 2
fi

if [[ "$NGPU" == 1 && "$NNODES" == 1 ]]; then
  # One process needs no launcher (titan_mem makes its own one-rank process group); errors stay one line.
  exec "$PYTHON" -m titan_mem.train "$CONFIG" "$@"
fi

# Refuse a bad config, an unsplittable batch or a missing file before starting any worker, so the error is
# one line and exit code 2, not one traceback per rank plus torchrun's failure report.
"$PYTHON" -m titan_mem.preflight --world-size=$((NGPU * NNODES)) "$CONFIG" "$@"

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NGPU" --node_rank="$NODE_RANK" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-titan_mem}" \
  --local-ranks-filter="$LOG_RANK" --role=rank --tee=3 \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-600}" \
  -m titan_mem.train "$CONFIG" "$@"
