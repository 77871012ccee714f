"""The scoring primitives every task (and the lm-eval adapter) is built from: continuation log-likelihood,
rolling log-likelihood of whole texts and greedy generation with stop strings.

Requests are planned into batches *globally* (longest first, a row and token budget per batch), and rank r
runs batches r, r + W, ...: every request is computed in the same batch, with the same padding, whatever
the number of ranks, so a torchrun evaluation gives the numbers of one process bit for bit. Results are
gathered to every rank. FSDP forwards are collectives, so under several ranks a rank with no batch left
runs a discarded stand-in batch until every rank is done (lockstep).

Conventions follow lm-eval's HF model: the context starts with BOS; the continuation's tokens are those of
`encode(context + continuation)` after the context's (`_encode_pair`), with trailing context whitespace moved
to the continuation; a sequence longer than the model keeps its last tokens (left truncation).

Requests that share a long token prefix (few-shot exemplars) compute it once (eval/prefix.py) and each batch
runs only its rows' own tokens after a copy of its KV cache; `reuse_prefix=False` recomputes it per row, the
reference the tests hold reuse to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from titan_mem.eval.greedy import greedy_generate
from titan_mem.eval.prefix import PREFIX_MIN_TOKENS, prefill, shared_length
from titan_mem.models.args import ModelArgs
from titan_mem.models.kv_cache import KVCache

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Score:
    """Log-likelihood of a continuation: summed log-probability (nats), its token count and whether greedy
    decoding would have produced it token for token (lm-eval's `is_greedy`)."""

    logprob: float
    n_tokens: int
    greedy: bool

    @property
    def nll_per_token(self) -> float:
        return -self.logprob / max(self.n_tokens, 1)


class EvalModel:
    """A model in eval mode with its tokenizer; every method takes the full request list on every rank and
    returns the full result list on every rank.

    `reuse_prefix`: compute a prefix every request shares once (a `Transformer` only: it needs a KV cache).
    `inference`: run under torch.inference_mode (a standalone evaluation) where the model is not sharded;
    FSDP2 (a training run's model, and tools/evaluate.py's) gathers parameters that must track versions, so a
    sharded model runs under no_grad."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_seq_len: int,
        batch_size: int = 16,
        max_batch_tokens: int = 16384,
        progress: Callable[[int, str], Callable[[int], None]] | None = None,
        reuse_prefix: bool = True,
        inference: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.reuse_prefix = reuse_prefix and isinstance(getattr(model, "args", None), ModelArgs)
        self.prefix_min_tokens = PREFIX_MIN_TOKENS
        self.inference = inference and not any(hasattr(p, "device_mesh") for p in model.parameters())
        self.max_seq_len, self.batch_size, self.max_batch_tokens = max_seq_len, batch_size, max_batch_tokens
        self.device = _model_device(model)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.progress = progress

    # ---- tokenization ----------------------------------------------------------------------------------
    def start_ids(self) -> list[int]:
        """What a text starts with: the model's BOS where its tokenizer adds one (`prefix_ids`), else BOS as
        lm-eval's prefix token where something must be conditioned on. The one place the convention lives."""
        return list(self.tokenizer.prefix_ids()) or [self.tokenizer.bos_id]

    def with_start(self, ids: Sequence[int]) -> list[int]:
        """`ids` after the model's own prefix (none for SmolLM2); an empty result falls back to BOS."""
        return [*self.tokenizer.prefix_ids(), *ids] or self.start_ids()

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prefix + context tokens, continuation tokens) as lm-eval's HFLM._encode_pair makes them; the
        prefix is the model's BOS where it adds one, and an empty context falls back to BOS (lm-eval's
        prefix token) so the first continuation token is scored."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return self.with_start(ctx), whole[len(ctx) :]

    # ---- scoring ---------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood") -> list[Score]:
        """log p(continuation | context) for each (context, continuation)."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests], desc)

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "rolling") -> list[Score]:
        """log p(text) over all its tokens after BOS, in disjoint windows of max_seq_len targets (each
        window conditions on its own tokens only, as lm-eval's rolling windows with context length 1)."""
        pieces: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            ids = [*self.start_ids(), *self.tokenizer.encode(text)]
            for start in range(0, max(len(ids) - 1, 1), self.max_seq_len):
                window = ids[start : start + self.max_seq_len + 1]
                pieces.append((window[:1], window[1:]))
                owner.append(i)
        scores = self.score_tokens(pieces, desc)
        out = [[0.0, 0, True] for _ in texts]
        for i, s in zip(owner, scores):
            out[i][0] += s.logprob
            out[i][1] += s.n_tokens
            out[i][2] = out[i][2] and s.greedy
        return [Score(lp, n, g) for lp, n, g in out]

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "score") -> list[Score]:
        """Token-level loglikelihood: (context ids, continuation ids) pairs; the context holds >= 1 token."""
        seqs = []
        for ctx, cont in pairs:
            if not ctx:
                raise ValueError("score_tokens: the context must hold at least one token (BOS)")
            seq = (list(ctx) + list(cont))[-(self.max_seq_len + 1) :]
            seqs.append((seq, min(len(cont), len(seq) - 1)))
        # a shared prefix ends before each row's last context token (whose logits score the continuation)
        cap = min((len(s) - 1 - max(n, 1) for s, n in seqs), default=0)
        with self.no_grad():
            prefix = self._shared_prefix([s for s, _ in seqs], cap)
            return self._map(seqs, lambda b: self._score_batch(b, prefix), key=lambda s: len(s[0]), desc=desc)

    def no_grad(self) -> Any:
        """torch.inference_mode for a standalone evaluation, torch.no_grad inside a training run."""
        return torch.inference_mode() if self.inference else torch.no_grad()

    def _shared_prefix(self, seqs: Sequence[Sequence[int]], cap: int) -> KVCache | None:
        """The KV cache of the tokens all `seqs` begin with (at most `cap`), or None where reuse is off or
        the shared part is shorter than `prefix_min_tokens`. Every rank computes it (FSDP: a collective)."""
        n = shared_length(seqs, cap) if self.reuse_prefix else 0
        return prefill(self.model, seqs[0][:n]) if n >= max(self.prefix_min_tokens, 1) else None

    def _score_batch(self, batch: list[tuple[list[int], int]], prefix: KVCache | None = None) -> list[Score]:
        p = prefix.length if prefix is not None else 0  # rows are right-padded after their own tokens
        width = max(len(seq) for seq, _ in batch) - 1 - p
        inputs = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
        for i, (seq, _) in enumerate(batch):
            inputs[i, : len(seq) - 1 - p] = torch.tensor(seq[p:-1])
        if prefix is None:
            logits = self.model(inputs.to(self.device))
        else:
            logits = self.model(inputs.to(self.device), cache=prefix.repeat(len(batch), p + width))
        out = []
        for i, (seq, n_cont) in enumerate(batch):
            end = len(seq) - 1 - p
            rows = logits[i, end - n_cont : end].float().log_softmax(-1)
            target = torch.tensor(seq[len(seq) - n_cont :], device=rows.device)
            logprob = rows.gather(-1, target[:, None]).sum()
            greedy = bool((rows.argmax(-1) == target).all())
            out.append(Score(float(logprob), n_cont, greedy))
        return out

    # ---- generation -------------------------------------------------------------------------------------
    def generate_until(
        self,
        prompts: Sequence[str],
        *,
        until: Sequence[str] = ("\n",),
        max_new_tokens: int = 32,
        desc: str = "generate",
    ) -> list[str]:
        """Greedy continuation of each prompt (after BOS), cut before the first stop string; EOS and
        `max_new_tokens` also stop it."""
        until = [u for u in until if u]
        encoded = [self.with_start(self.tokenizer.encode(p)) for p in prompts]
        keep = self.max_seq_len - max_new_tokens
        if keep < 1:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room in max_seq_len {self.max_seq_len}"
            )
        encoded = [ids[-keep:] for ids in encoded]
        cap = min((len(e) for e in encoded), default=1) - 1  # every row keeps >= 1 token of its own

        def stop(_row: int, new: list[int]) -> bool:
            text = self.tokenizer.decode(new)
            return any(u in text for u in until)

        def run(batch: list[list[int]], prefix: KVCache | None) -> list[str]:
            p = prefix.length if prefix is not None else 0
            ids = greedy_generate(
                self.model,
                [b[p:] for b in batch],
                prefix=prefix,
                max_new_tokens=max_new_tokens,
                pad_id=self.tokenizer.pad_id,
                eos_id=self.tokenizer.eos_id,
                should_stop=stop if until else None,
                lockstep=self.world > 1,
            )
            return [cut_at_stop(self.tokenizer.decode(x), until) for x in ids]

        with self.no_grad():
            prefix = self._shared_prefix(encoded, cap)
            return self._map(
                encoded, lambda b: run(b, prefix), key=len, desc=desc, extra_tokens=max_new_tokens
            )

    # ---- planning and gathering ---------------------------------------------------------------------------
    def _map(
        self,
        items: Sequence[T],
        run: Callable[[list[T]], list[R]],
        *,
        key: Callable[[T], int],
        desc: str,
        extra_tokens: int = 0,
    ) -> list[R]:
        if not items:
            return []
        batches = plan_batches([key(x) + extra_tokens for x in items], self.batch_size, self.max_batch_tokens)
        rounds = math.ceil(len(batches) / self.world)
        tick = self.progress(rounds, desc) if self.progress and self.rank == 0 else None
        mine: dict[int, R] = {}
        for r in range(rounds):
            b = r * self.world + self.rank
            if b < len(batches):
                results = run([items[i] for i in batches[b]])
                mine.update(zip(batches[b], results))
            else:  # lockstep: FSDP forwards are collectives
                run([items[i] for i in batches[0]])
            if tick:
                tick(r + 1)
        if self.world > 1:
            parts: list[dict[int, R] | None] = [None] * self.world
            dist.all_gather_object(parts, mine)
            for part in parts:
                mine.update(part or {})
        return [mine[i] for i in range(len(items))]


def plan_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices in batches, longest first (an out-of-memory shows at once), each batch at most `max_rows`
    rows and `max_tokens` padded tokens (one over-long row still gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            cur = batches[-1]
            width = lengths[cur[0]]  # the first row of a batch is its longest
            if len(cur) < max_rows and width * (len(cur) + 1) <= max_tokens:
                cur.append(i)
                continue
        batches.append([i])
    return batches


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    end = len(text)
    for u in until:
        pos = text.find(u)
        if pos != -1:
            end = min(end, pos)
    return text[:end]


def _model_device(model: torch.nn.Module) -> torch.device:
    for buf in model.buffers():
        return buf.device
    p = next(model.parameters())
    return p.device if not hasattr(p, "device_mesh") else torch.device(p.device_mesh.device_type)


def nll_summary(scores: Sequence[Score]) -> dict[str, float]:
    """Token-weighted NLL (nats/token) and its perplexity over a set of scored continuations."""
    tokens = sum(s.n_tokens for s in scores)
    nll = -sum(s.logprob for s in scores) / max(tokens, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "tokens": float(tokens)}
