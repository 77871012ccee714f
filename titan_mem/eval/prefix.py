"""A prompt prefix that every request of a call shares, computed once: its keys/values go into a 1-row KV
cache that each batch copies (`KVCache.repeat`) before running only its rows' own tokens.

Few-shot evaluation puts the same exemplars before every item (lm-eval's convention: k "Question: ..\\n
Answer: .." blocks joined by blank lines), so without this the exemplars dominate the compute: 5 TriviaQA
shots are ~5x the tokens of the item itself. The shared part is found on the *token* sequences (the longest
common prefix), not on the text: a BPE tokenizer may merge across the exemplars' last "\\n\\n" and the item
(SmolLM2 writes "\\n\\n" as one token at the end of a text, as two before a word), so the tokens stay those
of the whole prompt, as lm-eval tokenizes it, and reuse changes no number beyond fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from titan_mem.models.kv_cache import KVCache

PREFIX_MIN_TOKENS = 16  # a shorter shared prefix is recomputed per row (the copy would cost about as much)


def shared_length(seqs: Sequence[Sequence[int]], cap: int) -> int:
    """How many leading tokens every sequence has in common, at most `cap` (>= 0)."""
    if not seqs:
        return 0
    first, n = seqs[0], max(0, min(cap, min(len(s) for s in seqs)))
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def prefill(model: torch.nn.Module, ids: Sequence[int]) -> KVCache:
    """A 1-row cache holding the keys/values of `ids` at positions 0..len-1: one forward of the prefix."""
    device = model.rope.device  # a plain buffer also under FSDP2 (parameters may be DTensors)
    cache = KVCache.for_model(model.args, 1, len(ids), device)
    model(torch.tensor([list(ids)], dtype=torch.long, device=device), cache=cache, last_only=True)
    return cache
