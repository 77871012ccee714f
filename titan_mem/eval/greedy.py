"""Batched greedy decoding with a KV cache (evaluation: answers to prompts, stop strings, EOS).

Prompts of different lengths share one left-padded batch: every row's last prompt token sits in the last
column, so one forward gives the next token of every row, and each row's RoPE positions start at 0 at its
first real token (pads are masked out), which makes a row's output independent of the rest of the batch up to
floating-point rounding; a row that stops leaves the batch (with the cache). A `prefix` cache (eval/prefix.py)
holds tokens every prompt starts with, computed once: the rows' own tokens follow it, left-padded, their
positions counted on from the prefix's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from titan_mem.models.kv_cache import KVCache


def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    use_cache: bool = True,
    lockstep: bool = False,
    prefix: KVCache | None = None,
) -> list[list[int]]:
    """The greedy (argmax) continuation of each prompt: its new token ids, prompt and EOS not included.

    A row stops at `eos_id`, once `should_stop(row, new_ids)` is True (checked after each appended token,
    which stays in the output: callers match stop strings such as "\\n" on the decoded text), or after
    `max_new_tokens`. A prompt longer than `model.args.max_seq_len - max_new_tokens` keeps its last tokens
    (left truncation), so prompt and answer fit the model's positions. Empty prompts are refused.

    `model` is a `Transformer` (FSDP2-sharded or not). It runs in eval mode (the query batch-norm then uses
    its running statistics, per token); each module's mode is restored afterwards. `use_cache=False`
    recomputes the whole sequence every step (same padding, positions and mask): the reference for tests
    and benchmarks. `lockstep=True` (with torch.distributed initialized): every rank keeps stepping, feeding
    its finished rows their own argmax as a dummy token, until every rank's rows are done (one all-reduce
    of a flag per step), because FSDP forwards are collectives that all ranks must call equally often.
    Ranks may pass different prompts and `max_new_tokens` (the step budget is the largest of them).
    `prefix`: a 1-row cache of tokens that precede every prompt (`prompts` are then what follows them);
    the result equals that of the whole prompts up to fp32 rounding.
    """
    if max_new_tokens < 0:
        raise ValueError(f"greedy_generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if prefix is not None and not use_cache:
        raise ValueError("greedy_generate: a prefix cache needs use_cache=True")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: empty prompt (nothing to condition on)")
    device = model.rope.device  # a plain buffer also under FSDP2 (parameters may be DTensors)
    synced = lockstep and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    steps = _global_max(max_new_tokens, device) if synced else max_new_tokens
    if not prompts and not synced:
        return []
    # A rank with no prompts still takes part in every forward: one dummy row, done from the start.
    rows = prompts or [[pad_id]]
    shared = prefix.length if prefix is not None else 0
    keep = model.args.max_seq_len - steps - shared
    if keep < 1:
        raise ValueError(
            f"greedy_generate: max_new_tokens {steps} leaves no room for a prompt in max_seq_len "
            f"{model.args.max_seq_len}" + (f" after a {shared}-token prefix" if shared else "")
        )
    tokens, pad_mask = _left_pad([p[-keep:] for p in rows], pad_id, device)
    out: list[list[int]] = [[] for _ in rows]
    done = [not prompts or max_new_tokens == 0 for _ in rows]

    with torch.no_grad(), _eval_mode(model):
        # no_grad, not inference_mode: FSDP2 keeps the root's unsharded parameters after forward, and an
        # inference tensor among them would break the next training step's backward.
        width = shared + tokens.shape[1] + steps
        if prefix is not None:
            cache = prefix.repeat(len(rows), width)
        else:
            cache = KVCache.for_model(model.args, len(rows), width, device) if use_cache else None
        seq, seq_pad = tokens, pad_mask
        step_tokens, step_pad = tokens, pad_mask
        alive = list(range(len(rows)))  # the row of `out` each batch row decodes
        for _ in range(steps):
            if not _any_running(not all(done), device, synced):
                break
            if cache is not None:
                logits = model(step_tokens, cache=cache, pad_mask=step_pad, last_only=True)
            else:
                logits = model(seq, pad_mask=seq_pad, last_only=True)
            nxt = logits[:, -1].argmax(-1)
            for i, tok in zip(alive, nxt.tolist()):
                if done[i]:
                    continue
                if eos_id is not None and tok == eos_id:
                    done[i] = True
                    continue
                out[i].append(tok)
                if len(out[i]) >= max_new_tokens or (should_stop is not None and should_stop(i, out[i])):
                    done[i] = True
            step_tokens, step_pad = nxt[:, None], torch.zeros_like(nxt[:, None], dtype=torch.bool)
            if cache is None:
                seq, seq_pad = torch.cat([seq, step_tokens], 1), torch.cat([seq_pad, step_pad], 1)
                continue
            # finished rows leave the batch (a row's output does not depend on its neighbours), so one
            # long answer does not make every finished row compute until it ends; one row stays for lockstep
            keep = [j for j, i in enumerate(alive) if not done[i]] or [0]
            if len(keep) < len(alive):
                idx = torch.tensor(keep, device=device)
                cache.keep_rows(idx)
                step_tokens, step_pad = step_tokens[idx], step_pad[idx]
                alive = [alive[j] for j in keep]
    return out[: len(prompts)]


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] with each prompt right-aligned, and pad_mask [B, T] (True = padding)."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    pad_mask = torch.ones(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        pad_mask[i, width - len(p) :] = False
    return tokens.to(device), pad_mask.to(device)


def _global_max(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _any_running(local: bool, device: torch.device, synced: bool) -> bool:
    """Whether any row (of any rank, when `synced`) still decodes: one all-reduce per step."""
    if not synced:
        return local
    return _global_max(int(local), device) > 0


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every module's own training flag is put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
