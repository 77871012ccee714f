"""The study's analysis and report on hand-made results: matched forgetting read off per-seed fronts,
the base as every method's zero point, and a one-line error for a metric the base scores 0 on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from titan_mem.study.analysis import AVERAGE, analyze
from titan_mem.study.report import write_report
from titan_mem.study.spec import load_study

STUDY = """
[study]
name = "hand"
out = "{out}"
seeds = [0, 1]
[base]
checkpoint = "{out}"
[finetune]
config = "train_configs/debug_sparse_finetune.toml"
[eval]
tasks = ["synthetic_qa"]
learning = "t/new:answer_nll"
forgetting = ["t/known:f1", "prose:nll"]
[[arm]]
method = "sparse"
lr = 1.0
[[arm]]
method = "full"
lr = 1.0
"""
BASE = {"t/new:answer_nll": 4.0, "t/known:f1": 0.8, "prose:nll": 2.0}


def _rec(method: str, seed: int, step: int, learned: float, forgot: float) -> dict:
    """A record with `learned` nats of answer NLL gained and both held-out metrics `forgot` worse."""
    metrics = {
        "t/new:answer_nll": 4.0 - learned,
        "t/known:f1": 0.8 * (1 - forgot),
        "prose:nll": 2.0 * (1 + forgot),
    }
    return {"arm": f"{method}-s{seed}", "method": method, "params": {"lr": 1.0}, "seed": seed, "step": step,
            "metrics": metrics}  # fmt: skip


RECORDS = [
    _rec("sparse", 0, 10, 1.0, 0.0), _rec("sparse", 0, 20, 2.0, 0.1),
    _rec("sparse", 1, 10, 1.0, 0.0), _rec("sparse", 1, 20, 2.0, 0.2),
    _rec("full", 0, 10, 1.0, 0.2), _rec("full", 0, 20, 2.0, 0.3),
    _rec("full", 1, 10, 1.0, 0.2), _rec("full", 1, 20, 2.0, 0.3),
]  # fmt: skip


def _spec(tmp_path: Path):
    (tmp_path / "study.toml").write_text(STUDY.replace("{out}", str(tmp_path)))
    return load_study(tmp_path / "study.toml")


def test_matched_forgetting_by_hand(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    a = analyze(_spec(tmp_path), BASE, RECORDS)
    # fronts start at the base (0, 0) and reach learning 2 for both methods: levels above 0 up to 2
    assert a.levels == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])
    at = {m: {round(r.level, 6): r for r in rows} for m, rows in a.matched[AVERAGE].items()}
    # level 2: sparse seeds forget 10 % and 20 % -> 15 % +- 7.07; full 30 % in both seeds
    sparse, full = at["sparse"][2.0], at["full"][2.0]
    assert sparse.mean == pytest.approx(0.15) and sparse.std == pytest.approx(0.0707107)
    assert full.mean == pytest.approx(0.30) and full.std == pytest.approx(0.0, abs=1e-12)
    # level 1.2: linear between (1, 0) and (2, 0.1 | 0.2) -> 2 % and 4 %; full between 20 % and 30 % -> 22 %
    assert at["sparse"][1.2].mean == pytest.approx(0.03)
    assert at["full"][1.2].mean == pytest.approx(0.22)
    # level 0.4: from the base: sparse's (1, 0) dominates the base, forgetting 0; full base -> (1, 20 %): 8 %
    assert at["sparse"][0.4].mean == pytest.approx(0.0) and at["full"][0.4].mean == pytest.approx(0.08)
    assert all(r.n_reached == 2 for rows in a.matched[AVERAGE].values() for r in rows)
    # per-metric forgetting equals the mean here (both metrics move by the same relative amount)
    assert a.matched["t/known:f1"]["full"][-1].mean == pytest.approx(0.30)


def test_report_writes_tables_and_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    spec = _spec(tmp_path)
    results = tmp_path / "results.jsonl"
    base = {"arm": "base", "method": "base", "params": {}, "seed": None, "step": 0, "metrics": BASE}
    results.write_text("".join(json.dumps(r) + "\n" for r in [base, *RECORDS]))
    report = write_report(spec, results, tmp_path).read_text()
    assert "| 2 | +15.0 % ± 7.1 | +30.0 % ± 0.0 |" in report
    assert "| sparse | lr=1.0 | 2 | 20 |" in report  # final points, two seeds
    for png in ("curves.png", "tradeoff.png", "matched.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_a_metric_the_base_scores_zero_on_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(ValueError, match="t/known:f1 is 0 on the base"):
        analyze(_spec(tmp_path), {**BASE, "t/known:f1": 0.0}, RECORDS)
    with pytest.raises(ValueError, match="has no metric prose:nll"):
        analyze(_spec(tmp_path), {k: v for k, v in BASE.items() if k != "prose:nll"}, RECORDS)
