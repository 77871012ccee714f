"""Train a few steps on a fixed global batch split over however many ranks torchrun gives; print losses.

Invariant 2 of docs/design.md: FSDP2 on N ranks = 1 rank with the same global batch. Each rank takes its slice
of the same global batch (rank r: sequences [r*B/W, (r+1)*B/W)), so only the sharding differs. The batch
is uneven across ranks and micro-batches (see `fixed_global_batch`), so a loss normalised per rank or per
micro-batch instead of by the global token count fails the comparison.
"""

import json
import sys

import torch

from titan_mem.config import parse_args
from titan_mem.distributed import exit_process, shutdown
from titan_mem.train import Trainer


def fixed_global_batch(
    gbs: int, seq: int, vocab: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [gbs, seq + 1] and labels [gbs, seq], uneven on purpose, so that anything computed per rank or
    per micro-batch instead of over the global batch changes the numbers:

    - loss tokens: row i masks a random number of leading positions; the second half of the rows (the last
      rank's share on 2 ranks, the last micro-batches on 1) keeps only 1-3 loss tokens each and its last
      row none, so a per-rank or per-micro-batch mean loss weighs tokens differently from the global mean;
    - inputs: the second half draws from 8 token ids only, so its activation statistics differ from the
      first half's (a batch-norm synchronised within a rank only would show).
    """
    half = gbs // 2
    tokens = torch.randint(0, vocab, (gbs, seq + 1), generator=g)
    tokens[half:] = torch.randint(0, min(8, vocab), (gbs - half, seq + 1), generator=g)
    labels = tokens[:, 1:].clone()
    n_masked = torch.cat(
        [
            torch.randint(0, seq // 2 + 1, (half,), generator=g),
            seq - torch.randint(1, 4, (gbs - half,), generator=g).clamp(max=seq),
        ]
    )
    n_masked[-1] = seq
    labels[torch.arange(seq) < n_masked[:, None]] = -100
    assert (labels != -100).any(), "the global batch needs a loss token"
    return tokens, labels


def assert_uneven(labels: torch.Tensor, *chunk_sizes: int) -> None:
    """Chunks of each size (micro-batches, rank shares) differ in loss-token count, or nothing is tested."""
    for size in chunk_sizes:
        counts = (labels != -100).view(-1, size, labels.shape[1]).sum((1, 2))
        assert counts.numel() == 1 or counts.unique().numel() > 1, (size, counts.tolist())


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
    tokens, labels = fixed_global_batch(gbs, seq, vocab, g)
    mb = cfg.training.micro_batch_size
    assert_uneven(labels, mb, per_rank)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    local_in, local_lab = tokens[mine, :-1], labels[mine]
    for _ in range(cfg.training.steps):
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
