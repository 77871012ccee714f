"""Benchmark: the issue-30 evaluation set on a real model, and what computing the few-shot prefix once saves.

    python tools/bench_eval.py [--model outputs/models/smollm2-135m] [--data-dir ../shared/data]
        [--set triviaqa=300,nq_open=300,gsm8k=100,lambada_openai=500] [--shots 5] [--gsm8k-shots 0]
        [--shots-seed 0] [--batch-size 16] [--speedup-items 48] [--skip-set] [--skip-speedup] [--no-reuse]
        [--threads N] [--out FILE]

The model loads as tools/evaluate.py loads it (`load_eval_model`: an HF folder or a checkpoint step). Part 1
(`set`) runs every task of `--set` with its item count (QA tasks with `--shots` exemplars, GSM8K with
`--gsm8k-shots`, others zero-shot; the shared prefix computed once) and reports each task's metrics and
seconds and the total against the issue's budget (600 s on 2 cores for a 135M model). Part 2 (`speedup`)
evaluates the first `--speedup-items` TriviaQA items with `--shots` exemplars twice, reusing the prefix's KV
cache and recomputing it per row, and reports both times, the speedup, the largest per-item difference of
answer NLL and how many greedy answers agree. Prints one JSON object; `--out` also writes it. The load
average goes into the report: on a shared machine other processes' work inflates every time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from titan_mem.components.bench import machine_info, write_report
from titan_mem.eval.lm import EvalModel
from titan_mem.eval.runner import load_eval_model, run_tasks
from titan_mem.eval.tasks import TaskContext, build_tasks

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 600.0  # issue 30: TriviaQA 300 + NQ 300 5-shot, GSM8K 100, LAMBADA 500 in <= 10 min on 2 cores
QA_TASKS = ("triviaqa", "nq_open", "simpleqa")


def parse_set(text: str) -> list[tuple[str, int]]:
    """`name=N,...` -> [(name, N)]."""
    out = []
    for part in text.split(","):
        name, _, n = part.partition("=")
        if not name or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"error: --set: {part!r} is not TASK=COUNT (e.g. triviaqa=300)")
        out.append((name.strip(), int(n)))
    return out


def run_set(lm: EvalModel, data_dir: Path, spec: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    """Each task of the set with its own limit and shots; metrics, seconds per task and in all."""
    tasks = []
    for name, n in spec:
        shots = args.shots if name in QA_TASKS else args.gsm8k_shots if name == "gsm8k" else 0
        tasks += build_tasks([name], TaskContext(data_dir, None, n, shots, args.shots_seed))
    t0, c0 = time.perf_counter(), time.process_time()
    out = run_tasks(lm, tasks)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics: dict[str, dict[str, Any]] = {}
    for m in out.metrics:
        metrics.setdefault(m["task"], {"n": m["n"]})[m["metric"]] = round(m["value"], 4)
    return {
        "tasks": {t: {**metrics[t], "seconds": s} for t, s in out.seconds.items()},
        "seconds": round(total, 1),
        "cpu_seconds": round(cpu, 1),  # this process's CPU time, all threads (wall x threads when alone)
        "budget_s": BUDGET_S,
        "within_budget": total <= BUDGET_S,
    }


def run_speedup(lm: EvalModel, data_dir: Path, args: argparse.Namespace) -> dict:
    """The same few-shot TriviaQA items with the prefix's KV cache reused and recomputed per row."""
    (task,) = build_tasks(
        ["triviaqa"], TaskContext(data_dir, None, args.speedup_items, args.shots, args.shots_seed)
    )
    runs = {}
    for reuse in (True, False):
        lm.reuse_prefix = reuse
        t0 = time.perf_counter()
        out = run_tasks(lm, [task])
        runs[reuse] = (time.perf_counter() - t0, out.predictions)
    lm.reuse_prefix = True
    (t_reuse, p_reuse), (t_full, p_full) = runs[True], runs[False]
    prefix_tokens = len(lm.tokenizer.encode(task.prefix))
    return {
        "items": len(task.examples),
        "shots": args.shots,
        "prefix_tokens": prefix_tokens,
        "item_tokens_mean": round(
            sum(len(lm.tokenizer.encode(p["prompt"])) for p in p_full) / len(p_full) - prefix_tokens, 1
        ),
        "seconds_reuse": round(t_reuse, 2),
        "seconds_recompute": round(t_full, 2),
        "speedup": round(t_full / t_reuse, 2),
        "max_abs_answer_nll_diff": max(
            abs(a["answer_nll"] - b["answer_nll"]) for a, b in zip(p_reuse, p_full)
        ),
        "answers_equal": sum(a["prediction"] == b["prediction"] for a, b in zip(p_reuse, p_full)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/models/smollm2-135m", help="HF folder or checkpoint step")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--set", default="triviaqa=300,nq_open=300,gsm8k=100,lambada_openai=500")
    parser.add_argument("--shots", type=int, default=5, help="exemplars per QA item")
    parser.add_argument("--gsm8k-shots", type=int, default=0, help="exemplars per GSM8K item")
    parser.add_argument("--shots-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--speedup-items", type=int, default=48)
    parser.add_argument("--skip-set", action="store_true")
    parser.add_argument("--skip-speedup", action="store_true")
    parser.add_argument("--no-reuse", action="store_true", help="set: recompute the shared prefix per row")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = parse_set(args.set)
    t0 = time.perf_counter()
    lm, _ = load_eval_model(args.model, batch_size=args.batch_size)
    report: dict[str, Any] = {
        "benchmark": "eval",
        "machine": machine_info(),
        "command": " ".join(["python", *sys.argv]),
        "model": str(args.model),
        "load_seconds": round(time.perf_counter() - t0, 1),
        "batch_size": args.batch_size,
        "inference_mode": lm.inference,
        "load_average_before": os.getloadavg(),
    }
    if not args.skip_set:
        lm.reuse_prefix = not args.no_reuse
        report["set"] = {"reuse_prefix": lm.reuse_prefix, **run_set(lm, args.data_dir, spec, args)}
    if not args.skip_speedup:
        report["speedup"] = run_speedup(lm, args.data_dir, args)
    report["load_average_after"] = os.getloadavg()
    write_report(report, args.out)


if __name__ == "__main__":
    main()
