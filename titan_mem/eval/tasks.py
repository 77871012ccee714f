"""Evaluation tasks: each loads its examples (HF hub name, a local file of ../shared/data's formats, or an
explicit `task:SOURCE`), states its prompt, and scores an EvalModel into metric records and per-example
predictions.

Prompt formats (fixed; zero-shot unless `shots`, eval/fewshot.py: k exemplars drawn with a seed from the
items after the evaluated ones, the same prefix before every item, never scored):
* generative QA (triviaqa, nq_open, simpleqa, synthetic_qa): `Question: {q}\\nAnswer:` -- the format the
  QA finetuning regime trains on -- greedy until a newline, EOS or 32 tokens; EM and token F1 over the gold
  aliases (SQuAD v1.1 normalization; TriviaQA's with `normalization="triviaqa"`), and `answer_nll`, the
  per-token NLL of ` {first answer}` (a smooth learning signal while EM is still 0); both after the shots.
* gsm8k: per-token NLL of ` {worked solution}` after `Question: {q}\\nAnswer:` (the SMF paper's forgetting
  probe; lm-eval's gsm8k task is generative EM, a different number); shots show worked solutions.
* hellaswag: log-likelihood of ` {ending}` after the context; acc = argmax, acc_norm = argmax of the
  log-likelihood divided by the ending's length in characters (lm-eval's convention).
* synthetic_qa / synthetic_completion: the run's synthetic world, one task per population: known_val and
  known_test (two disjoint halves of all known people, each with QA-trained and biography-only people in
  proportion: select on one, report on the other), new_taught and new_untaught (the first
  `data.synthetic_taught_people` new people, and the rest: the control for non-specific learning).
  `limit` facts per population: people drawn at random (seeded by world seed and population, the same
  sample in every run of the world), all six facts of each, cut at `limit`; each question's template is
  drawn per fact the same way. Each item's group is its person id (`SyntheticWorld.person_kind` tells
  QA-trained from biography-only). Completion prompts are a fact's first statement template cut before
  the value ("Ada Lovelace was born in"), greedy until "." or a newline. synthetic_qa's shots are
  known_val facts after the evaluated ones (the people order above); completion takes none.
* synthetic_prose: NLL / perplexity of held-out generic prose of the run's synthetic world (documents of
  the pretraining distribution from a random stream pretraining never reads).
* synthetic_copy: a held-out skill unlike the taught facts, copying from context: a held-out "day"
  paragraph cut after "{A} woke up early on ... After breakfast", target ` {A}`, a first name only the
  context tells. `em` (the name is the greedy continuation, from the same scoring pass) and `answer_nll`.
* lambada_openai: the passage's last word after ` `: acc (it is the greedy continuation) and perplexity.
* perplexity:SOURCE: NLL, perplexity and bits per byte of documents from any source the data layer reads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from titan_mem.data.config import DataConfig
from titan_mem.data.documents import BadDoc
from titan_mem.data.qa import load_gsm8k, load_hellaswag, load_lambada, load_qa, qa_prompt
from titan_mem.data.records import QAExample
from titan_mem.data.sources import build_source
from titan_mem.data.synthetic import ATTRIBUTES, QUESTIONS, SyntheticWorld, world_of
from titan_mem.eval.fewshot import ShotsError, fewshot_prefix, load_count, split_shots
from titan_mem.eval.lm import EvalModel, nll_summary
from titan_mem.eval.metrics import normalizer, qa_scores
from titan_mem.eval.task_context import TaskContext, TaskError, TaskOutput, task_options

QA_MAX_NEW_TOKENS = 32
QA_STOP = ("\n",)
POPULATIONS = ("known_val", "known_test", "new_taught", "new_untaught")
COPY_CUE = "After breakfast"  # synthetic_copy: the prompt ends here, the repeated name follows


# ---- sources ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a task's examples come from by default: a HF dataset and the local file name."""

    hub: str
    local: str
    split: str
    config: str | None = None


SOURCES = {
    "triviaqa": Source("mandarjoshi/trivia_qa", "triviaqa_3k.jsonl", "validation", "rc.nocontext"),
    "nq_open": Source("google-research-datasets/nq_open", "nq_open_dev.jsonl", "validation"),
    "simpleqa": Source("basicv8vc/SimpleQA", "simpleqa_test.csv", "test"),
    "gsm8k": Source("openai/gsm8k", "gsm8k_test.jsonl", "test", "main"),
    "hellaswag": Source("Rowan/hellaswag", "hellaswag_4.jsonl", "validation"),
    "lambada_openai": Source("EleutherAI/lambada_openai", "lambada_openai.jsonl", "test"),
}


def _resolve(name: str, explicit: str | None, ctx: TaskContext) -> tuple[str, str, str | None]:
    """(source, split, hf config) of a task: `task:SOURCE`, else data_dir/<local file>, else the hub."""
    src = SOURCES[name]
    if explicit:
        return explicit, src.split, src.config
    if ctx.data_dir is not None:
        path = ctx.data_dir / src.local
        if not path.is_file():
            raise TaskError(f"{name}: missing data file {path}")
        return str(path), src.split, src.config
    return src.hub, src.split, src.config


def _load(name: str, source: str, loader: Callable[[], list]) -> list:
    """The examples `loader` reads from `source`; any failure is one TaskError naming the task and source
    (the loaders' own messages name the record or line)."""
    try:
        items = loader()
    except (ValueError, KeyError, TypeError, OSError) as e:
        msg = str(e) if source in str(e) else f"{source}: {e}"
        raise TaskError(f"{name}: {msg}") from None
    if not items:
        raise TaskError(f"{name}: {source}: no examples")
    return items


# ---- task kinds ------------------------------------------------------------------------------------------
class QATask:
    """Generative QA: EM / F1 over aliases plus the answer's per-token NLL."""

    def __init__(self, name: str, examples: Sequence[QAExample], shots: Sequence[QAExample] = (), **kw: Any):
        self.name, self.examples = name, list(examples)
        self.shots = list(shots)
        self.prefix = fewshot_prefix([(s.question, s.answers[0]) for s in self.shots])
        self.normalize = normalizer(kw.get("normalization", "squad"))
        self.prompt_of: Callable[[QAExample], str] = kw.get("prompt_of", lambda e: qa_prompt(e.question))
        self.until: Sequence[str] = kw.get("until", QA_STOP)
        self.group_of: Callable[[QAExample], Any] | None = kw.get("group_of")  # per-item record's group
        self.generate: bool = kw.get("generate", True)  # False: answer NLL only (a fraction of the time)

    def evaluate(self, lm: EvalModel) -> TaskOutput:
        prompts = [self.prefix + self.prompt_of(e) for e in self.examples]
        preds = [""] * len(prompts)
        if self.generate:
            preds = lm.generate_until(
                prompts, until=self.until, max_new_tokens=QA_MAX_NEW_TOKENS, desc=self.name
            )
        nll = lm.loglikelihood([(p, " " + e.answers[0]) for p, e in zip(prompts, self.examples)], self.name)
        out = TaskOutput()
        rows = []
        for prompt, pred, score, ex in zip(prompts, preds, nll, self.examples):
            s = qa_scores(pred.strip(), ex.answers, self.normalize) if self.generate else {}
            s["answer_nll"] = score.nll_per_token
            rows.append(s)
            group = {"group": self.group_of(ex)} if self.group_of else {}
            out.predictions.append(
                {
                    "task": self.name,
                    "id": ex.id,
                    **group,
                    "prompt": prompt,
                    "prediction": pred.strip(),
                    "references": list(ex.answers),
                    **s,
                    "tokens": score.n_tokens,
                }
            )
        n = len(rows)
        if self.generate:
            out.add(self.name, "em", sum(r["em"] for r in rows) / n, n)
            out.add(self.name, "f1", sum(r["f1"] for r in rows) / n, n)
        out.add(self.name, "answer_nll", nll_summary(nll)["nll"], n)
        return out


class AnswerNLLTask:
    """Per-token NLL of a gold text after its prompt (GSM8K's worked solution)."""

    def __init__(self, name: str, pairs: Sequence[tuple[str, str, str]], prefix: str = ""):
        self.name, self.pairs, self.prefix = name, list(pairs), prefix  # (id, prompt, target); shots

    def evaluate(self, lm: EvalModel) -> TaskOutput:
        scores = lm.loglikelihood([(self.prefix + p, t) for _, p, t in self.pairs], self.name)
        out = TaskOutput()
        for (ex_id, prompt, target), s in zip(self.pairs, scores):
            out.predictions.append(
                {
                    "task": self.name,
                    "id": ex_id,
                    "prompt": self.prefix + prompt,
                    "prediction": "",
                    "references": [target],
                    "nll": s.nll_per_token,
                    "tokens": s.n_tokens,
                }
            )
        summary = nll_summary(scores)
        out.add(self.name, "nll", summary["nll"], len(scores))
        out.add(self.name, "ppl", summary["ppl"], len(scores))
        return out


class ContinuationTask:
    """Is a short target the greedy continuation of its prompt (`em`, token for token), and its per-token
    NLL (`answer_nll`): one scoring pass, no generation."""

    def __init__(self, name: str, items: Sequence[tuple[str, str, str]]):
        self.name, self.items = name, list(items)  # (id, prompt, target)

    def evaluate(self, lm: EvalModel) -> TaskOutput:
        scores = lm.loglikelihood([(p, t) for _, p, t in self.items], self.name)
        out = TaskOutput()
        for (item_id, prompt, target), s in zip(self.items, scores):
            out.predictions.append(
                {
                    "task": self.name,
                    "id": item_id,
                    "prompt": prompt,
                    "prediction": "",
                    "references": [target.strip()],
                    "em": float(s.greedy),
                    "answer_nll": s.nll_per_token,
                    "tokens": s.n_tokens,
                }
            )
        n = len(scores)
        out.add(self.name, "em", sum(s.greedy for s in scores) / n, n)
        out.add(self.name, "answer_nll", nll_summary(scores)["nll"], n)
        return out


class MultipleChoiceTask:
    """Choose the ending with the highest log-likelihood (acc) or per-character log-likelihood (acc_norm)."""

    def __init__(self, name: str, examples: Sequence[Any]):
        self.name, self.examples = name, [e for e in examples if e.gold >= 0]
        if not self.examples:
            raise TaskError(f"{name}: no labelled examples (the HF test split has none; use validation)")

    def evaluate(self, lm: EvalModel) -> TaskOutput:
        requests = [(e.context, " " + c) for e in self.examples for c in e.choices]
        scores = iter(lm.loglikelihood(requests, self.name))
        out = TaskOutput()
        acc = acc_norm = 0.0
        for e in self.examples:
            lls = [next(scores).logprob for _ in e.choices]
            pick = max(range(len(lls)), key=lambda i: lls[i])
            pick_norm = max(range(len(lls)), key=lambda i: lls[i] / max(len(e.choices[i]), 1))
            a, an = float(pick == e.gold), float(pick_norm == e.gold)
            acc, acc_norm = acc + a, acc_norm + an
            out.predictions.append(
                {
                    "task": self.name,
                    "id": e.id,
                    "prompt": e.context,
                    "prediction": e.choices[pick_norm],
                    "references": [e.choices[e.gold]],
                    "acc": a,
                    "acc_norm": an,
                    "loglikelihoods": lls,
                }
            )
        n = len(self.examples)
        out.add(self.name, "acc", acc / n, n)
        out.add(self.name, "acc_norm", acc_norm / n, n)
        return out


class LastWordTask:
    """LAMBADA: is the passage's last word the greedy continuation (acc), and lm-eval's perplexity
    exp(-mean over passages of log p(last word))."""

    def __init__(self, name: str, pairs: Sequence[tuple[str, str]]):
        self.name, self.pairs = name, list(pairs)

    def evaluate(self, lm: EvalModel) -> TaskOutput:
        scores = lm.loglikelihood([(c, " " + w) for c, w in self.pairs], self.name)
        out = TaskOutput()
        for i, ((context, word), s) in enumerate(zip(self.pairs, scores)):
            out.predictions.append(
                {
                    "task": self.name,
                    "id": str(i),
                    "prompt": context,
                    "prediction": "",
                    "references": [word],
                    "acc": float(s.greedy),
                    "logprob": s.logprob,
                }
            )
        n = len(scores)
        out.add(self.name, "acc", sum(s.greedy for s in scores) / n, n)
        out.add(self.name, "ppl", math.exp(min(-sum(s.logprob for s in scores) / n, 50.0)), n)
        return out


class PerplexityTask:
    """NLL per token, perplexity and bits per UTF-8 byte of whole documents (rolling windows)."""

    def __init__(self, name: str, texts: Sequence[str]):
        self.name, self.texts = name, list(texts)

    def evaluate(self, lm: EvalModel) -> TaskOutput:
        scores = lm.loglikelihood_rolling(self.texts, self.name)
        summary = nll_summary(scores)
        n_bytes = sum(len(t.encode("utf-8")) for t in self.texts)
        out = TaskOutput()
        for i, (text, s) in enumerate(zip(self.texts, scores)):
            out.predictions.append(
                {
                    "task": self.name,
                    "id": str(i),
                    "prompt": text,
                    "prediction": "",
                    "references": [],
                    "nll": s.nll_per_token,
                    "tokens": s.n_tokens,
                    "bytes": len(text.encode("utf-8")),
                }
            )
        n = len(self.texts)
        out.add(self.name, "nll", summary["nll"], n)
        out.add(self.name, "ppl", summary["ppl"], n)
        out.add(self.name, "bits_per_byte", -sum(s.logprob for s in scores) / n_bytes / math.log(2), n)
        return out


# ---- registry --------------------------------------------------------------------------------------------
def _split(name: str, items: Sequence[Any], ctx: TaskContext) -> tuple[list[Any], list[Any]]:
    """(evaluated, exemplars) of a loaded source (eval/fewshot.py), errors as TaskError."""
    try:
        return split_shots(items, ctx.limit, ctx.shots, ctx.shots_seed, name)
    except ShotsError as e:
        raise TaskError(str(e)) from None


def _qa_task(name: str, explicit: str | None, ctx: TaskContext) -> QATask:
    source, split, config = _resolve(name, explicit, ctx)
    n = load_count(ctx.limit, ctx.shots)
    examples, shots = _split(
        name, _load(name, source, lambda: load_qa(source, split=split, config=config, limit=n)), ctx
    )
    norm = "triviaqa" if name == "triviaqa" else "squad"
    return QATask(name, examples, shots, normalization=norm, generate=ctx.generate)


def _gsm8k_task(name: str, explicit: str | None, ctx: TaskContext) -> AnswerNLLTask:
    source, split, config = _resolve(name, explicit, ctx)
    n = load_count(ctx.limit, ctx.shots)
    examples, shots = _split(
        name, _load(name, source, lambda: load_gsm8k(source, split=split, config=config, limit=n)), ctx
    )
    pairs = [(e.id, qa_prompt(e.question), " " + e.answer.strip()) for e in examples]
    return AnswerNLLTask(name, pairs, fewshot_prefix([(e.question, e.answer) for e in shots]))


def _hellaswag_task(name: str, explicit: str | None, ctx: TaskContext) -> MultipleChoiceTask:
    source, split, _ = _resolve(name, explicit, ctx)
    return MultipleChoiceTask(
        name, _load(name, source, lambda: load_hellaswag(source, split=split, limit=ctx.limit))
    )


def _lambada_task(name: str, explicit: str | None, ctx: TaskContext) -> LastWordTask:
    source, split, _ = _resolve(name, explicit, ctx)
    return LastWordTask(name, _load(name, source, lambda: load_lambada(source, split=split, limit=ctx.limit)))


def _perplexity_task(name: str, explicit: str | None, ctx: TaskContext) -> PerplexityTask:
    if not explicit:
        raise TaskError("perplexity: name a source, e.g. perplexity:../shared/data/c4_sample_01.json.gz")
    cfg = DataConfig(source=explicit, regime="pretrain", repeat=False)
    try:
        cfg.validate()
        texts: list[str] = []
        for doc in build_source(cfg).open(0, 0, 1, None):
            if ctx.limit is not None and len(texts) >= ctx.limit:
                break
            if not isinstance(doc, BadDoc):
                texts.append(doc)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise TaskError(f"{name}:{explicit}: {e}") from None
    if not texts:
        raise TaskError(f"{name}:{explicit}: no usable documents")
    return PerplexityTask(f"{name}:{explicit}", texts)


def synthetic_examples(
    world: SyntheticWorld, population: str, limit: int | None = None, taught: int = 0
) -> list[QAExample]:
    """A population's evaluation questions: its people in a random order drawn once per (world seed,
    population), all six facts of each, cut at `limit` facts; each fact's question template drawn from its
    own seed. A larger limit asks the same questions and more, and every run of the world the same ones."""
    people = list(world.people(population, taught))
    random.Random(f"titan_mem.eval.people.{world.seed}.{population}").shuffle(people)
    out: list[QAExample] = []
    for p in people:
        for attr in ATTRIBUTES:
            fact_id = f"{p.population}-{p.pid}-{attr}"
            rng = random.Random(f"titan_mem.eval.question.{world.seed}.{population}.{fact_id}")
            out.append(QAExample(rng.choice(QUESTIONS[attr]).format(name=p.name), [p.value(attr)], fact_id))
    return out[:limit] if limit else out


def _person_of(example: QAExample) -> int:
    return int(example.id.split("-")[1])  # synthetic fact ids are {population}-{pid}-{attribute}


def _synthetic_tasks(kind: str) -> Callable[[str, str | None, TaskContext], list[Any]]:
    def build(name: str, explicit: str | None, ctx: TaskContext) -> list[Any]:
        if explicit:
            raise TaskError(f"{name}: takes its facts from the run's synthetic world, not a source")
        d = ctx.data or DataConfig()
        world = world_of(d)
        tasks: list[Any] = []
        shots: list[QAExample] = []
        for population in POPULATIONS:
            examples = synthetic_examples(world, population, None, d.synthetic_taught_people)
            if kind == "qa" and population == "known_val":  # exemplars: known facts never evaluated
                examples, shots = _split(f"{name}/{population}", examples, ctx)
            examples = examples[: ctx.limit] if ctx.limit else examples
            if not examples:
                continue
            kw: dict[str, Any] = {"group_of": _person_of}
            if kind == "completion":
                prompts = {e.id: world.statement_prompt(e.id) for e in examples}
                kw.update(prompt_of=lambda e, p=prompts: p[e.id], until=(".", "\n"))
            tasks.append(QATask(f"{name}/{population}", examples, shots, **kw))
        return tasks

    return build


def _synthetic_prose_task(name: str, explicit: str | None, ctx: TaskContext) -> PerplexityTask:
    if explicit:
        raise TaskError(f"{name}: takes its prose from the run's synthetic world, not a source")
    return PerplexityTask(name, world_of(ctx.data or DataConfig()).heldout_prose(ctx.limit or 200))


def copy_items(world: SyntheticWorld, n: int) -> list[tuple[str, str, str]]:
    """(id, prompt, target) of synthetic_copy: held-out day paragraphs cut after `COPY_CUE`, whose next
    word is the paragraph's first word, a name drawn at random for that paragraph."""
    items = []
    for i, text in enumerate(world.heldout_days(n)):
        cut = text.index(COPY_CUE) + len(COPY_CUE)
        target = " " + text.split(" ", 1)[0]
        if not text[cut:].startswith(target + " "):
            raise RuntimeError(f"synthetic_copy: day paragraph {i} does not repeat its name: {text!r}")
        items.append((f"copy-{i}", text[:cut], target))
    return items


def _synthetic_copy_task(name: str, explicit: str | None, ctx: TaskContext) -> ContinuationTask:
    if explicit:
        raise TaskError(f"{name}: takes its paragraphs from the run's synthetic world, not a source")
    return ContinuationTask(name, copy_items(world_of(ctx.data or DataConfig()), ctx.limit or 200))


BUILDERS: dict[str, Callable[[str, str | None, TaskContext], Any]] = {
    "triviaqa": _qa_task,
    "nq_open": _qa_task,
    "simpleqa": _qa_task,
    "gsm8k": _gsm8k_task,
    "hellaswag": _hellaswag_task,
    "lambada_openai": _lambada_task,
    "perplexity": _perplexity_task,
    "synthetic_qa": _synthetic_tasks("qa"),
    "synthetic_completion": _synthetic_tasks("completion"),
    "synthetic_prose": _synthetic_prose_task,
    "synthetic_copy": _synthetic_copy_task,
}


def parse_task_list(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [s.strip() for s in items if s.strip()]
    if not out:
        raise TaskError("--tasks: no task named")
    return out


def build_tasks(specs: Sequence[str], ctx: TaskContext) -> list[Any]:
    """Tasks for `name[:SOURCE][@options]` specs, all data loaded (so a bad name or file fails before any
    compute)."""
    tasks: list[Any] = []
    for spec in specs:
        spec, task_ctx, label = task_options(spec, ctx)
        name, _, explicit = spec.partition(":")
        if name not in BUILDERS:
            raise TaskError(f"unknown task {name!r} (known: {', '.join(BUILDERS)})")
        made = BUILDERS[name](name, explicit or None, task_ctx)
        made = made if isinstance(made, list) else [made]
        for task in made:
            task.name = f"{task.name}/{label}" if label else task.name
        tasks.extend(made)
    return tasks
