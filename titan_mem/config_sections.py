"""The `[finetune]` and `[eval]` sections of the TOML config, and the field helper every section uses.

Kept apart from `titan_mem.config` (the loader and the training sections) so each module stays small;
`validate()` raises ValueError naming the key, which the loader turns into one ConfigError line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from titan_mem.sparse.scores import RANKINGS, TOP_T_RULES

# finetune.sparse_update: mask the update (rows) or only the gradient (Goyal et al. 2026, sec. 3.4).
SPARSE_UPDATES = ("rows", "masked_gradient")


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the key."""


def help_field(default: Any, text: str, factory: Any = None) -> Any:
    """A dataclass field with its `--help` line (every config key has a default and a help text)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def choice(key: str, value: Any, allowed: tuple) -> None:
    """Refuse a value outside `allowed`, naming the key."""
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass
class FinetuneConfig:
    ranking: str = help_field(
        "tfidf",
        "sparse_finetune slot ranking: tfidf | tf | kl (Lin et al. 2025; Goyal et al.) | all (ablation: "
        "every touched row is updated, no top_t cut; needs top_t_rule=fixed).",
    )
    top_t: int = help_field(
        500, "sparse_finetune: value rows updated per step and memory layer (paper: 500 facts)."
    )
    top_t_rule: str = help_field(
        "fixed",
        "sparse_finetune: rows a batch may update: fixed (top_t) | mass (the fewest best-ranked slots "
        "holding top_t_mass of the batch's score mass) | poisson (slots read significantly more than the "
        "background predicts, level top_t_alpha); adaptive rules never exceed top_t (sparse/scores.py).",
    )
    top_t_mass: float = help_field(
        0.5, "sparse_finetune, top_t_rule=mass: share of the score mass kept, (0, 1]."
    )
    top_t_alpha: float = help_field(
        0.01, "sparse_finetune, top_t_rule=poisson: family-wise significance level, (0, 1)."
    )
    sparse_update: str = help_field(
        "rows",
        "sparse_finetune optimizer semantics: rows (only this step's selected rows and their state change, "
        "DESIGN.md invariant 4) | masked_gradient (ablation, breaks invariant 4 on purpose: the papers' "
        "zeroed gradient outside the selection under a dense optimizer step, so momentum keeps moving "
        "earlier rows and weight decay shrinks every row; O(table) per step, saves the whole model).",
    )
    background_counts: str | None = help_field(
        None,
        "Background slot counts file (tools/background_counts.py); None = <initial_load_path>/"
        "background_counts.safetensors.",
    )
    check_counts_checkpoint: bool = help_field(
        True, "Refuse background counts recorded for another checkpoint than initial_load_path."
    )
    counts_shape_tolerance: float = help_field(
        2.0,
        "Refuse background counts whose batch (sequences x seq_len tokens) is more than this factor larger "
        "or smaller than the finetuning batch: larger background batches push idf to 0 (debug model: the "
        "first selected idf-0 rows between 4x and 8x; 2 keeps a 2x margin, docs/benchmarks.md 'Slot "
        "selection'). 0 = accept any shape (ablations); otherwise >= 1.",
    )
    lora_rank: int = help_field(16, "lora_finetune: adapter rank r.")
    lora_alpha: float = help_field(32.0, "lora_finetune: scale alpha (update scaled by alpha / r).")
    lora_targets: list[str] = help_field(
        None,
        "lora_finetune: linear layers that get adapters.",
        factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
    )

    def validate(self) -> None:
        choice("finetune.ranking", self.ranking, RANKINGS)
        choice("finetune.top_t_rule", self.top_t_rule, TOP_T_RULES)
        choice("finetune.sparse_update", self.sparse_update, SPARSE_UPDATES)
        if self.ranking == "all" and self.top_t_rule != "fixed":
            raise ConfigError(
                f"finetune.top_t_rule: '{self.top_t_rule}' does not apply to finetune.ranking=all (every "
                "touched row is updated); use top_t_rule=fixed"
            )
        if not 0 < self.top_t_mass <= 1:
            raise ConfigError(f"finetune.top_t_mass: must be in (0, 1]; got {self.top_t_mass}")
        if not 0 < self.top_t_alpha < 1:
            raise ConfigError(f"finetune.top_t_alpha: must be in (0, 1); got {self.top_t_alpha}")
        if self.top_t < 0:
            raise ConfigError(f"finetune.top_t: must be >= 0; got {self.top_t}")
        tol = self.counts_shape_tolerance
        if not (tol == 0 or tol >= 1):  # also refuses nan
            raise ConfigError(
                f"finetune.counts_shape_tolerance: must be 0 (accept any shape) or >= 1 (a ratio); got {tol}"
            )
        if self.lora_rank <= 0:
            raise ConfigError(f"finetune.lora_rank: must be positive; got {self.lora_rank}")


@dataclass
class EvalConfig:
    tasks: list[str] = help_field(
        None,
        "In-loop evaluation tasks (names as in tools/evaluate.py, e.g. synthetic_qa, hellaswag, "
        "triviaqa:PATH); empty = no in-loop evaluation.",
        factory=list,
    )
    every: int = help_field(
        0, "Evaluate every N optimizer steps (0 = never; the last step always if tasks set)."
    )
    at_steps: list[int] = help_field(
        None,
        "Also evaluate after exactly these optimizer steps (e.g. log-spaced 1,2,4,..., as the study asks: "
        "learning and forgetting move fastest early).",
        factory=list,
    )
    at_start: bool = help_field(True, "Also evaluate before the first step (the reference for forgetting).")
    limit: int = help_field(100, "Examples per task (per population for synthetic tasks); 0 = all.")
    batch_size: int = help_field(16, "Sequences per evaluation forward.")
    shots: int = help_field(
        0,
        "Few-shot exemplars before every QA and GSM8K item (lm-eval's 'Question: ..\\nAnswer: ..' blocks), "
        "drawn from the items after the evaluated ones; 0 = zero-shot (titan_mem/eval/fewshot.py).",
    )
    shots_seed: int = help_field(0, "Seed of the few-shot exemplars' draw (the same for every item).")
    data_dir: str | None = help_field(
        None, "Folder of local evaluation files (../shared/data layout); None = HF hub names."
    )

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every: must be >= 0; got {self.every}")
        if any(s <= 0 for s in self.at_steps):
            raise ConfigError(f"eval.at_steps: steps must be positive; got {self.at_steps}")
        if self.limit < 0:
            raise ConfigError(f"eval.limit: must be >= 0; got {self.limit}")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size: must be positive; got {self.batch_size}")
        if self.shots < 0:
            raise ConfigError(f"eval.shots: must be >= 0; got {self.shots}")


# retrofit.mode: how a memory layer enters a pretrained block (Goyal et al. 2026, sec. 3.3: replace)
RETROFIT_MODES = ("replace", "add")
# retrofit.heal_objective: what training.mode=heal minimises (hf/distill.py for distill)
HEAL_OBJECTIVES = ("lm", "distill")


@dataclass
class RetrofitConfig:
    base: str = help_field(
        "",
        "A pretrained HF model (a local folder with config.json and safetensors, or a hub name where a "
        "network exists) whose architecture the run builds (it replaces model.flavor; [model] memory_* keys "
        "set the memory geometry) and whose weights a new run starts from when checkpoint.initial_load_path "
        "is unset. Empty = no retrofit.",
    )
    layers: list[int] = help_field(
        None, "Blocks that get a memory layer (Goyal et al.: 8, 12, 16 of Qwen2.5-0.5B).", factory=list
    )
    mode: str = help_field(
        "replace",
        "replace: the block's FFN is discarded and a fresh memory layer computes in its place (Goyal et al.) "
        "| add: the FFN stays and the memory's output is added behind a learned per-channel gate (init 1) "
        "from value rows initialised to 0, so step 0 reproduces the base model exactly while the values "
        "get a gradient from the first step.",
    )

    heal_objective: str = help_field(
        "lm",
        "What training.mode=heal minimises: lm (the next-token loss on the data, Goyal et al. 2026) | "
        "distill (replace only: each memory layer learns to output what its block's dropped FFN output on "
        "the same normalised input; squared error over the FFN output's square, per sequence; the base's "
        "FFNs are frozen teachers read from retrofit.base, never trained or saved; hf/distill.py).",
    )

    def validate(self) -> None:
        choice("retrofit.mode", self.mode, RETROFIT_MODES)
        choice("retrofit.heal_objective", self.heal_objective, HEAL_OBJECTIVES)
        if self.heal_objective == "distill" and not self.layers:
            raise ConfigError(
                "retrofit.heal_objective: distill needs retrofit.base and retrofit.layers (the blocks whose "
                "FFN a memory layer replaces)"
            )
        if self.heal_objective == "distill" and self.mode != "replace":
            raise ConfigError(
                f"retrofit.heal_objective: distill teaches a memory layer the FFN it replaces; retrofit.mode="
                f"{self.mode} keeps the FFN (heal it with lm)"
            )
        if self.layers and not self.base:
            raise ConfigError("retrofit.layers: needs retrofit.base (the pretrained model to retrofit)")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ConfigError(f"retrofit.layers: expected distinct block indices >= 0; got {self.layers}")
