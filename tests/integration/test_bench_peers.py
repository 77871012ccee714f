"""tools/bench_peers.py cannot rot: every case runs at tiny size through the CLI, writes its JSON report with
the machine and the command, and checks what it must (equal generated tokens, log-likelihoods within 1e-4);
the row-sparse step allocates nothing table-sized where the dense and masked recipes do."""

from __future__ import annotations

import json

from conftest import ok, run_tool


def test_every_case_runs_at_tiny_size(tmp_path):
    out = tmp_path / "peers.json"
    ok(run_tool("bench_peers.py", ["--quick", "--repeat", "1", "--out", str(out)]))
    report = json.loads(out.read_text())
    assert report["command"].startswith("python tools/bench_peers.py --quick")
    assert {"date", "torch", "cpus"} <= set(report["machine"])
    for row in report["pkm"]:
        assert row["ratio_forward"] > 0 and row["ratio_forward_backward_row_sparse"] > 0
        assert row["peer_forward"]["min_s"] <= row["peer_forward"]["median_s"] <= row["peer_forward"]["max_s"]
    for row in report["sparse_update"]:
        table = row["slots"] * 512 * 4  # fp32 bytes of the value table
        assert row["dense_grad"]["alloc"]["largest_bytes"] >= table  # the dense gradient
        assert row["masked"]["alloc"]["largest_bytes"] >= table
        assert row["row_sparse"]["alloc"]["largest_bytes"] < table  # rows touched only
    assert all(row["tokens_equal"] for row in report["generate"])
    assert report["eval"]["max_logprob_gap"] <= 1e-4
    assert {row["method"] for row in report["finetune"]} == {"full", "lora"}
    assert all(row["first_loss_gap"] <= 1e-3 for row in report["finetune"])  # same loss before any update
    for row in report["finetune"]:  # a process that loaded torch and a model holds more than 100 MiB
        assert 100 < row["ours_peak_rss_mib"] and 100 < row["peer_peak_rss_mib"]
    table = ok(run_tool("bench_peers.py", ["--table", str(out)])).stdout  # docs/benchmarks.md's tables
    assert table.count("| 4,096 |") == 1 and "| finetune | lora, 2x16 |" in table
    assert "| lora, 2x16 |" in table.split("peak RSS")[1]  # each side measured in its own process


def test_an_unknown_case_is_one_line(tmp_path):
    proc = run_tool("bench_peers.py", ["--cases", "pkm,speed"])
    assert proc.returncode == 2 and "--cases: unknown 'speed'" in proc.stderr.strip().splitlines()[-1]
