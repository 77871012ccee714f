"""The study's `choose facts` stage (study/facts.py says what and why): the base model answers candidate
items few-shot once; the new facts are the ones it gets wrong (eval/unknown_facts.py), the known ones
(`[facts.known]`) those it gets right; the chosen ids are written first, then the split files. With the
ids file present (committed), only the split files are written, from it: no model runs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from titan_mem.errors import ConfigError
from titan_mem.eval.items import read_items
from titan_mem.eval.runner import evaluate_checkpoint, write_json
from titan_mem.eval.unknown_facts import source_rows, split_facts, unknown_ids, write_rows, write_splits
from titan_mem.study.facts import FactsSpec, KnownSpec

FACT_EXEMPLARS = 20  # the pool a split's few-shot evaluation draws its exemplars from


def _answers(base: str, task: str, source: str, limit: int, shots: int, config: str, overrides: list[str],
             data_dir: str | None) -> tuple[dict[str, list[Any]], list[str]]:  # fmt: skip
    """The base's per-item scores on the first `limit` items of `source`, and the exemplar pool: the
    FACT_EXEMPLARS items after them. The chosen items are later evaluated with that same pool after them,
    so they see the same few-shot prefix as when they were chosen (greedy answers depend on it)."""
    records = source_rows(source)
    ids = list(records)[: limit + FACT_EXEMPLARS]
    if len(ids) < limit + FACT_EXEMPLARS:
        raise ConfigError(
            f"{source}: {len(ids)} rows; {limit} candidates and {FACT_EXEMPLARS} exemplars wanted"
        )
    with tempfile.TemporaryDirectory() as tmp:
        candidates, items = Path(tmp) / "candidates.jsonl", Path(tmp) / "items.jsonl"
        write_rows(candidates, records, ids)
        evaluate_checkpoint(
            Path(base), [f"{task}:{candidates}"], limit=limit, data_dir=data_dir, config=config,
            overrides=[*overrides, "--training.mode=full_finetune"], shots=shots, shots_seed=0,
            items_out=items, progress=False,
        )  # fmt: skip
        return read_items(items)[0][task], ids[limit:]


def _settings(facts: FactsSpec) -> dict[str, dict[str, Any]]:
    """Per part, what its ids depend on (a committed file chosen for other settings is refused)."""
    s = {"new": {"task": facts.task, "source": facts.source, "limit": facts.candidates, "shots": facts.shots,
                 "seed": facts.seed, "sizes": facts.splits}}  # fmt: skip
    if facts.known is not None:
        k = facts.known
        s["known"] = {"task": k.task, "source": k.source, "limit": k.candidates, "shots": facts.shots,
                      "count": k.count, "min_f1": k.min_f1}  # fmt: skip
    return s


def _new(facts: FactsSpec, scored: dict[str, list[Any]]) -> dict[str, Any]:
    unknown = unknown_ids(scored)
    splits = split_facts(unknown, facts.splits, facts.seed)
    return {"scored": len(scored["id"]), "unknown": len(unknown), "splits": splits}


def _known(k: KnownSpec, scored: dict[str, list[Any]]) -> dict[str, Any]:
    right = [str(i) for i, f1 in zip(scored["id"], scored["f1"]) if f1 >= k.min_f1]
    if len(right) < k.count:
        raise ConfigError(f"[facts.known]: the base gets {len(right)} of {len(scored['id'])} {k.task} items "
                          f"right (F1 >= {k.min_f1}); {k.count} wanted: raise candidates")  # fmt: skip
    return {"scored": len(scored["id"]), "right": len(right), "ids": right[: k.count]}


def choose_facts(facts: FactsSpec, base: str, config: str, overrides: list[str], data_dir: str | None) -> str:
    """Write the split files (and `known_eval.jsonl`), choosing the ids of a part first when the ids file
    lacks it."""
    doc = json.loads(facts.ids.read_text()) if facts.ids.is_file() else {"base": base}
    for part, settings in _settings(facts).items():
        if part in doc and doc[part]["settings"] != settings:
            was = doc[part]["settings"]
            raise ConfigError(f"{facts.ids}: {part} facts chosen for other settings ({was}); delete it to "
                              "choose again")  # fmt: skip
        if part not in doc:
            task, source, limit = settings["task"], settings["source"], settings["limit"]
            scored, pool = _answers(base, task, source, limit, facts.shots, config, overrides, data_dir)
            chosen = _new(facts, scored) if part == "new" else _known(facts.known, scored)  # type: ignore[arg-type]
            doc[part] = {"settings": settings, **chosen, "exemplars": pool}
            write_json(facts.ids, doc)
    new = doc["new"]
    paths = write_splits(facts.source, new["splits"], facts.out, new["exemplars"])
    if facts.known is not None:
        known = doc["known"]
        paths |= write_splits(facts.known.source, {"known": known["ids"]}, facts.out, known["exemplars"])
    return f"facts: {', '.join(str(p) for p in paths.values())}; ids in {facts.ids}"
