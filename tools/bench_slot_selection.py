"""Benchmark: how well background counts files separate slots for tf-idf selection (docs/benchmarks.md).

    python tools/bench_slot_selection.py COUNTS.safetensors [...] [--finetune-config FT.toml] [--steps 30]
                                         [--runs RUN_DIR ...] [--out FILE.json]

Per counts file: the share of all slots with idf exactly 0 (df = N) and never read (df = 0). Then the first
--steps fact batches of the finetune config are replayed forward only through its checkpoint
(checkpoint.initial_load_path) and, per step and memory layer, the tf-idf top-t (finetune.top_t) is compared
with the tf top-t: the share of tf-idf selected rows with idf 0 and the overlap |tfidf ∩ tf| / t. Which slots
a batch reads depends on frozen weights only (sparse finetuning changes value rows, and the first memory
layer's input does not depend on them), so the replay sees what the finetune saw; `--runs` (one finetune
run folder per counts file, in order) checks that against each run's selected_slots.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from titan_mem import config as config_mod
from titan_mem.checkpoint import CheckpointManager
from titan_mem.data import build_dataloader, build_tokenizer
from titan_mem.distributed import exit_process, init_distributed
from titan_mem.modes import TrainMode
from titan_mem.sparse.background import idf_stats, selected_idf_zero
from titan_mem.sparse.counts import count_slots, load_background_counts, merge_counts
from titan_mem.sparse.scores import select_slots
from titan_mem.train import build_model, run_cli


def replay(ft: config_mod.Config, steps: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, per memory layer: the (touched, counts) of the finetune's global batch (padding excluded)."""
    cfg = copy.deepcopy(ft)
    cfg.training.mode = "pretrain"  # forward only
    dist_info = init_distributed(cfg.training.device)
    tokenizer = build_tokenizer(cfg.tokenizer)
    model, _ = build_model(cfg, dist_info, tokenizer, TrainMode(cfg))
    ckpt = Path(cfg.checkpoint.initial_load_path)
    CheckpointManager(ckpt.parent, rank=0, dp_world_size=1, keep_latest_k=0).load_model_only(ckpt, model)
    model.eval()  # as sparse finetuning: BatchNorm statistics frozen
    layers = model.memory_layers()
    for layer in layers.values():
        layer.record_indices = True
    t = cfg.training
    loader = build_dataloader(
        cfg.data,
        tokenizer,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        dp_rank=0,
        dp_world_size=1,
        global_batch_size=t.global_batch_size,
    )
    stream, out = iter(loader), []
    with torch.no_grad():
        for _ in range(steps):
            parts: dict[str, list] = {name: [] for name in layers}
            for _ in range(t.global_batch_size // t.micro_batch_size):
                batch = next(stream)
                model(batch["input_ids"])
                for name, layer in layers.items():
                    n = layer.value_table.weight.shape[0]
                    parts[name].append(count_slots(layer.last_indices, batch["token_mask"], n))
            out.append({name: merge_counts(*p) for name, p in parts.items()})
    return out


def _recorded(run: Path) -> list[dict[str, list[int]]]:
    lines = (run / "selected_slots.jsonl").read_text().splitlines()
    return [json.loads(x)["selected"] for x in lines if x.strip()]


def measure(path: Path, steps: list[dict], top_t: int, ft_tokens: int, run: Path | None) -> dict:
    """One counts file's row of the table."""
    bg = load_background_counts(path)
    meta = bg.metadata
    row = {
        "file": str(path),
        "batch_size": meta.get("batch_size"),
        "seq_len": meta.get("seq_len"),
        "tokens_per_batch": meta.get("tokens_per_batch"),
        "x_finetune_tokens": meta["batch_size"] * meta["seq_len"] / ft_tokens,
        "n_batches": bg.n_batches,
        **{f"slots_{k}": v for k, v in idf_stats(bg).items()},
    }
    picked = zero = overlap = touched = touched_zero = 0
    selections = []
    for counts in steps:
        chosen = {}
        for name, (ids, c) in counts.items():
            view = bg.layer(name)
            sel = select_slots(ids, c, "tfidf", top_t, view)
            by_tf = select_slots(ids, c, "tf", top_t)
            chosen[name] = sel.tolist()
            picked += sel.numel()
            zero += int((bg.df[name][sel] == bg.n_batches).sum())
            overlap += len(set(sel.tolist()) & set(by_tf.tolist()))
            touched += ids.numel()
            touched_zero += int((bg.df[name][ids] == bg.n_batches).sum())
        selections.append(chosen)
    row["fact_batch_slots_touched"] = touched / max(1, len(steps))
    row["touched_idf_zero"] = touched_zero / max(1, touched)
    row["replay_selected_idf_zero"] = zero / max(1, picked)
    row["tfidf_tf_overlap"] = overlap / max(1, picked)
    if run is not None:
        recorded = _recorded(run)[: len(steps)]
        row["run_selected_idf_zero"] = selected_idf_zero(bg, run / "selected_slots.jsonl")
        row["replay_matches_run"] = recorded == selections[: len(recorded)]
    return row


def run(argv: list[str]) -> list[dict]:
    from titan_mem.components.bench import machine_info, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="+", type=Path)
    parser.add_argument("--finetune-config", default="train_configs/debug_sparse_finetune.toml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", nargs="*", type=Path, help="finetune run folders, one per counts file")
    parser.add_argument("--out", type=Path)
    args, overrides = parser.parse_known_args(argv)
    if args.runs and len(args.runs) != len(args.counts):
        raise config_mod.ConfigError(f"--runs: {len(args.runs)} folders for {len(args.counts)} counts files")
    ft = config_mod.parse_args([args.finetune_config, *overrides])
    steps = replay(ft, args.steps)
    ft_tokens = ft.training.global_batch_size * ft.training.seq_len
    runs = args.runs or [None] * len(args.counts)
    rows = [measure(p, steps, ft.finetune.top_t, ft_tokens, r) for p, r in zip(args.counts, runs)]
    report = {
        "machine": machine_info(),
        "finetune_config": args.finetune_config,
        "finetune_batch": [ft.training.global_batch_size, ft.training.seq_len],
        "top_t": ft.finetune.top_t,
        "steps": args.steps,
        "rows": rows,
    }
    write_report(report, args.out)
    return rows


def main() -> int:
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
