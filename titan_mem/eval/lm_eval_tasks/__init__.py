"""lm-evaluation-harness task YAMLs that read local files (no network): pass `TASKS_DIR` as lm-eval's
`--include_path` / `TaskManager(include_path=...)`.

* titan_mem_hellaswag_local: HellaSwag in llm-foundry's `{query, choices, gold}` JSONL, lm-eval's hellaswag
  conventions (continuation " " + ending; acc, and acc_norm by the ending's length in characters).
* titan_mem_gsm8k_nll_local: per-token NLL (nats) and perplexity of " " + the worked solution after
  `Question: {question}\\nAnswer:`, token-weighted over examples; needs the `titan_mem` model (token counts).

The data files default to `../shared/data/...`, relative to the working directory (the repository root).
For another file, write a YAML that includes one of these and replaces `dataset_kwargs` (see
`local_task_yaml`).
"""

from __future__ import annotations

import json
from pathlib import Path

from titan_mem.errors import DataError

TASKS_DIR = Path(__file__).resolve().parent
HELLASWAG = "titan_mem_hellaswag_local"
GSM8K_NLL = "titan_mem_gsm8k_nll_local"
SPLITS = {HELLASWAG: "validation", GSM8K_NLL: "test"}


def local_task_yaml(task: str, name: str, data_file: str | Path, cache_dir: str | Path | None = None) -> str:
    """YAML text of task `name`: the shipped `task` reading `data_file`, and the HF datasets cache in
    `cache_dir` if given. Paths are written absolute (lm-eval resolves `include:` from the new YAML's
    folder and `data_files` from the working directory)."""
    if task not in SPLITS:
        raise DataError(f"unknown titan_mem lm-eval task {task!r} (known: {', '.join(SPLITS)})")
    lines = [
        f"include: {_quoted(TASKS_DIR / (task + '.yaml'))}",
        f"task: {json.dumps(name)}",
        "dataset_kwargs:",
        "  data_files:",
        f"    {SPLITS[task]}: {_quoted(data_file)}",
    ]
    if cache_dir is not None:
        lines.append(f"  cache_dir: {_quoted(cache_dir)}")
    return "\n".join(lines) + "\n"


def _quoted(path: str | Path) -> str:
    """An absolute path as a YAML scalar (JSON strings are YAML): spaces and colons stay literal."""
    return json.dumps(str(Path(path).resolve()))
