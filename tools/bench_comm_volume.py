#!/usr/bin/env python
"""Benchmark: bytes per GPU per optimizer step, with and without a gradient sync on every micro-batch.

Why: with gradient accumulation, FSDP2 reduce-scatters every gradient after each micro-batch unless
told not to (`set_requires_gradient_sync`); titan_mem syncs only after the last one
(`parallelism.sync_every_micro_batch=false`). This prints both volumes two ways:

- measured: one real training step on 2 CPU ranks (gloo, the tiny model, 4 micro-batches per rank),
  every c10d collective counted by `parallel.comm_volume.CollectiveBytes`;
- modelled at the 1B shapes (train_configs/pretrain_1b.toml) for several GPU counts, from the parameter
  counts: FSDP all-gathers bf16 parameters twice per micro-batch (forward, backward) and reduce-scatters
  fp32 gradients once per sync; memory-parallel value-table traffic per micro-batch
  (`comm_volume.memory_parallel_bytes`) does not depend on the sync setting. The measured step checks the
  same accounting at the tiny shapes (`predicted_*` fields).

    python tools/bench_comm_volume.py [--out bench_comm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titan_mem.components.bench import machine_info, write_report  # noqa: E402

TINY = [
    "--model.flavor=debug", "--model.dim=64", "--model.n_layers=2", "--model.n_heads=2",
    "--model.ffn_hidden_dim=128", "--model.memory_layers=1", "--model.memory_n_keys=16",
    "--model.memory_heads=2", "--model.memory_topk=4", "--model.memory_k_dim=16", "--model.memory_v_dim=64",
    "--training.seq_len=32", "--training.micro_batch_size=2", "--training.global_batch_size=16",
    "--checkpoint.enable=false", "--data.synthetic_known_people=50", "--data.synthetic_new_people=10",
]  # fmt: skip
GIB = 2**30


def fsdp_step_bytes(sharded: int, p: int, micro: int, sync_every: bool, param_b: int, reduce_b: int) -> dict:
    """Bytes one rank receives for FSDP-sharded parameters in one step of `micro` micro-batches."""
    share = (p - 1) / p
    gathers = 2 * share * sharded * param_b * micro  # forward + backward re-gather, every micro-batch
    syncs = micro if sync_every else 1
    reduce = share * sharded * reduce_b * syncs
    return {"all_gather": int(gathers), "reduce_scatter": int(reduce), "total": int(gathers + reduce)}


def measure(out: Path) -> None:
    """Child of torchrun: one step with and one without per-micro-batch sync; rank 0 writes the counts."""
    from titan_mem.config import parse_args
    from titan_mem.distributed import exit_process, shutdown
    from titan_mem.models.memory import is_value_table
    from titan_mem.parallel.comm_volume import CollectiveBytes
    from titan_mem.train import Trainer

    result = {}
    for sync_every in (True, False):
        run = Path(tempfile.mkdtemp(prefix="bench_comm_"))
        sync = f"--parallelism.sync_every_micro_batch={str(sync_every).lower()}"
        cfg = parse_args([*TINY, f"--job.dump_folder={run}", sync])
        trainer = Trainer(cfg)
        batches = trainer._next_batches()
        trainer.train_step(batches)  # warm-up: lazy initialisation is not steady state
        with CollectiveBytes() as counter:
            trainer.train_step(trainer._next_batches())
        named = trainer.model.named_parameters()  # FSDP shards all trainable ones but the value tables
        sharded = sum(p.numel() for n, p in named if p.requires_grad and not is_value_table(n))
        result["sync_every_micro_batch" if sync_every else "sync_last_micro_batch"] = {
            **counter.summary(),
            "micro_batches": trainer.grad_accum,
            "fsdp_sharded_params": sharded,
        }
    if trainer.dist.rank == 0:
        out.write_text(json.dumps(result))
    shutdown()
    exit_process(0)


def modelled_1b(gpus: list[int]) -> list[dict]:
    """The pretrain_1b.toml step on `gpus` GPUs: FSDP over everything but the memory-parallel value table."""
    from titan_mem.config import parse_args
    from titan_mem.data.tokenizer import padded_vocab_size, vocab_words
    from titan_mem.models.args import build_model_args
    from titan_mem.models.stats import param_counts
    from titan_mem.parallel.comm_volume import memory_parallel_bytes

    cfg = parse_args([str(REPO / "train_configs" / "pretrain_1b.toml")])
    args = build_model_args(cfg.model, padded_vocab_size(vocab_words(cfg.tokenizer)))
    counts = param_counts(args)
    sharded = counts.total - counts.memory_values
    t, m = cfg.training, args.memory
    rows = []
    for p in gpus:
        micro = t.global_batch_size // (t.micro_batch_size * p)
        table = memory_parallel_bytes(t.micro_batch_size * t.seq_len, m.heads * m.topk, args.v_dim, p, 2)
        table_step = table * len(m.layers) * micro
        every = fsdp_step_bytes(sharded, p, micro, True, 2, 4)
        last = fsdp_step_bytes(sharded, p, micro, False, 2, 4)
        rows.append(
            {
                "gpus": p,
                "micro_batches": micro,
                "fsdp_params": sharded,
                "sync_every_micro_batch_gib": round((every["total"] + table_step) / GIB, 1),
                "sync_last_micro_batch_gib": round((last["total"] + table_step) / GIB, 1),
                "reduce_scatter_gib": [round(x["reduce_scatter"] / GIB, 1) for x in (every, last)],
                "memory_table_gib": round(table_step / GIB, 1),
            }
        )
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--measure-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--gpus", default="8,32,128", help="GPU counts to model at the 1B shapes")
    args = ap.parse_args()
    if args.measure_child:
        measure(args.measure_child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        counts = Path(tmp) / "counts.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        rdzv = ["--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, __file__, "--measure-child", str(counts)]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        measured = json.loads(counts.read_text())
    for name, row in measured.items():
        row["predicted_reduce_scatter"] = fsdp_step_bytes(
            row["fsdp_sharded_params"], 2, row["micro_batches"], name == "sync_every_micro_batch", 4, 4
        )["reduce_scatter"]
    results = {
        "benchmark": "bytes per GPU per optimizer step, gradient sync every micro-batch vs the last only",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine_info(),
        "measured_tiny_2_ranks_gloo": measured,
        "modelled_pretrain_1b": modelled_1b([int(g) for g in args.gpus.split(",")]),
    }
    write_report(results, args.out)


if __name__ == "__main__":
    main()
