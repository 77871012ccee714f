"""The peer benchmark's report as the markdown tables of docs/benchmarks.md."""

from __future__ import annotations

from typing import Any


def _ms(t: dict[str, float]) -> str:
    return f"{t['median_s'] * 1e3:,.0f} ({t['min_s'] * 1e3:,.0f}-{t['max_s'] * 1e3:,.0f})"


def markdown(report: dict[str, Any]) -> str:
    """The report's cases as markdown tables: ms as median (min-max), ratio = peer / ours (> 1: ours is
    faster)."""
    out = []
    if "pkm" in report:
        out += ["| slots | forward ours / peer | ratio | fwd+bwd ours / peer | ratio | fwd+bwd row-sparse "
                "| ratio |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["pkm"]:
            out.append(
                f"| {r['slots']:,} | {_ms(r['ours_forward'])} / {_ms(r['peer_forward'])} | "
                f"{r['ratio_forward']:.2f} | {_ms(r['ours_forward_backward'])} / "
                f"{_ms(r['peer_forward_backward'])} | {r['ratio_forward_backward']:.2f} | "
                f"{_ms(r['ours_forward_backward_row_sparse'])} | "
                f"{r['ratio_forward_backward_row_sparse']:.2f} |"
            )
        out.append("")
    if "sparse_update" in report:
        out += ["| slots | row-sparse (ours) | dense grad + rows | masked recipe | vs dense | vs masked |"
                " largest alloc MiB: ours / dense / masked |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["sparse_update"]:
            mib = [r[h]["alloc"]["largest_bytes"] / 2**20 for h in ("row_sparse", "dense_grad", "masked")]
            out.append(
                f"| {r['slots']:,} | {_ms(r['row_sparse'])} | {_ms(r['dense_grad'])} | {_ms(r['masked'])} | "
                f"{r['ratio_vs_dense_grad']:.2f} | {r['ratio_vs_masked']:.2f} | "
                + " / ".join(f"{m:,.0f}" for m in mib)
                + " |"
            )
        out.append("")
    rows = [("generate", r, f"batch {r['batch']}, {r['tokens_generated']} tokens", "tok/s",
             r["ours_tokens_per_s"], r["peer_tokens_per_s"]) for r in report.get("generate", [])]  # fmt: skip
    if "eval" in report:
        e = report["eval"]
        rows.append(
            ("eval", e, f"{e['items']} items", "items/s", e["ours_items_per_s"], e["peer_items_per_s"])
        )
    for r in report.get("finetune", []):
        what = f"{r['method']}{', compiled' if r.get('compiled') else ''}, {r['batch'][0]}x{r['batch'][1]}"
        rows.append(("finetune", r, what, "tok/s", r["ours_tokens_per_s"], r["peer_tokens_per_s"]))
    if rows:
        out += ["| case | what | ms ours | ms peer | ours | peer | ratio |", "|---|---|---|---|---|---|---|"]
        for case, r, what, unit, ours, peer in rows:
            out.append(
                f"| {case} | {what} | {_ms(r['ours'])} | {_ms(r['peer'])} | {ours:,.1f} {unit} | "
                f"{peer:,.1f} {unit} | {r['ratio']:.2f} |"
            )
    rss = [r for r in report.get("finetune", []) if "ours_peak_rss_mib" in r]
    if rss:
        out += ["", "| finetune | peak RSS MiB ours | peer | peer / ours |", "|---|---|---|---|"]
        for r in rss:
            ours, peer = r["ours_peak_rss_mib"], r["peer_peak_rss_mib"]
            out.append(f"| {r['method']}, {r['batch'][0]}x{r['batch'][1]} | {ours:,.0f} | {peer:,.0f} | "
                       f"{peer / ours:.2f} |")  # fmt: skip
    return "\n".join(out)
