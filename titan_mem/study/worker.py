"""The study's subprocess entry points for its base stages (the arms are plain `titan_mem.train` runs):

    python -m titan_mem.study.worker counts --base STEP --background pretrain|finetune|heldout --batches N
                                            --out F  FT.toml [--k=v ...]
    python -m titan_mem.study.worker eval   --base STEP --tasks T --limit N --out F --items-out F
                                            [--data-dir D] [--shots K --shots-seed S]  FT.toml [--k=v ...]
    python -m titan_mem.study.worker to-hf  --base STEP --out FOLDER   (a retrofit geometry's dense base)
    python -m titan_mem.study.worker facts  --study STUDY.toml --base HF --out IDS [--data-dir D]  FT.toml

`counts` counts slot usage in the finetuning config's batch shape over the background corpus:
`pretrain` the base's own pretraining data (its run's config.json), `finetune` the finetuning stream itself,
`heldout` the same regime over held-out facts of the task's kind (synthetic: the validation half of the
known people, so the test half stays unseen). `eval` scores the base with the finetuning config's data
section (the same synthetic world and taught split the arms' in-loop evaluation reads). `facts` writes the
study's facts files (study/choose_facts.py).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.background_counts import count_background
from titan_mem.cli import run_cli
from titan_mem.config import Config
from titan_mem.distributed import exit_process
from titan_mem.errors import ConfigError
from titan_mem.eval.runner import evaluate_checkpoint
from titan_mem.eval.tasks import parse_task_list
from titan_mem.hf.checkpoint_config import load_checkpoint_config
from titan_mem.hf.export import export_checkpoint
from titan_mem.study.choose_facts import choose_facts
from titan_mem.study.keys import BACKGROUNDS
from titan_mem.study.spec import load_study

HELDOUT_POPULATION = "known_val"


def background_config(kind: str, base: Path, ft: Config) -> Config:
    """The config whose data the background counts read (model and tokenizer: the base's)."""
    if kind == "pretrain":
        return load_checkpoint_config(base)
    cfg = copy.deepcopy(ft)
    if kind == "heldout":
        if cfg.data.source != "synthetic":
            raise ConfigError("--background heldout: only the synthetic world names held-out facts")
        cfg.data.synthetic_population = HELDOUT_POPULATION
        cfg.data.validate()
    return cfg


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="titan_mem study stage")
    parser.add_argument("stage", choices=("counts", "eval", "to-hf", "facts"))
    parser.add_argument("--base", required=True, help="the base checkpoint step folder")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--background", choices=BACKGROUNDS, default="pretrain", help="counts: corpus")
    parser.add_argument("--batches", type=int, default=1000, help="counts: background batches")
    parser.add_argument("--tasks", help="eval: comma-separated tasks")
    parser.add_argument("--limit", type=int, help="eval: examples per task")
    parser.add_argument("--data-dir", help="eval: local evaluation data folder")
    parser.add_argument("--items-out", help="eval: per-item scores (eval_items.jsonl format)")
    parser.add_argument("--shots", type=int, default=0, help="eval: few-shot exemplars per QA/GSM8K item")
    parser.add_argument("--shots-seed", type=int, default=0, help="eval: the exemplars' seed")
    parser.add_argument("--study", help="facts: the study file whose [facts] to write")
    if argv[:1] == ["to-hf"]:  # a retrofit geometry's dense base, read with its run's own config
        args = parser.parse_args(argv)
        print(export_checkpoint(Path(args.base), args.out, overwrite=True))
        return
    parser.add_argument("config", help="the finetuning config (TOML), then --section.key=value overrides")
    args, overrides = parser.parse_known_args(argv)
    base = Path(args.base)
    ft = config_mod.parse_args([args.config, *overrides])
    if args.stage == "facts":
        facts = load_study(args.study).facts
        if facts is None:
            raise ConfigError(f"{args.study}: no [facts] table")
        print(choose_facts(facts, args.base, args.config, overrides, args.data_dir))
        return
    if args.stage == "counts":
        cfg = background_config(args.background, base, ft)
        batch, seq_len = ft.training.global_batch_size, ft.training.seq_len
        count_background(cfg, base, args.batches, batch, seq_len, args.out)
        return
    evaluate_checkpoint(
        base,
        parse_task_list(args.tasks or ""),
        limit=args.limit,
        data_dir=args.data_dir,
        config=args.config,
        overrides=[*overrides, "--training.mode=full_finetune"],  # score the base model as it is
        batch_size=ft.eval.batch_size,
        shots=args.shots,
        shots_seed=args.shots_seed,
        out=args.out,
        items_out=args.items_out,
        progress=False,
    )


def main() -> int:
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
