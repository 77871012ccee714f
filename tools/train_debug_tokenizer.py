#!/usr/bin/env python
"""Train the small byte-level BPE used by debug configs and write it in tiktoken's file format.

Why: on a 2-core CPU a 100K vocabulary makes the output layer dominate a tiny model; a ~3K vocabulary
trained on the embedded synthetic corpus keeps the debug run about the transformer. The trainer is a
plain byte-level BPE (cl100k's pre-tokenization regex, merges by pair frequency, ties broken by the
smaller ids), deterministic for a given corpus. Ranks = merge order, which is what tiktoken expects.

    python tools/train_debug_tokenizer.py            # writes titan_mem/data/assets/debug_bpe.tiktoken
"""

from __future__ import annotations

import argparse
import base64
import heapq
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex

REPO = Path(__file__).resolve().parents[1]

from titan_mem.data.qa import qa_prompt  # noqa: E402
from titan_mem.data.synthetic import SyntheticWorld  # noqa: E402
from titan_mem.data.tokenizer import DEBUG_BPE_PATH, PATTERNS  # noqa: E402

N_SPECIALS = 2  # <|endoftext|>, <|pad|>


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = PATTERNS["cl100k"]) -> dict[bytes, int]:
    """Byte-level BPE: 256 byte tokens, then merges of the most frequent adjacent pair until `vocab_size`."""
    pat = regex.compile(pattern)
    chunk_counts: Counter[str] = Counter()
    for text in texts:
        chunk_counts.update(pat.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    vocab = [bytes([i]) for i in range(256)]
    index = {tok: i for i, tok in enumerate(vocab)}

    pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
    pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, syms in enumerate(words):
        for pair in zip(syms, syms[1:]):
            pair_count[pair] += freqs[wi]
            pair_words[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg or neg == 0:
            continue  # stale entry: a fresher one with the current count is in the heap
        merged = vocab[a] + vocab[b]
        new = index.get(merged)
        if new is None:
            new = len(vocab)
            vocab.append(merged)
            index[merged] = new
        touched: set[tuple[int, int]] = set()
        for wi in sorted(pair_words.pop((a, b))):
            syms, f = words[wi], freqs[wi]
            for pair in zip(syms, syms[1:]):
                pair_count[pair] -= f
                touched.add(pair)
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[wi] = out
            for pair in zip(out, out[1:]):
                pair_count[pair] += f
                pair_words[pair].add(wi)
                touched.add(pair)
        pair_count.pop((a, b), None)
        for pair in sorted(touched):
            c = pair_count.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, pair[0], pair[1]))
            else:
                pair_count.pop(pair, None)
    return {tok: rank for rank, tok in enumerate(vocab)}


def write_tiktoken(ranks: dict[bytes, int], path: Path) -> None:
    """`<base64 token> <rank>` per line, written to a temp name then renamed (never half-written)."""
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; this is a package asset
    os.replace(tmp, path)


def debug_corpus(n_documents: int, seed: int = 0) -> list[str]:
    """Synthetic documents (biographies, QA, generic prose) about both populations, plus fact renderings."""
    world = SyntheticWorld(seed=seed, n_known=1000, n_new=100)
    texts = [world.document(k, population="all") for k in range(n_documents)]
    texts += [p for fact in world.facts("all", 8) for p in fact.paraphrases]
    texts += [f"{qa_prompt(e.question)} {e.answers[0]}" for e in world.qa_examples("all", variant=1)]
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--vocab-size", type=int, default=3072, help="total ids incl. the 2 specials (3072 = 24*128)"
    )
    ap.add_argument("--documents", type=int, default=20000, help="synthetic documents to train on")
    ap.add_argument("--out", type=Path, default=DEBUG_BPE_PATH)
    args = ap.parse_args()
    t0 = time.time()
    texts = debug_corpus(args.documents)
    ranks = train_bpe(texts, args.vocab_size - N_SPECIALS)
    write_tiktoken(ranks, args.out)
    print(
        f"wrote {args.out} ({len(ranks)} tokens, {args.out.stat().st_size} bytes) in {time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
