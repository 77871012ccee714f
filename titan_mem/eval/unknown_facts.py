"""New facts for a real model: the QA items a base model gets wrong, chosen from its own evaluation.

Teaching a model facts it already knows measures nothing (Lin et al. 2025 teach TriviaQA facts the model
does not answer). An item counts as unknown when the base's answer is wrong (EM 0 over the aliases) *and*
its answer NLL is above the median of the evaluated items, so the model neither says nor half-knows it.
The chosen items are shuffled with a seed and cut into named splits (e.g. train / validation / test facts),
each written in its source's own record format with the source row's id kept, so the finetuning loader
reads a split as the QA source it came from and evaluation items stay traceable to it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from titan_mem.checkpoint.files import atomic_file
from titan_mem.data.record_files import read_records
from titan_mem.errors import UserError


class FactSelectionError(UserError, ValueError):
    """An items file or source the selection cannot use; `str()` is one line."""


def unknown_ids(items: dict[str, list[Any]]) -> list[str]:
    """Ids of the items answered wrong (em == 0) with answer NLL above the median, in evaluation order."""
    for column in ("id", "em", "answer_nll"):
        if column not in items:
            raise FactSelectionError(f"items: no '{column}' column (evaluate a QA task with --items)")
    nll = np.asarray(items["answer_nll"], dtype=float)
    median = float(np.median(nll))
    return [str(i) for i, em, x in zip(items["id"], items["em"], nll) if em == 0 and x > median]


def split_facts(ids: Sequence[str], sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """`sizes` ({split: count}) disjoint splits of `ids`, drawn in a seeded order."""
    need = sum(sizes.values())
    if need > len(ids):
        raise FactSelectionError(f"splits ask for {need} facts; only {len(ids)} items qualify")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    out, start = {}, 0
    for name, n in sizes.items():
        out[name], start = order[start : start + n], start + n
    return out


def source_rows(source: str) -> dict[str, dict[str, Any]]:
    """The source's records by id (the source row's own id, else its index), in file order, each with
    `id` set to it, so a row written elsewhere keeps its identity."""
    records = {}
    for i, r in enumerate(read_records(source)):
        rid = str(r.get("question_id") or r.get("id") or i)
        records[rid] = {**r, "id": rid}
    return records


def write_rows(path: Path, records: dict[str, dict[str, Any]], ids: Sequence[str]) -> None:
    """The rows `ids` of `records` as JSON lines, written whole or not at all."""
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in ids))


def write_splits(
    source: str, splits: dict[str, list[str]], out_dir: Path, exemplars: Sequence[str] = ()
) -> dict[str, Path]:
    """Each split's source records as `<out_dir>/<split>.jsonl`; with `exemplars` (ids in no split), also
    `<split>_eval.jsonl`: the split, then those rows, the pool a few-shot evaluation of exactly the split's
    items draws its exemplars from (eval/fewshot.py)."""
    records = source_rows(source)
    paths = {}
    for name, ids in splits.items():
        missing = [i for i in [*ids, *exemplars] if i not in records]
        if missing:
            raise FactSelectionError(f"{source}: no row with id {missing[0]!r} (items from another file?)")
        if set(exemplars) & set(ids):
            raise FactSelectionError(f"split {name}: exemplar ids are facts of the split")
        write_rows(out_dir / f"{name}.jsonl", records, ids)
        if exemplars:
            write_rows(out_dir / f"{name}_eval.jsonl", records, [*ids, *exemplars])
        paths[name] = out_dir / f"{name}.jsonl"
    return paths
