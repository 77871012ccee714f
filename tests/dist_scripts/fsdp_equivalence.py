"""Train a few steps on a fixed global batch split over however many ranks torchrun gives; print losses.

Invariant 2 of DESIGN.md: FSDP2 on N ranks = 1 rank with the same global batch. Each rank takes its slice
of the same global batch (rank r: sequences [r*B/W, (r+1)*B/W)), so only the sharding differs.
"""

import json
import sys

import torch

from titan_mem.config import parse_args
from titan_mem.distributed import exit_process, shutdown
from titan_mem.train import Trainer


def main() -> None:
    out_path, *args = sys.argv[1:]
    cfg = parse_args(args)
    trainer = Trainer(cfg)
    world, rank = trainer.dist.world_size, trainer.dist.rank
    g = torch.Generator().manual_seed(1234)
    gbs, seq, vocab = cfg.training.global_batch_size, cfg.training.seq_len, trainer.tokenizer.n_words
    per_rank = gbs // world
    records = []
    # One fixed global batch, seen every step: its loss must fall, so "training happens" is checkable
    # (fresh random tokens each step would make the curve noise).
    tokens = torch.randint(0, vocab, (gbs, seq + 1), generator=g)
    for _ in range(cfg.training.steps):
        labels = tokens[:, 1:].clone()
        labels[:, : seq // 4] = -100  # some masked positions, unevenly spread over ranks
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        local_in, local_lab = tokens[mine, :-1], labels[mine]
        mb = cfg.training.micro_batch_size
        batches = [
            {
                "input_ids": local_in[i : i + mb],
                "labels": local_lab[i : i + mb],
                "token_mask": torch.ones_like(local_in[i : i + mb], dtype=torch.bool),
            }
            for i in range(0, per_rank, mb)
        ]
        info = trainer.train_step(batches)
        trainer.step += 1
        records.append({"loss": info["loss"], "grad_norm": info["grad_norm"]})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(records, f)
    shutdown()


if __name__ == "__main__":
    main()
    exit_process(0)
