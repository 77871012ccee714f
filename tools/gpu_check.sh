#!/usr/bin/env bash
# The GPU checks of the memory layer in one command, for a machine with one CUDA GPU and this repo installed
# (no network needed: synthetic data, the offline cl100k_base tokenizer). Results land in outputs/gpu_check/.
#
#   tools/gpu_check.sh            # ~10 min on an H100
#
# 1. kernel tests on CUDA (the same tests CI runs under TRITON_INTERPRET=1 on CPU)
# 2. tools/bench_memory_layer.py: PyTorch vs Triton lookup, forward and forward+backward, GB/s
# 3. pretrain_1b for a few steps on one GPU (N_LAYERS blocks, memory layer kept), measured peak memory next
#    to the --job.dry_run estimate
# 4. tools/bench_train_step.py --pair 1b: tokens/s and MFU of the 1B memory model vs its dense twin, one run
# 5. tools/bench_lazy_adamw.py: lazy vs dense AdamW step on a 1B rank's value shard, and their loss difference
# 6. pretrain_1b steps with an asynchronous checkpoint save every 5 steps (step time vs step 3's),
#    and the data wait per step with and without loader workers on the GPU (tools/bench_loader_workers.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-outputs/gpu_check}
N_LAYERS=${N_LAYERS:-22}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"

echo "== 1. kernel tests on CUDA"
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_memory_layer.py 2>&1 | tee "$OUT/kernel_tests.txt"

echo "== 2. lookup benchmark"
"$PY" tools/bench_memory_layer.py --out "$OUT/bench_memory_layer.json" > /dev/null

ONE_GPU=(
  train_configs/pretrain_1b.toml
  --data.source=synthetic
  --model.n_layers="$N_LAYERS"
  --training.global_batch_size=4
  --training.micro_batch_size=4
  --training.steps="$STEPS"
  --checkpoint.enable=false
  --metrics.log_freq=1
  --job.dump_folder="$OUT/pretrain_1b"
)
echo "== 3. pretrain_1b, $N_LAYERS layers, $STEPS steps on one GPU"
"$PY" -m titan_mem.train "${ONE_GPU[@]}" --job.dry_run | tee "$OUT/pretrain_1b_dry_run.txt"
"$PY" -m titan_mem.train "${ONE_GPU[@]}" 2>&1 | tee "$OUT/pretrain_1b.txt"

echo "== 4. memory model vs dense twin"
"$PY" tools/bench_train_step.py --pair 1b --steps "$STEPS" --warmup 3 --out "$OUT/bench_train_step_1b.json" \
  --tokenizer.name=cl100k_base --training.seq_len=2048 --training.micro_batch_size=4 \
  --training.global_batch_size=4 --model.n_layers="$N_LAYERS" --training.activation_checkpoint=full \
  --training.compile=true > /dev/null
echo "== 5. lazy vs dense value AdamW: optimizer step on a 1B rank's shard (1M x 128), loss on the debug model"
"$PY" tools/bench_lazy_adamw.py --table 1048576x128 --steps 100 --out "$OUT/bench_lazy_adamw.json" > /dev/null
echo "== 6. async checkpoint saves during pretrain_1b steps; loader workers on the GPU"
"$PY" -m titan_mem.train "${ONE_GPU[@]}" --checkpoint.enable=true --checkpoint.async_mode=async \
  --checkpoint.interval=5 --job.dump_folder="$OUT/pretrain_1b_async" 2>&1 | tee "$OUT/pretrain_1b_async.txt"
"$PY" tools/bench_loader_workers.py --workers 0,4 --out "$OUT/bench_loader_workers.json" \
  --training.device=cuda > /dev/null
echo "results in $OUT/"
