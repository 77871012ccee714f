"""Benchmark: the memory value lookup (PyTorch vs Triton) and what a value table costs on the network.

    python tools/bench_memory_layer.py [--quick] [--backends B,..] [--skip-comm|--skip-kernels] [--out FILE]
        [--shapes MxDxN,..] [--dtypes float32,bfloat16]

--shapes replaces the sweep (e.g. 1048576x1024x8192: the 1B table and micro-batch); every row reports the
forward's max error against an fp64 lookup of the same rows (first 256 tokens), the sparse table gradient's
max difference from the torch backend's, and on a GPU the fraction of the device's peak HBM bandwidth.

kernels   forward and forward+backward time of `value_lookup` for M in {64K, 1M} rows, D in {256, 1024},
          4 heads x top-32 = 128 rows a token, N in {4K, 32K} tokens, every available backend in the same run
          (Triton needs CUDA), with effective GB/s: the forward moves N*K*D*b bytes of rows + N*K*12 of
          indices/weights + N*D*b of output. Backward: table gradient row-sparse (sparse finetuning) and
          dense (pretraining). --quick: M 64K, N 4K only.
comm      bytes per rank and micro-batch of an FSDP-gathered vs a memory-parallel table: computed at the 1B
          shapes (pretrain_1b.toml) for 8 and 64 ranks, and counted from the collectives of one real
          training micro-batch (build_model + forward/backward) on 2 CPU ranks under torchrun, both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titan_mem.components.bench import machine_info, write_report  # noqa: E402
from titan_mem.components.metrics import peak_memory_bandwidth  # noqa: E402
from titan_mem.kernels import value_lookup  # noqa: E402
from titan_mem.parallel.comm_volume import (  # noqa: E402
    CollectiveBytes,
    fsdp_table_bytes,
    memory_parallel_bytes,
)

K = 4 * 32  # heads x topk rows a token reads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_lookup(m: int, d: int, n: int, backend: str, device: torch.device, dtype: torch.dtype, repeat: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    table = (torch.randn(m, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_(True)
    idx = torch.randint(0, m, (n, K), generator=g).to(device)
    w = torch.softmax(torch.randn(n, K, generator=g), -1).to(device).requires_grad_(True)
    up = torch.randn(n, d, generator=g).to(device, dtype)

    def forward():
        with torch.no_grad():
            value_lookup(table, idx, w, backend=backend)

    def forward_backward(sparse: bool):
        def run():
            table.grad = w.grad = None
            (value_lookup(table, idx, w, sparse, backend) * up).sum().backward()

        return run

    b = table.element_size()
    moved = n * K * d * b + n * K * 12 + n * d * b
    fwd = _time(forward, device, repeat)
    out = {"M": m, "D": d, "N": n, "K": K, "backend": backend, "dtype": str(dtype).removeprefix("torch.")}
    out["forward_s"] = fwd
    out["forward_GBps"] = moved / fwd / 1e9
    peak = peak_memory_bandwidth(device)
    out["forward_peak_hbm_fraction"] = moved / fwd / peak if peak else None
    with torch.no_grad():  # fp64 reference of the first tokens' bags, from the same (rounded) table rows
        few = slice(0, min(n, 256))
        ref = torch.einsum("nkd,nk->nd", table[idx[few]].double(), w[few].double())
        got = value_lookup(table, idx[few], w[few], backend=backend).double()
        out["forward_max_abs_err"] = (got - ref).abs().max().item()
        out["forward_ref_max_abs"] = ref.abs().max().item()
    for name, sparse in (("fwd_bwd_sparse_s", True), ("fwd_bwd_dense_s", False)):
        out[name] = _time(forward_backward(sparse), device, repeat)
    out["bwd_over_fwd_sparse"] = (out["fwd_bwd_sparse_s"] - fwd) / fwd
    forward_backward(True)()
    out["sparse_grad"] = table.grad.coalesce()
    out["weight_grad"] = w.grad
    return out


def _compare_to_torch(results: list[dict]) -> None:
    """Max |difference| of each backend's sparse table gradient and weight gradient from the torch
    backend's on the same inputs (the tensors are dropped from the report afterwards)."""
    by_shape: dict[tuple, dict] = {}
    for r in results:
        by_shape.setdefault((r["M"], r["D"], r["N"], r["dtype"]), {})[r["backend"]] = r
    for group in by_shape.values():
        ref = group.get("torch")
        for r in group.values():
            if ref is not None and r is not ref:
                a, b = r["sparse_grad"], ref["sparse_grad"]
                same_rows = torch.equal(a.indices(), b.indices())
                r["grad_rows_equal_torch"] = same_rows
                if same_rows:
                    diff = a.values().float() - b.values().float()
                    r["grad_table_max_abs_diff"] = diff.abs().max().item()
                r["grad_weights_max_abs_diff"] = (r["weight_grad"] - ref["weight_grad"]).abs().max().item()
    for r in results:
        del r["sparse_grad"], r["weight_grad"]


def _shapes(args) -> list[tuple[int, int, int]]:
    if args.shapes:
        try:
            return [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]  # type: ignore[misc]
        except ValueError:
            sys.exit(f"bench_memory_layer: --shapes {args.shapes!r}: expected MxDxN[,MxDxN...]")
    rows = [65536] if args.quick else [65536, 1 << 20]
    tokens = [4096] if args.quick else [4096, 32768]
    return [(m, d, n) for m in rows for d in (256, 1024) for n in tokens]


def kernels(args, device: torch.device) -> list[dict]:
    default = "bfloat16" if device.type == "cuda" else "float32"
    dtypes = [getattr(torch, name) for name in (args.dtypes or default).split(",")]
    triton_here = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    backends = [b for b in args.backends.split(",") if b != "triton" or triton_here]
    results = []
    for m, d, n in _shapes(args):
        for dtype in dtypes:
            for backend in backends:
                r = bench_lookup(m, d, n, backend, device, dtype, args.repeat)
                print(
                    f"  M={m} D={d} N={n} {r['dtype']} {backend}: fwd {r['forward_s'] * 1e3:.2f} ms "
                    f"({r['forward_GBps']:.1f} GB/s), max err {r['forward_max_abs_err']:.2e}",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(r)
    _compare_to_torch(results)
    return results


# ---------------------------------------------------------------------------------------------- communication


def computed_comm() -> list[dict]:
    """The 1B config: M = 1024^2, D = 1024, micro-batch 4 x 2048 tokens per rank, bf16 params, fp32 reduce."""
    m, d, n = 1 << 20, 1024, 4 * 2048
    out = []
    for p in (8, 64):
        fsdp = fsdp_table_bytes(m, d, p, 2, 4)
        mp = memory_parallel_bytes(n, K, d, p, 2)
        out.append(
            {
                "ranks": p,
                "tokens_per_rank": n,
                "fsdp_bytes": fsdp,
                "memory_parallel_bytes": mp,
                "ratio": fsdp / mp,
            }
        )
    return out


COMM_MODEL = [
    str(REPO / "train_configs" / "debug_model.toml"),
    "--model.memory_n_keys=128",  # 16,384 slots
    "--model.memory_v_dim=256",
    "--training.seq_len=64",
    "--training.micro_batch_size=4",
    "--training.global_batch_size=8",
    "--checkpoint.enable=false",
]


def comm_child(out: Path, degree: int) -> None:
    """One micro-batch forward/backward of the real model on this torchrun rank, collectives counted."""
    from titan_mem.components.model import build_model
    from titan_mem.config import parse_args
    from titan_mem.data.tokenizer import build_tokenizer
    from titan_mem.distributed import init_distributed

    cfg = parse_args([*COMM_MODEL, f"--parallelism.memory_parallel_degree={degree}"])
    info = init_distributed("cpu")
    model, args = build_model(cfg, info, build_tokenizer(cfg.tokenizer))
    tokens = torch.randint(0, args.vocab_size, (cfg.training.micro_batch_size, cfg.training.seq_len))
    model(tokens).float().pow(2).mean().backward()  # warm-up: lazy FSDP state
    counter = CollectiveBytes()
    with counter:
        model(tokens).float().pow(2).mean().backward()
    if info.rank == 0:
        mem = args.memory
        result = {
            "degree": degree,
            "measured": counter.summary(),
            "M": mem.n_slots,
            "D": args.v_dim,
            "N": tokens.numel(),
            "K": mem.heads * mem.topk,
        }
        out.write_text(json.dumps(result))


def measured_comm() -> dict:
    """Both layouts on 2 CPU ranks; the difference of their totals is the value table's traffic."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for degree, name in ((0, "fsdp"), (-1, "memory_parallel")):
            out = Path(tmp) / f"{name}.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                "--standalone",
                __file__,
                "--comm-child",
                str(out),
                str(degree),
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            if proc.returncode != 0:
                sys.exit(f"bench_memory_layer: comm child failed: {proc.stderr.strip().splitlines()[-1:]}")
            runs[name] = json.loads(out.read_text())
    shape = runs["fsdp"]
    m, d, n, k = shape["M"], shape["D"], shape["N"], shape["K"]
    fsdp_total = runs["fsdp"]["measured"]["total_bytes"]
    mp_total = runs["memory_parallel"]["measured"]["total_bytes"]
    return {
        "ranks": 2,
        "shape": {"M": m, "D": d, "tokens_per_rank": n, "K": k, "dtype": "float32"},
        "fsdp": runs["fsdp"]["measured"],
        "memory_parallel": runs["memory_parallel"]["measured"],
        "measured_difference_bytes": fsdp_total - mp_total,
        "computed_difference_bytes": fsdp_table_bytes(m, d, 2, 4, 4) - memory_parallel_bytes(n, k, d, 2, 4),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--comm-child":
        comm_child(Path(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="M 64K and N 4K only")
    ap.add_argument("--backends", default="torch,triton", help="comma-separated; triton runs on CUDA only")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-comm", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--shapes", help="MxDxN[,...]: table rows x value dim x tokens, instead of the sweep")
    ap.add_argument("--dtypes", help="comma-separated table dtypes (default: bfloat16 on CUDA, else float32)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"machine": machine_info(), "command": " ".join(sys.argv), "device": str(device)}
    if device.type == "cuda":
        report["note"] = "Triton kernels on the GPU; compare backends only within this run"
    if not args.skip_kernels:
        report["kernels"] = kernels(args, device)
    report["comm_computed_1b"] = computed_comm()
    if not args.skip_comm:
        report["comm_measured_2_cpu_ranks"] = measured_comm()
    write_report(report, args.out)


if __name__ == "__main__":
    main()
