"""Evaluate a checkpoint: QA EM/F1, answer and GSM8K NLL, HellaSwag acc/acc_norm, synthetic fact probes.

    python tools/evaluate.py --checkpoint STEP_DIR --tasks triviaqa,nq_open,gsm8k,hellaswag
                             [--limit N] [--data-dir DIR] [--out results.json] [--predictions preds.jsonl]
                             [--items items.jsonl]
                             [--shots K] [--shots-seed S] [--batch-size B] [--config RUN.toml]
                             [--section.key=value ...]
    torchrun --nproc_per_node=8 tools/evaluate.py --checkpoint ...   (each rank a shard, same numbers)

Tasks: triviaqa, nq_open, simpleqa, gsm8k, hellaswag, lambada_openai, synthetic_qa, synthetic_completion,
synthetic_prose, synthetic_copy, perplexity:SOURCE; `--shots K` puts K solved exemplars before every QA
and GSM8K item, drawn with `--shots-seed` from the items after the evaluated ones (titan_mem/eval/fewshot.py);
`task:SOURCE` reads another file or HF dataset. The model and synthetic world come from the run's
config.json; overrides such as `--data.synthetic_taught_people=5` change what the tasks read. The work is
`titan_mem.eval.runner.evaluate_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys

from titan_mem.cli import run_cli
from titan_mem.distributed import exit_process
from titan_mem.eval.runner import evaluate_checkpoint
from titan_mem.eval.tasks import parse_task_list


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a titan_mem checkpoint")
    parser.add_argument("--checkpoint", required=True, help="checkpoint step folder (any training mode)")
    parser.add_argument("--tasks", required=True, help="comma-separated task names (name or name:SOURCE)")
    parser.add_argument("--limit", type=int, help="examples per task (per population for synthetic tasks)")
    parser.add_argument("--data-dir", help="folder of local evaluation files (../shared/data layout)")
    parser.add_argument("--out", help="results JSON (task, metric, value, n, checkpoint, step)")
    parser.add_argument("--predictions", help="per-example predictions and scores as JSON lines")
    parser.add_argument(
        "--items", help="per-item scores as one eval_items.jsonl line, step 0 (titan_mem/eval/items.py)"
    )
    parser.add_argument(
        "--shots", "--num-fewshot", type=int, default=0, help="few-shot exemplars per QA / GSM8K item"
    )
    parser.add_argument("--shots-seed", type=int, default=0, help="which exemplars (a seeded draw)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    parser.add_argument("--config", help="the run's config (default: config.json two folders up)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    evaluate_checkpoint(
        args.checkpoint,
        parse_task_list(args.tasks),
        limit=args.limit,
        data_dir=args.data_dir,
        config=args.config,
        overrides=overrides,
        batch_size=args.batch_size,
        shots=args.shots,
        shots_seed=args.shots_seed,
        out=args.out,
        predictions=args.predictions,
        items_out=args.items,
        progress=not args.no_progress,
    )


def main() -> int:
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
