"""Loading a checkpoint for evaluation and running tasks on it: what tools/evaluate.py, `titan_mem.generate`
and the Trainer's in-loop evaluation share.

Any checkpoint a run wrote evaluates: the model is rebuilt from the run's `config.json` (two folders up
from `step-N`; `--config` names another), with the training mode's converters (LoRA adapters) so its
tensors load, and sparse checkpoints resolve as base + patch (`checkpoint.content.load_model_weights`).
An HF model folder (config.json + safetensors, e.g. from `convert_checkpoint.py from-gguf`) evaluates too,
as the dense run `retrofit.base = folder` starts from: a pretrained model's baseline before any training.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from titan_mem.checkpoint import CheckpointManager
from titan_mem.checkpoint.content import load_model_weights
from titan_mem.checkpoint.files import atomic_file
from titan_mem.components.model import build_model
from titan_mem.config import Config
from titan_mem.data import build_tokenizer
from titan_mem.distributed import init_distributed
from titan_mem.errors import ConfigError, check_writable
from titan_mem.eval.items import items_line
from titan_mem.eval.lm import EvalModel
from titan_mem.eval.tasks import TaskContext, TaskOutput, build_tasks
from titan_mem.hf.checkpoint_config import is_hf_folder, load_checkpoint_config
from titan_mem.hf.retrofit import load_base_weights
from titan_mem.modes import model_converters


def checkpoint_step(checkpoint: Path) -> int:
    name = checkpoint.resolve().name
    return int(name.split("-", 1)[1]) if name.startswith("step-") and name[5:].isdigit() else -1


def load_eval_model(
    checkpoint: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    batch_size: int = 16,
    progress: bool = False,
    cfg: Config | None = None,
) -> tuple[EvalModel, Config]:
    """The checkpoint's model in eval mode (sharded over the torchrun ranks like training) and its config
    (`cfg`: the one `load_checkpoint_config` already read, else read here)."""
    checkpoint = Path(checkpoint)
    if cfg is None:
        cfg = load_checkpoint_config(checkpoint, Path(config) if config else None, overrides)
    dist_info = init_distributed(cfg.training.device)
    tokenizer = build_tokenizer(cfg.tokenizer)
    model, model_args = build_model(cfg, dist_info, tokenizer, model_converters(cfg))
    if is_hf_folder(checkpoint):
        load_base_weights(model, checkpoint, model_args)
    else:
        manager = CheckpointManager(
            checkpoint.parent, rank=dist_info.rank, dp_world_size=dist_info.world_size, keep_latest_k=0
        )
        load_model_weights(manager, checkpoint, model)
    model.eval()
    if dist_info.world_size == 1 and isinstance(model, FSDPModule):
        # one process shards nothing: gather the parameters once instead of copying every block's before
        # each forward (37 % of a decode step of SmolLM2-135M on 2 cores); evaluation only, never trained
        model.set_reshard_after_forward(False)
        model.unshard()
    lm = EvalModel(
        model,
        tokenizer,
        max_seq_len=model_args.max_seq_len,
        batch_size=batch_size,
        progress=tqdm_progress if progress else None,
        inference=True,  # where the model is not sharded (EvalModel says why)
    )
    return lm, cfg


def tqdm_progress(total: int, desc: str) -> Callable[[int], None]:
    """A progress bar on stderr that closes itself at the end."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True)

    def tick(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return tick


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, each module's own train/eval flag restored after (finetuning keeps batch-norm
    frozen in eval mode; a blanket `model.train()` would unfreeze it)."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def run_tasks(lm: EvalModel, tasks: Sequence[Any]) -> TaskOutput:
    """Every built task (`build_tasks`: data loaded once, before any compute) on the model in eval mode."""
    out = TaskOutput()
    with eval_mode(lm.model):
        for task in tasks:
            t0 = time.perf_counter()
            result = task.evaluate(lm)
            out.seconds[task.name] = round(time.perf_counter() - t0, 3)
            out.metrics += result.metrics
            out.predictions += result.predictions
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    batch_size: int = 16,
    shots: int = 0,
    shots_seed: int = 0,
    out: str | Path | None = None,
    predictions: str | Path | None = None,
    items_out: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one checkpoint on `tasks`; rank 0 prints the table and writes `out` / `predictions` /
    `items_out` (the per-item scores as one eval_items.jsonl line with step 0: the base a finetuning
    stream starts from, beside its arms' in-loop lines). Outputs are checked writable before the model
    loads and written whole at the end. `shots`: few-shot exemplars per QA / GSM8K item (eval/fewshot.py)."""
    checkpoint = Path(checkpoint)
    outputs = [Path(p) for p in (out, predictions, items_out) if p is not None]
    for path in outputs:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; expected an output file name")
        check_writable(path)  # a folder that takes no file fails now, not after the evaluation
    if len(set(outputs)) != len(outputs):
        raise ConfigError(
            f"--out, --predictions, --items: two name the same file ({', '.join(map(str, outputs))})"
        )
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit: must be positive; got {limit}")
    if shots < 0:
        raise ConfigError(f"--shots: must be >= 0; got {shots}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir: {data_dir} is not a folder")
    cfg = load_checkpoint_config(checkpoint, Path(config) if config else None, overrides)
    ctx = TaskContext(Path(data_dir) if data_dir else None, cfg.data, limit, shots, shots_seed)
    built = build_tasks(tasks, ctx)  # unknown tasks and missing files fail before the model loads
    lm, cfg = load_eval_model(checkpoint, batch_size=batch_size, progress=progress, cfg=cfg)
    t0 = time.perf_counter()
    result = run_tasks(lm, built)
    step = checkpoint_step(checkpoint)
    doc = results_document(
        result,
        checkpoint,
        step,
        tasks=list(tasks),
        limit=limit,
        shots=shots,
        shots_seed=shots_seed,
        seconds=round(time.perf_counter() - t0, 3),
        task_seconds=result.seconds,
        world_size=lm.world,
    )
    if lm.rank == 0:
        print(format_table(result.metrics), flush=True)
        texts = {}
        if predictions is not None:
            texts[Path(predictions)] = "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in result.predictions
            )
        if items_out is not None:
            texts[Path(items_out)] = items_line(0, result.predictions)
        if out is not None:
            texts[Path(out)] = json.dumps(doc, indent=2) + "\n"
        write_together(texts)
    return doc


def write_together(texts: dict[Path, str]) -> None:
    """Every file whole or none of them: each is written to its temporary name first, and the renames
    happen only once all are written (`atomic_file`s nested; a failure removes every temporary file)."""
    with contextlib.ExitStack() as stack:
        tmps = {path: stack.enter_context(atomic_file(path, overwrite=True)) for path in texts}
        for path, text in texts.items():
            tmps[path].write_text(text, encoding="utf-8")


def results_document(out: TaskOutput, checkpoint: Path, step: int, **meta: Any) -> dict[str, Any]:
    """The results JSON: one record per (task, metric) with the checkpoint and step repeated in each, so
    files from many checkpoints concatenate into one table."""
    records = [{**m, "checkpoint": str(checkpoint), "step": step} for m in out.metrics]
    return {"checkpoint": str(checkpoint), "step": step, "time": time.time(), **meta, "results": records}


def format_table(metrics: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: task, metric, value, n."""
    rows = [("task", "metric", "value", "n")]
    rows += [(m["task"], m["metric"], f"{m['value']:.4f}", str(m["n"])) for m in metrics]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for j, r in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, document: Any) -> None:
    """Whole or not at all (`atomic_file`: temp file, fsync, rename)."""
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
