"""Synthetic study records (results.jsonl lines) with per-item scores whose analysis is known by hand.

A world of people with facts: taught facts ("t/new"), comparable untaught ones ("t/untaught"), known facts
in a validation and a test population ("t/known_val", "t/known_test", by person) and prose documents
split by item hash ("prose"). A point is placed by what it should measure:

* `learn` = specific learning (taught gain minus untaught gain, nats), `shift` = the gain both get;
* `val` / `test` = relative forgetting of every forgetting metric on that split (no item noise: exact);
* `noise` = per-item noise (std, nats) on the known-test answer NLLs, for interval tests;
* `early_loss` = nats of gain the earliest-taught third gives back (retention = -early_loss).
"""

from __future__ import annotations

import numpy as np

from titan_mem.study.analysis import AnalysisSpec
from titan_mem.study.items import is_validation
from titan_mem.study.spec import MetricRef

FORGETTING = ("t/known_{split}:answer_nll", "t/known_{split}:f1", "prose:nll")


def spec(**kw) -> AnalysisSpec:
    args = dict(
        learning=MetricRef("t/new", "answer_nll"), control=MetricRef("t/untaught", "answer_nll"),
        learning_f1=MetricRef("t/new", "f1"), control_f1=MetricRef("t/untaught", "f1"),
        forgetting=FORGETTING, bootstrap=200,
    )  # fmt: skip
    args.update(kw)
    return AnalysisSpec(**args)


class World:
    def __init__(self, people: int = 12, facts: int = 3, prose: int = 40, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rng = np.random.default_rng(seed + 1)
        self.qa = {}
        for task, prefix in (("t/new", "new"), ("t/untaught", "untaught"), ("t/known_val", "kv"),
                             ("t/known_test", "kt")):  # fmt: skip
            ids = [f"{prefix}-{p}-f{j}" for p in range(people) for j in range(facts)]
            self.qa[task] = {
                "id": ids, "group": [p for p in range(people) for _ in range(facts)],
                "answer_nll": list(rng.uniform(2.0, 5.0, len(ids))),
                "f1": list(rng.uniform(0.2, 0.9, len(ids))), "em": [0.0] * len(ids),
                "tokens": list(rng.integers(1, 6, len(ids)).astype(float)),
            }  # fmt: skip
        ids = [str(i) for i in range(prose)]
        self.prose = {"id": ids, "nll": list(rng.uniform(2.5, 4.0, prose)),
                      "tokens": list(rng.integers(20, 60, prose).astype(float))}  # fmt: skip
        self.is_val = np.array([is_validation(i) for i in ids])
        self.taught = list(self.qa["t/new"]["id"])

    def base(self, geometry: str = "1M", base_seed: int = 0, scale: float = 1.0) -> dict:
        items = {t: dict(v, answer_nll=[x * scale for x in v["answer_nll"]]) for t, v in self.qa.items()}
        items["prose"] = dict(self.prose)
        return {"arm": "base", "method": "base", "group": "base", "params": {}, "geometry": geometry,
                "base_seed": base_seed, "seed": None, "step": 0, "metrics": _metrics(items),
                "items": items}  # fmt: skip

    def point(self, method: str, seed: int, step: int, learn: float, val: float, test: float | None = None,
              *, shift: float = 0.0, f1_learn: float = 0.0, f1_shift: float = 0.0, noise: float = 0.0,
              early_loss: float = 0.0, config: str = "c0", geometry: str = "1M", base_seed: int = 0,
              group: str = "headline", base_scale: float = 1.0,
              order: list | None = None) -> dict:  # fmt: skip
        test = val if test is None else test
        b = self.base(geometry, base_seed, base_scale)["items"]
        items = {}
        n = len(self.taught)
        taught_order = self.taught if order is None else order
        early = set(taught_order[: n // 3])
        new = dict(b["t/new"])
        new["answer_nll"] = [x - learn - shift + (early_loss if i in early else 0.0)
                             for x, i in zip(b["t/new"]["answer_nll"], b["t/new"]["id"])]  # fmt: skip
        new["f1"] = [x + f1_learn + f1_shift for x in b["t/new"]["f1"]]
        items["t/new"] = new
        untaught = b["t/untaught"]
        items["t/untaught"] = dict(untaught, answer_nll=[x - shift for x in untaught["answer_nll"]],
                                   f1=[x + f1_shift for x in untaught["f1"]])  # fmt: skip
        for task, f in (("t/known_val", val), ("t/known_test", test)):
            nll = np.array(b[task]["answer_nll"]) * (1 + f)
            if noise and task == "t/known_test":
                nll = nll + self.rng.normal(0, noise, nll.size)
            items[task] = dict(b[task], answer_nll=list(nll), f1=[x * (1 - f) for x in b[task]["f1"]])
        prose = np.array(b["prose"]["nll"]) * (1 + np.where(self.is_val, val, test))
        items["prose"] = dict(b["prose"], nll=list(prose))
        arm = f"{method}-{config}-b{base_seed}-seed{seed}"
        return {"arm": arm, "method": method, "group": group, "params": {"config": config},
                "geometry": geometry, "base_seed": base_seed, "seed": seed, "step": step,
                "metrics": _metrics(items), "items": items, "taught_order": list(taught_order),
                **({"rows_per_step": 50.0} if method == "sparse" else {})}  # fmt: skip


def _metrics(items: dict) -> dict[str, float]:
    out = {}
    for task, cols in items.items():
        w = np.asarray(cols["tokens"])
        for m in ("answer_nll", "nll"):
            if m in cols:
                out[f"{task}:{m}"] = float((np.asarray(cols[m]) * w).sum() / w.sum())
        for m in ("f1", "em"):
            if m in cols:
                out[f"{task}:{m}"] = float(np.mean(cols[m]))
    return out
