"""What the memory geometry lets sparse finetuning do, next to every result (docs/design.md, "The geometry
must let the claim hold"): reads per token against slots, the background df histogram, how busy the rows a
selection picks are, and how much of the table a whole stream rewrites.

SMF's premise is that a new fact's rows are rarely read by other data. At 4K slots with 16 reads per token
nearly every slot is read by most background batches; the paper has 1M slots and 128 reads per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# df histogram bins, as fractions of the N background batches a slot is read in
DF_BINS = (0.0, 0.001, 0.01, 0.1, 0.5, 1.0)


def df_histogram(df: torch.Tensor, n_batches: int) -> dict[str, float]:
    """Share of slots by the fraction of background batches reading them: never, (0, 0.1 %], ...,
    (50 %, 100 %]."""
    frac = df.double() / max(n_batches, 1)
    out = {"never read": float((df == 0).double().mean())}
    for lo, hi in zip(DF_BINS, DF_BINS[1:]):
        share = ((frac > lo) & (frac <= hi)).double().mean()
        out[f"({100 * lo:g} %, {100 * hi:g} %]"] = float(share)
    return out


def counts_stats(path: str | Path) -> dict[str, Any]:
    """Per counts file: slots, N, df histogram, median df / N over all slots (first memory layer)."""
    from titan_mem.sparse.counts import load_background_counts

    bg = load_background_counts(path)
    name = bg.layers[0]
    df, n = bg.df[name], bg.n_batches
    return {
        "slots": int(df.numel()),
        "n_batches": n,
        "tokens_per_batch": float(bg.metadata.get("tokens_per_batch", 0.0)),
        "median_df_frac": float(df.double().median() / max(n, 1)),
        "df_histogram": df_histogram(df, n),
    }


def selection_stats(selection_log: Path, counts: str | None) -> dict[str, Any]:
    """A sparse run's selections: rows per step, the union of rows updated over the stream (and its share
    of the table), and the share of selected rows read by most (> 50 %) background batches."""
    if not selection_log.is_file():
        return {}
    steps = [json.loads(ln) for ln in selection_log.read_text().splitlines() if ln.strip()]
    if not steps:
        return {}
    union: set[tuple[str, int]] = set()
    per_step = []
    for rec in steps:
        rows = [(name, r) for name, ids in rec["selected"].items() for r in ids]
        union.update(rows)
        per_step.append(len(rows))
    out: dict[str, Any] = {
        "rows_per_step": sum(per_step) / len(per_step),
        "union_rows": len(union),
        "touched_per_step": sum(r["slots_touched"] for r in steps) / len(steps),
        "selected_idf0_frac": _mean(r.get("selected_idf0_frac") for r in steps),
    }
    if counts and Path(counts).is_file():
        from titan_mem.sparse.counts import load_background_counts

        bg = load_background_counts(counts)
        slots = sum(int(bg.df[name].numel()) for name in bg.layers)
        busy = total = 0
        for rec in steps:
            for name, ids in rec["selected"].items():
                if ids:
                    df = bg.df[name].index_select(0, torch.tensor(ids, dtype=torch.int64))
                    busy += int((df > bg.n_batches / 2).sum())
                    total += len(ids)
        out["slots"] = slots
        out["union_frac"] = len(union) / max(slots, 1)
        out["selected_read_by_most"] = busy / max(total, 1)
    return out


def reads_per_token(model_args: Any) -> tuple[int, int]:
    """(value rows read per token per memory layer, slots per layer) of a model's memory."""
    m = model_args.memory
    return m.heads * m.topk, m.n_keys**2


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
