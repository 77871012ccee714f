"""Benchmark: SmolLM2-135M (a real pretrained model) through every titan_mem path, each stage timed.

    tools/get_model.sh smollm2-135m
    python tools/bench_real_model.py [--out outputs/bench/real_model.json] [--work outputs/smollm2]
        [--heal-steps 60] [--finetune-steps 100] [--count-batches 100] [--only STAGE,...]

Stages, each the command a user runs (train_configs/smollm2_*.toml): GGUF -> HF folder; the base's 5-shot
TriviaQA answers (which facts it does not know); 100 of those as the facts to teach (tools/select_facts.py);
retrofit add (LM heal) and replace (distillation heal) at block 15; LAMBADA and NQ-open of the base and both
healed models; background counts; sparse / full / LoRA finetuning on the facts; the taught facts' answer NLL
before and after; export of the sparse result as an HF folder. A stage whose output exists is skipped, so
the run resumes where it stopped; the JSON keeps every finished stage's wall time, tokens/s (the trainer's
median over logged steps) and metrics. The full evaluation set's time is tools/bench_eval.py's job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = "outputs/models/smollm2-135m"
GGUF = "outputs/models/smollm2-135m.gguf"
DATA = "../shared/data"


def _stages(a: argparse.Namespace) -> list[dict[str, Any]]:
    w = a.work
    heal = f"{w}/heal/checkpoints/step-{a.heal_steps}"
    heal_r = f"{w}/heal_replace/checkpoints/step-{a.heal_steps}"
    common_ft = [
        f"--checkpoint.initial_load_path={heal}",
        f"--data.source={w}/facts/train.jsonl",
        f"--training.steps={a.finetune_steps}",
    ]

    def train(config: str, folder: str, *extra: str) -> list[str]:
        return [PY, "-m", "titan_mem.train", config, f"--job.dump_folder={w}/{folder}", *extra]

    def evaluate(ckpt: str, tasks: str, out: str, limit: int, shots: int, *extra: str) -> list[str]:
        return [
            PY,
            "tools/evaluate.py",
            "--checkpoint",
            ckpt,
            "--tasks",
            tasks,
            "--limit",
            str(limit),
            "--shots",
            str(shots),
            "--data-dir",
            DATA,
            "--out",
            f"{w}/eval/{out}.json",
            "--no-progress",
            *extra,
        ]

    taught = f"triviaqa:{w}/facts/train.jsonl"
    held = "lambada_openai,nq_open"
    stages = [
        (
            "import",
            [PY, "tools/convert_checkpoint.py", "from-gguf", GGUF, f"{w}/import"],
            f"{w}/import/config.json",
        ),
        (
            "base_triviaqa",
            evaluate(MODEL, "triviaqa", "base_triviaqa", 600, 5, "--items", f"{w}/base_items.jsonl"),
            f"{w}/eval/base_triviaqa.json",
        ),
        (
            "select_facts",
            [
                PY,
                "tools/select_facts.py",
                "--items",
                f"{w}/base_items.jsonl",
                "--task",
                "triviaqa",
                "--source",
                f"{DATA}/triviaqa_3k.jsonl",
                "--splits",
                "train=100",
                "--out",
                f"{w}/facts",
            ],
            f"{w}/facts/train.jsonl",
        ),
        (
            "heal_add",
            train("train_configs/smollm2_heal.toml", "heal", f"--training.steps={a.heal_steps}"),
            heal,
        ),
        (
            "heal_replace_distill",
            train(
                "train_configs/smollm2_heal.toml",
                "heal_replace",
                "--retrofit.mode=replace",
                "--retrofit.heal_objective=distill",
                f"--training.steps={a.heal_steps}",
            ),
            heal_r,
        ),
        ("held_base", evaluate(MODEL, held, "held_base", a.held_limit, 5), f"{w}/eval/held_base.json"),
        (
            "held_heal_add",
            evaluate(heal, held, "held_heal_add", a.held_limit, 5),
            f"{w}/eval/held_heal_add.json",
        ),
        (
            "held_heal_replace",
            evaluate(heal_r, held, "held_heal_replace", a.held_limit, 5),
            f"{w}/eval/held_heal_replace.json",
        ),
        (
            "background_counts",
            [
                PY,
                "tools/background_counts.py",
                "train_configs/smollm2_heal.toml",
                "--finetune-config",
                "train_configs/smollm2_sparse_finetune.toml",
                "--checkpoint",
                heal,
                "--batches",
                str(a.count_batches),
            ],
            f"{heal}/background_counts.safetensors",
        ),
        ("taught_before", evaluate(heal, taught, "taught_before", 100, 0), f"{w}/eval/taught_before.json"),
    ]
    for method in ("sparse", "full", "lora"):
        step = f"{w}/{method}/checkpoints/step-{a.finetune_steps}"
        stages.append(
            (method, train(f"train_configs/smollm2_{method}_finetune.toml", method, *common_ft), step)
        )
        stages.append(
            (
                f"taught_after_{method}",
                evaluate(step, taught, f"taught_after_{method}", 100, 0),
                f"{w}/eval/taught_after_{method}.json",
            )
        )
    stages.append(
        (
            "export_sparse",
            [
                PY,
                "tools/convert_checkpoint.py",
                "to-hf",
                f"{w}/sparse/checkpoints/step-{a.finetune_steps}",
                f"{w}/export_sparse",
            ],
            f"{w}/export_sparse/config.json",
        )
    )
    return [{"name": n, "argv": argv, "done": d} for n, argv, d in stages]


def _tokens_per_s(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [
        r["tokens_per_s"] for r in map(json.loads, path.read_text().splitlines()) if r.get("tokens_per_s")
    ]
    return round(statistics.median(rates[1:] or rates), 1) if rates else None


def _metrics(path: Path) -> dict[str, float]:
    if not path.is_file() or path.suffix != ".json":
        return {}
    rows = json.loads(path.read_text())
    rows = rows.get("results", rows) if isinstance(rows, dict) else rows
    return {
        f"{r['task']}:{r['metric']}": round(r["value"], 4)
        for r in rows
        if isinstance(r, dict) and "metric" in r
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="outputs/smollm2")
    p.add_argument("--out", type=Path, default=Path("outputs/bench/real_model.json"))
    p.add_argument("--heal-steps", type=int, default=60)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--count-batches", type=int, default=100)
    p.add_argument("--held-limit", type=int, default=300)
    p.add_argument("--only", help="comma-separated stage names (default: all)")
    a = p.parse_args()
    os.chdir(REPO)
    report: dict[str, Any] = json.loads(a.out.read_text()) if a.out.is_file() else {"stages": {}}
    report.update(
        benchmark="real_model",
        command=" ".join(["python", *sys.argv]),
        model=MODEL,
        machine={"platform": platform.platform(), "cpus": os.cpu_count()},
    )
    only = set(a.only.split(",")) if a.only else None
    for st in _stages(a):
        if (only and st["name"] not in only) or Path(st["done"]).exists():
            continue
        print(f"== {st['name']}: {' '.join(st['argv'][1:])}", flush=True)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        proc = subprocess.run(st["argv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = round(time.perf_counter() - t0, 1)
        log = Path(a.work) / "logs" / f"{st['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout)
        if proc.returncode != 0:
            sys.exit(f"error: stage {st['name']} failed (exit {proc.returncode}); its output: {log}")
        done = Path(st["done"])
        run = done.parent.parent if done.parent.name == "checkpoints" else None
        report["stages"][st["name"]] = {
            "seconds": seconds,
            "load_average_before": round(load0, 2),
            "tokens_per_s": _tokens_per_s(run) if run else None,
            "metrics": _metrics(done),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", *st["argv"][1:]]),
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(a.out)
        print(f"   {seconds} s", flush=True)


if __name__ == "__main__":
    main()
