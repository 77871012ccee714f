"""Finetuning data (facts, QA, documents) and loaders for the real evaluation sets.

Finetuning batches are indexed by the *global* step: batch(step, rank) is a pure function, so the
loader state is one counter and any worker count or restart reproduces the same batches.

* facts (SMF): step s trains one fact. Its paraphrases, cycled, fill the global batch (dp_world_size x
  micro_batch_size rows); rank r takes rows [r*B, (r+1)*B). Loss on every real token, none on padding.
* qa: rows `[BOS] Question: q\\nAnswer: a [EOS]`, loss on ` a [EOS]` only; consecutive examples fill the
  global batch, rank r takes its slice (or, with `data.bucket_batches`, rows of like length: data/buckets.py).
* documents: each document `[BOS] text [EOS]` is cut into seq_len chunks in order (one chunk per row,
  micro_batch_size=1 gives one step per chunk, as in SMF's SimpleQA-document setting).

Finetune sets are small, so they are held in memory; per-epoch order is shuffled with (seed, epoch) when
`data.shuffle_buffer > 0` (documents always keep their order). A batch is padded to seq_len, or with
`data.pad_multiple` only to its optimizer step's longest row.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from titan_mem.data.buckets import BucketPlan, empty_row, padded_length
from titan_mem.data.chat import chat_rows, load_conversations
from titan_mem.data.config import DataConfig
from titan_mem.data.documents import BadDoc, DocStats
from titan_mem.data.facts import facts_from_qa
from titan_mem.data.packing import Row, make_row, rows_to_batch
from titan_mem.data.record_files import load_records, read_records
from titan_mem.data.records import FactExample, GSM8KExample, MultipleChoiceExample, QAExample
from titan_mem.data.sources import build_source
from titan_mem.data.tokenizer import Tokenizer
from titan_mem.errors import ConfigError, DataError

logger = logging.getLogger("titan_mem.data")

QA_PROMPT = "Question: {question}\nAnswer:"


def qa_prompt(question: str) -> str:
    """The one QA format used for training and evaluation; the answer follows after a space."""
    return QA_PROMPT.format(question=question.strip())


# ---- step-indexed datasets -------------------------------------------------------------------------------
class StepDataset(IterableDataset):
    """Yields batch(step) for step = 0, 1, 2, ...; with W DataLoader workers worker w yields w, w+W, ...

    `step_rows(opt_step)` gives an optimizer step's global batch in slot order; micro-step m of this rank
    takes slot (m % accum) * dp_world_size + dp_rank of optimizer step m // accum, padded to the length
    `padded_length` gives the whole step. The state is how many batches this iterator has yielded;
    StatefulDataLoader keeps one per worker and replays its round-robin order, so the batch sequence does
    not depend on the worker count.
    """

    def __init__(
        self,
        step_rows: Callable[[int], list[Row]],
        *,
        micro_batch_size: int,
        accum: int,
        dp_rank: int,
        dp_world_size: int,
        steps_per_epoch: int,
        seq_len: int,
        pad_id: int,
        pad_multiple: int,
        repeat: bool,
        description: str,
    ) -> None:
        if steps_per_epoch < 1:
            raise DataError(f"{description}: no examples (empty finetuning set)")
        self.step_rows, self.steps_per_epoch = step_rows, steps_per_epoch
        self.micro, self.accum = micro_batch_size, accum
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.seq_len, self.pad_id, self.pad_multiple, self.repeat = seq_len, pad_id, pad_multiple, repeat
        self.description = description
        self._yielded = 0
        self._last: tuple[int, list[Row]] | None = None  # the last optimizer step's rows (accum reads them)

    def state_dict(self) -> dict[str, Any]:
        return {"yielded": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "yielded" not in state:
            raise DataError("finetuning data state is missing 'yielded' (not a StepDataset state)")
        self._yielded = int(state["yielded"])

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Micro-step `step`'s batch for this rank."""
        opt_step, a = divmod(step, self.accum)
        if self._last is None or self._last[0] != opt_step:
            self._last = (opt_step, self.step_rows(opt_step))
        rows = self._last[1]
        k = a * self.dp_world_size + self.dp_rank
        length = padded_length(rows, self.seq_len, self.pad_multiple)
        return rows_to_batch(rows[k * self.micro : (k + 1) * self.micro], length, self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        while True:
            step = self._yielded * n_workers + worker
            if not self.repeat and step >= self.steps_per_epoch:
                return
            self._yielded += 1
            yield self.batch(step)


class _EpochOrder:
    """Per-epoch permutation of n items, seeded by (seed, epoch); identity when not shuffling."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._cache: tuple[int, np.ndarray] | None = None

    def __call__(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch, 0xFAC7]).permutation(self.n))
        return self._cache[1]


def fact_rows(facts: Sequence[FactExample], tokenizer: Tokenizer) -> list[list[Row]]:
    """Each paraphrase as `[BOS] text [EOS]` (BOS where the model adds one) with loss on every token after
    the first."""
    out = []
    for fact in facts:
        if not fact.paraphrases:
            raise DataError(f"fact {fact.fact_id!r} has no paraphrases")
        ids = tokenizer.encode_batch(fact.paraphrases)
        out.append([make_row([], x, tokenizer.prefix_ids(), tokenizer.eos_id) for x in ids])
    return out


def qa_rows(examples: Sequence[QAExample], tokenizer: Tokenizer) -> list[Row]:
    prompts = tokenizer.encode_batch([qa_prompt(e.question) for e in examples])
    answers = tokenizer.encode_batch([" " + e.answers[0].strip() for e in examples])
    return [make_row(p, a, tokenizer.prefix_ids(), tokenizer.eos_id) for p, a in zip(prompts, answers)]


def document_rows(texts: Iterable[str], tokenizer: Tokenizer, seq_len: int) -> list[Row]:
    """Chunks of seq_len + 1 tokens with stride seq_len, so every token but BOS is a target once."""
    rows = []
    for ids in tokenizer.encode_batch(list(texts), bos=True, eos=True):
        for start in range(0, len(ids) - 1, seq_len):
            piece = tuple(ids[start : start + seq_len + 1])
            rows.append(Row(piece, (True,) * len(piece)))
    return rows


def _truncation_note(rows: Iterable[Row], seq_len: int, what: str) -> None:
    long = sum(len(r.tokens) > seq_len + 1 for r in rows)
    if long:
        logger.warning("%d %s rows exceed seq_len=%d tokens and are truncated", long, what, seq_len)


def build_finetune_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    global_batch_size: int | None = None,
) -> StepDataset:
    """The dataset for regime facts | qa | chat | documents.

    An optimizer step consumes `global_batch_size` rows = accum micro-batches on each of the dp ranks;
    micro-step m of rank r fills slot (m % accum) * dp_world_size + r of optimizer step m // accum, so a
    fact stays one fact per *optimizer* step under gradient accumulation too.
    """
    b, w = micro_batch_size, dp_world_size
    global_batch_size = global_batch_size or b * w
    if global_batch_size % (b * w):
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by "
            f"micro_batch_size {b} x dp_world_size {w}"
        )
    accum = global_batch_size // (b * w)

    world = None
    if cfg.source == "synthetic" or cfg.source_type == "synthetic":
        from titan_mem.data.synthetic import world_of

        world = world_of(cfg)
    common = {
        "micro_batch_size": b,
        "accum": accum,
        "dp_rank": dp_rank,
        "dp_world_size": w,
        "seq_len": seq_len,
        "pad_id": tokenizer.pad_id,
        "pad_multiple": cfg.pad_multiple,
        "repeat": cfg.repeat,
    }

    first = cfg.max_examples or None
    if cfg.regime == "facts":
        groups = fact_rows(finetune_facts(cfg), tokenizer)
        _truncation_note((r for g in groups for r in g), seq_len, "fact")
        fact_order = fact_epoch_order(cfg, len(groups))

        def fact_batch(opt_step: int) -> list[Row]:
            epoch, i = divmod(opt_step, len(groups))
            group = groups[int(fact_order(epoch)[i])]
            return [group[j % len(group)] for j in range(global_batch_size)]

        return StepDataset(
            fact_batch, steps_per_epoch=len(groups) * accum, description=f"facts from {cfg.source}", **common
        )

    if cfg.regime == "qa":
        examples = (
            world.qa_examples(cfg.taught_population(), taught=cfg.synthetic_taught_people)
            if world
            else load_qa(cfg.source, split=cfg.split, config=cfg.hf_config)
        )[:first]
        rows = qa_rows(examples, tokenizer)
        _truncation_note(rows, seq_len, "qa")
        shuffle = cfg.shuffle_buffer > 0
    elif cfg.regime == "chat":
        rows = chat_rows(load_conversations(cfg, world), tokenizer)
        _truncation_note(rows, seq_len, "chat")
        shuffle = cfg.shuffle_buffer > 0
    elif cfg.regime == "documents":
        if world:
            people = world.people(cfg.taught_population(), cfg.synthetic_taught_people)
            texts = world.finetune_documents(people, cfg.seed, cfg.synthetic_article_sections)
        else:
            texts = read_documents(cfg)
        rows = document_rows(texts, tokenizer, seq_len)
        shuffle = False  # documents are streamed in order
    else:
        raise ConfigError(f"data.regime: expected facts, qa, chat or documents here, got {cfg.regime!r}")
    if not rows:
        raise ConfigError(f"data.source {cfg.source}: no {cfg.regime} examples")
    opt_steps_per_epoch = -(-len(rows) // global_batch_size)
    order = _EpochOrder(len(rows), cfg.seed, shuffle)
    if cfg.bucket_batches:
        lengths = np.array([min(len(r.tokens) - 1, seq_len) for r in rows])
        plan = BucketPlan(
            order, lengths, global_batch_size, cfg.bucket_batches, cfg.seed if shuffle else None
        )
        pad = empty_row(tokenizer.pad_id)

        def row_batch(opt_step: int) -> list[Row]:
            epoch, within = divmod(opt_step, opt_steps_per_epoch)
            ids = plan(epoch)[within]
            return [rows[int(i)] for i in ids] + [pad] * (global_batch_size - len(ids))
    else:

        def row_batch(opt_step: int) -> list[Row]:
            epoch, within = divmod(opt_step, opt_steps_per_epoch)
            perm = order(epoch)
            # a short last batch wraps around to the start of the same epoch's order
            return [
                rows[int(perm[(within * global_batch_size + i) % len(rows)])]
                for i in range(global_batch_size)
            ]

    return StepDataset(
        row_batch,
        steps_per_epoch=opt_steps_per_epoch * accum,
        description=f"{cfg.regime} from {cfg.source}",
        **common,
    )


def finetune_facts(cfg: DataConfig) -> list[FactExample]:
    """The facts regime's facts in source order (the first `data.max_examples`), before any shuffling:
    one definition for the loader and `facts_order.taught_fact_order`, so the two cannot drift apart."""
    first = cfg.max_examples or None
    if cfg.source == "synthetic" or cfg.source_type == "synthetic":
        from titan_mem.data.synthetic import world_of

        world = world_of(cfg)
        taught = cfg.synthetic_taught_people
        return world.facts(cfg.taught_population(), cfg.synthetic_paraphrases, taught=taught)[:first]
    if cfg.fact_paraphrases == "templates":
        qa = load_qa(cfg.source, split=cfg.split, config=cfg.hf_config, limit=first)
        return facts_from_qa(qa, cfg.synthetic_paraphrases)
    return load_facts(cfg.source)[:first]


def fact_epoch_order(cfg: DataConfig, n: int) -> Callable[[int], np.ndarray]:
    """epoch -> the permutation of the `n` facts the facts regime teaches in that epoch."""
    return _EpochOrder(n, cfg.seed, cfg.shuffle_buffer > 0)


def read_documents(cfg: DataConfig) -> list[str]:
    """All documents of a (finite) source in order, bad ones counted and skipped."""
    source = build_source(cfg)
    stats = DocStats()
    texts = []
    for doc in source.open(0, 0, 1, None):
        if isinstance(doc, BadDoc):
            stats.add_bad(doc)
        else:
            texts.append(doc)
    if not texts:
        raise ConfigError(
            f"data.source {cfg.source}: no usable documents (bad documents skipped: {stats.bad})"
        )
    return texts


def _dedupe(answers: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for a in answers:
        a = str(a).strip()
        if a and a not in out:
            out.append(a)
    return out


def _answer_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):  # TriviaQA on HF: {"value": ..., "aliases": [...], ...}
        return [value.get("value", ""), *value.get("aliases", [])]
    return list(value)


def qa_from_record(r: dict[str, Any], index: int = 0) -> QAExample:
    """Any of the QA shapes: NQ-open / TriviaQA (local llm-foundry and HF) / SimpleQA (local and upstream)."""
    if "question" in r:
        question = r["question"]
    elif "problem" in r:
        question = r["problem"]
    elif "context" in r:  # "Question: ...\nAnswer:"
        question = r["context"].strip().removeprefix("Question:").removesuffix("Answer:").strip()
    else:
        raise DataError(f"record {index}: no question field (expected question, problem or context)")
    answers: list[Any] = []
    for key in ("answer", "answers", "true_answer"):
        answers += _answer_list(r.get(key))
    answers += _answer_list(r.get("aliases"))
    answers = _dedupe(answers)
    if not answers:
        raise DataError(f"record {index}: no answer field (expected answer, answers or true_answer)")
    rid = r.get("question_id") or r.get("id") or str(index)
    return QAExample(question=str(question).strip(), answers=answers, id=str(rid))


def load_qa(
    source: str, *, split: str = "validation", config: str | None = None, limit: int | None = None
) -> list[QAExample]:
    """QA pairs from a local file or HF dataset of any supported QA shape."""
    out = []
    for i, r in enumerate(load_records(source, config=config, split=split)):
        if limit is not None and i >= limit:
            break
        out.append(qa_from_record(r, i))
    return out


def load_triviaqa(
    source: str = "mandarjoshi/trivia_qa",
    *,
    split: str = "validation",
    config: str | None = "rc.nocontext",
    limit: int | None = None,
) -> list[QAExample]:
    return load_qa(source, split=split, config=config, limit=limit)


def load_nq_open(
    source: str = "google-research-datasets/nq_open", *, split: str = "validation", limit: int | None = None
) -> list[QAExample]:
    return load_qa(source, split=split, limit=limit)


def load_simpleqa(
    source: str = "basicv8vc/SimpleQA", *, split: str = "test", limit: int | None = None
) -> list[QAExample]:
    return load_qa(source, split=split, limit=limit)


def load_gsm8k(
    source: str = "openai/gsm8k",
    *,
    split: str = "test",
    config: str | None = "main",
    limit: int | None = None,
) -> list[GSM8KExample]:
    out = []
    for i, r in enumerate(load_records(source, config=config, split=split)):
        if limit is not None and i >= limit:
            break
        if "question" not in r or "answer" not in r:
            raise DataError(f"{source} record {i}: expected GSM8K fields question, answer")
        out.append(GSM8KExample(question=r["question"], answer=r["answer"], id=str(i)))
    return out


def load_hellaswag(
    source: str = "Rowan/hellaswag", *, split: str = "validation", limit: int | None = None
) -> list[MultipleChoiceExample]:
    """Local llm-foundry shape {query, choices, gold} or HF {ctx, endings, label}."""
    out = []
    for i, r in enumerate(load_records(source, config=None, split=split)):
        if limit is not None and i >= limit:
            break
        if "query" in r:
            ex = MultipleChoiceExample(r["query"], list(r["choices"]), int(r["gold"]), id=str(i))
        elif "ctx" in r:
            label = r.get("label")
            gold = int(label) if label not in (None, "") else -1  # the HF test split has no labels
            context = r["ctx"]
            if (
                "activity_label" in r and "ctx_a" in r
            ):  # lm-eval's hellaswag query (what the local file holds)
                context = f"{r['activity_label']}: {r['ctx_a']} {str(r.get('ctx_b', '')).capitalize()}"
            endings = [_hellaswag_clean(e) for e in r["endings"]]
            ex = MultipleChoiceExample(_hellaswag_clean(context), endings, gold, id=str(r.get("ind", i)))
        else:
            raise DataError(
                f"{source} record {i}: expected HellaSwag fields query/choices/gold or ctx/endings/label"
            )
        out.append(ex)
    return out


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow artefacts removed as lm-eval does: ' [title]' -> '. ', other [tags] dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_lambada(
    source: str = "EleutherAI/lambada_openai", *, split: str = "test", limit: int | None = None
) -> list[tuple[str, str]]:
    """(context, last word) pairs: local llm-foundry shape {context, continuation} or HF {text} split at
    the last space (lm-eval's lambada_openai)."""
    out = []
    for i, r in enumerate(load_records(source, config=None, split=split)):
        if limit is not None and i >= limit:
            break
        if "context" in r and "continuation" in r:
            out.append((str(r["context"]), str(r["continuation"]).strip()))
        elif "text" in r:
            context, _, word = str(r["text"]).rpartition(" ")
            out.append((context, word))
        else:
            raise DataError(f"{source} record {i}: expected LAMBADA fields context/continuation or text")
    return out


def load_facts(source: str) -> list[FactExample]:
    """Facts from a JSONL of {fact_id, paraphrases: [...]} (question/answer optional)."""
    out = []
    for i, r in enumerate(read_records(source)):
        paraphrases = r.get("paraphrases")
        if (
            not isinstance(paraphrases, list)
            or not paraphrases
            or not all(isinstance(p, str) for p in paraphrases)
        ):
            raise DataError(f"{source} record {i}: expected 'paraphrases' to be a non-empty list of strings")
        out.append(
            FactExample(
                fact_id=str(r.get("fact_id", i)),
                paraphrases=paraphrases,
                question=r.get("question", ""),
                answer=r.get("answer", ""),
            )
        )
    if not out:
        raise DataError(f"{source}: no facts")
    return out
