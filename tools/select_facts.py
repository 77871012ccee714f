"""Pick the QA items a base model gets wrong, as new facts to teach (titan_mem/eval/unknown_facts.py).

    python tools/evaluate.py --checkpoint BASE_STEP --tasks triviaqa --num-fewshot 5 --limit 1000 \
        --data-dir ../shared/data --items outputs/base_items.jsonl
    python tools/select_facts.py --items outputs/base_items.jsonl --task triviaqa \
        --source ../shared/data/triviaqa_3k.jsonl --splits train=100 --out outputs/facts

Writes `<out>/<split>.jsonl` in the source's record format (each row keeps its source id); a fact is in at
most one split. Bad input: one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_mem.eval.items import read_items
from titan_mem.eval.unknown_facts import FactSelectionError, split_facts, unknown_ids, write_splits


def _sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if not name or not n.isdigit() or int(n) < 1:
            raise FactSelectionError(f"--splits: {part!r} is not NAME=COUNT (e.g. train=100,val=50)")
        sizes[name] = int(n)
    return sizes


def run(argv: list[str]) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=Path, required=True, help="eval_items.jsonl of the base model")
    p.add_argument("--task", required=True, help="the QA task in it (e.g. triviaqa)")
    p.add_argument("--source", required=True, help="the task's local file the items came from")
    p.add_argument("--splits", default="train=100", help="NAME=COUNT,... (default train=100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder for <split>.jsonl")
    args = p.parse_args(argv)
    if not args.items.is_file():
        raise FactSelectionError(f"{args.items}: items file not found")
    steps = read_items(args.items)
    if not steps:
        raise FactSelectionError(f"{args.items}: no evaluation line")
    tasks = steps[max(steps)]
    if args.task not in tasks:
        raise FactSelectionError(f"{args.items}: no task {args.task!r} (has {', '.join(sorted(tasks))})")
    ids = unknown_ids(tasks[args.task])
    if not Path(args.source).is_file():
        raise FactSelectionError(f"{args.source}: source file not found")
    paths = write_splits(args.source, split_facts(ids, _sizes(args.splits), args.seed), args.out)
    n = len(tasks[args.task]["id"])
    return f"{len(ids)} of {n} items unknown; wrote " + ", ".join(f"{p} ({k})" for k, p in paths.items())


def main() -> int:
    try:
        print(run(sys.argv[1:]))
        return 0
    except FactSelectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
