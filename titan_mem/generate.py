"""Look at what a checkpoint says: greedy continuations of prompts, with the KV cache.

    python -m titan_mem.generate --checkpoint STEP_DIR --prompt "Question: Where was Ada born?\\nAnswer:"
    python -m titan_mem.generate --checkpoint STEP_DIR --prompts-file prompts.txt [--out out.jsonl]
                                 [--max-new-tokens 64] [--stop "\\n"] [--section.key=value ...]

A prompts file holds one prompt per line (`\\n` inside a line is a newline), or JSON lines with a
`prompt` field. Any training mode's checkpoint loads (LoRA, sparse) as in tools/evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from titan_mem.cli import run_cli
from titan_mem.distributed import exit_process
from titan_mem.errors import ConfigError
from titan_mem.eval.runner import load_eval_model, write_jsonl


def read_prompts(path: Path) -> list[str]:
    """Plain lines (escaped newlines expanded) or JSON lines {"prompt": ...}; blank lines skipped."""
    if not path.is_file():
        raise ConfigError(f"--prompts-file: no such file {path}")
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{i}: invalid JSON line ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f"{path}:{i}: expected a JSON object with a string 'prompt'")
            prompts.append(record["prompt"])
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_mem.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint step folder (any training mode)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line, or JSON lines with 'prompt'")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable; '\\n' ok)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="write {prompt, completion} JSON lines here")
    parser.add_argument("--config", help="the run's config (default: config.json two folders up)")
    args, overrides = parser.parse_known_args(argv)
    prompts = [p.replace("\\n", "\n") for p in args.prompt]
    if args.prompts_file:
        prompts += read_prompts(Path(args.prompts_file))
    if not prompts:
        raise ConfigError("give --prompt TEXT or --prompts-file FILE")
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens: must be positive; got {args.max_new_tokens}")
    stops = [s.replace("\\n", "\n") for s in (args.stop or [])]
    lm, _ = load_eval_model(
        args.checkpoint, config=args.config, overrides=overrides, batch_size=args.batch_size
    )
    completions = lm.generate_until(prompts, until=stops, max_new_tokens=args.max_new_tokens)
    if lm.rank != 0:
        return
    for prompt, completion in zip(prompts, completions):
        print(f"{prompt}\033[1m{completion}\033[0m" if sys.stdout.isatty() else f"{prompt}{completion}")
        print("-" * 40)
    if args.out:
        write_jsonl(Path(args.out), [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])


def main() -> int:
    return run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    exit_process(main())
