"""Few-shot exemplars (`shots = k`): which items are shown before every evaluated one, and how.

Why: a small instruct model (SmolLM2-135M) asked zero-shot "Question: ..\\nAnswer:" mostly answers an
empty line (F1 1-2 %); k solved examples first show it the format, which is lm-eval's setup for TriviaQA
and NQ-open (5-shot in the issue's baseline) and GSM8K (Cobbe et al. 2021, 8-shot in lm-eval).

One definition for every caller (tools/evaluate.py `--shots`, the trainer's `eval.shots`, a study's
`[eval] shots`): the evaluated items are the first `limit` of the source, as zero-shot; the exemplars are
`k` items drawn with `random.Random(seed)` from the next `SHOT_POOL` items after them (with no limit the
last `SHOT_POOL` items, or half of a smaller source, form the pool and are not evaluated), so an exemplar
is never an evaluated item and the same seed shows the same exemplars, in the same order, to every item.
The format is lm-eval's: "Question: {q}\\nAnswer: {a}" blocks, each followed by a blank line.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from titan_mem.data.qa import qa_prompt
from titan_mem.errors import UserError

T = TypeVar("T")

SHOT_POOL = 500  # the exemplars come from at most this many items after the evaluated ones
SHOT_DELIMITER = "\n\n"  # after every exemplar (lm-eval's fewshot_delimiter)


class ShotsError(UserError, ValueError):
    """Too few items outside the evaluated ones to draw the exemplars from (one line, names the task)."""


def pool_start(n_items: int, limit: int | None) -> int:
    """How many leading items are evaluated when the source holds `n_items` and shots are on."""
    if limit is not None:
        return min(limit, n_items)
    return n_items - min(SHOT_POOL, n_items // 2)


def split_shots(
    items: Sequence[T], limit: int | None, shots: int, seed: int, name: str
) -> tuple[list[T], list[T]]:
    """(evaluated items, exemplars): the first `limit` items, and `shots` items drawn with seed `seed`
    from the `SHOT_POOL` items after them. `shots = 0`: the first `limit` items and no exemplars."""
    if shots < 0:
        raise ShotsError(f"{name}: shots must be >= 0; got {shots}")
    if shots == 0:
        return list(items[:limit] if limit is not None else items), []
    start = pool_start(len(items), limit)
    pool = items[start : start + SHOT_POOL]
    if len(pool) < shots:
        raise ShotsError(
            f"{name}: {len(items)} items leave {len(pool)} after the {start} evaluated, fewer than "
            f"shots = {shots} exemplars (lower the limit or the shots)"
        )
    picked = random.Random(f"titan_mem.eval.shots.{seed}").sample(range(len(pool)), shots)
    return list(items[:start]), [pool[i] for i in picked]


def load_count(limit: int | None, shots: int) -> int | None:
    """How many items of a source to read: the evaluated ones and the exemplar pool (None = all)."""
    if limit is None:
        return None
    return limit + SHOT_POOL if shots else limit


def fewshot_prefix(pairs: Sequence[tuple[str, str]]) -> str:
    """The text every evaluated item's prompt follows: each (question, answer) as `qa_prompt(q) + " " + a`
    and a blank line; empty for zero-shot."""
    return "".join(f"{qa_prompt(q)} {a.strip()}{SHOT_DELIMITER}" for q, a in pairs)
