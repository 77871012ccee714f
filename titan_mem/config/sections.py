"""Every section of the TOML config but [tokenizer] and [data] (which `data/config.py` declares next to
the code that reads them), and the root `Config` that composes them.

A key is a dataclass field with a default and a help line; its type says what it accepts, and a choice is a
`Literal` alias, declared next to the code that branches on it (`sparse.select.Ranking`,
`models.transformer.ACMode`, `kernels.LookupBackend`) or here for the trainer's own. One generic check
(`config_fields.check_choices`) refuses any other value, naming `section.key`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from titan_mem.config_fields import choices, help_field
from titan_mem.data.config import DataConfig, TokenizerConfig
from titan_mem.errors import ConfigError
from titan_mem.kernels.value_lookup import LookupBackend
from titan_mem.models.args import FLAVORS, model_overrides
from titan_mem.models.transformer import ACMode
from titan_mem.sparse.select import Ranking, TopTRule

# training.mode; heal: only memory-layer parameters train (Goyal et al. 2026, sec. 3.3 stage 2)
Mode = Literal["pretrain", "heal", "sparse_finetune", "full_finetune", "lora_finetune"]
MODES: tuple[str, ...] = choices(Mode)
Precision = Literal["bfloat16", "float32", "float16"]
Device = Literal["auto", "cpu", "cuda"]
OptimizerName = Literal["", "adamw", "sgd"]  # "": the mode's default (config.rules.resolve_defaults)
MemoryUpdate = Literal["dense", "lazy"]
AdamWImplementation = Literal["auto", "fused", "foreach", "for-loop"]
DecayType = Literal["cosine", "wsd", "constant"]
SaveFormat = Literal["auto", "full", "sparse"]
AsyncMode = Literal["disabled", "async"]
# finetune.sparse_update: mask the update (rows) or only the gradient (Goyal et al. 2026, sec. 3.4)
SparseUpdate = Literal["rows", "masked_gradient"]
# retrofit.mode: how a memory layer enters a pretrained block (Goyal et al. 2026, sec. 3.3: replace)
RetrofitMode = Literal["replace", "add"]
# retrofit.heal_objective: what training.mode=heal minimises (hf/distill.py for distill)
HealObjective = Literal["lm", "distill"]


@dataclass
class JobConfig:
    config_file: str | None = help_field(None, "TOML file this job was read from (set by the loader).")
    dump_folder: str = help_field("outputs/debug", "Run folder: checkpoints, metrics.jsonl, resolved config.")
    description: str = help_field("", "Free text describing the run.")
    seed: int = help_field(0, "Seed for model init and everything random in the trainer.")
    deterministic: bool = help_field(False, "Use deterministic algorithms (bit-exact resume on CPU).")
    dry_run: bool = help_field(
        False, "Build on the meta device, print parameter counts and memory estimate, exit."
    )


def _model_config() -> type:
    """The [model] section: `flavor`, then one optional override per hyper-parameter that
    `models.args.model_overrides()` lists (None keeps the flavor's value), so the fields live in one place."""
    fields: list[tuple[str, Any, Any]] = [
        ("flavor", str, help_field("debug", f"Named model size ({', '.join(FLAVORS)}; models/args.py).")),
    ]
    for o in model_overrides():
        text = o.help[0].upper() + o.help[1:]
        fields.append((o.key, o.type | None, help_field(None, f"Override: {text}.")))
    cls = dataclasses.make_dataclass("ModelConfig", fields)
    cls.__module__ = __name__
    return cls


ModelConfig = _model_config()


@dataclass
class TrainingConfig:
    mode: Mode = help_field(
        "pretrain",
        "pretrain | heal (memory-layer parameters only: a retrofit's recovery) | sparse_finetune | "
        "full_finetune | lora_finetune.",
    )
    seq_len: int = help_field(256, "Tokens per sequence.")
    global_batch_size: int = help_field(16, "Sequences per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = help_field(
        8, "Sequences per forward/backward per rank (accumulation fills the rest)."
    )
    steps: int = help_field(100, "Optimizer steps to run (total, counting resumed ones).")
    max_norm: float = help_field(1.0, "Gradient-norm clip; 0 disables clipping.")
    mixed_precision_param: Precision = help_field("bfloat16", "FSDP compute dtype on GPU (float32 on CPU).")
    mixed_precision_reduce: Precision = help_field("float32", "FSDP gradient reduce dtype.")
    cpu_mixed_precision: bool = help_field(
        False,
        "Apply mixed_precision_param/reduce on CPU too (slow; how CI exercises the bf16 path without a GPU).",
    )
    activation_checkpoint: ACMode = help_field(
        "none",
        "none | full (recompute each block in backward) | selective (op-level, as torchtitan: keep each "
        "block's matmul, attention and memory-lookup outputs, recompute the rest).",
    )
    compile: bool = help_field(False, "torch.compile each transformer block.")
    memory_kernel: LookupBackend = help_field(
        "auto", "Value-lookup kernel: auto (Triton on CUDA, else PyTorch) | torch | triton."
    )
    device: Device = help_field("auto", "auto | cpu | cuda.")


@dataclass
class OptimizerConfig:
    name: OptimizerName = help_field(
        "", "adamw | sgd; empty = the mode's default: sgd for sparse_finetune (SMF paper), else adamw."
    )
    lr: float = help_field(3e-3, "Peak learning rate of dense parameters.")
    betas: list[float] = help_field(None, "AdamW betas.", factory=lambda: [0.9, 0.95])
    eps: float = help_field(1e-8, "AdamW epsilon.")
    weight_decay: float = help_field(0.1, "Decoupled weight decay of matrices (norms/biases get none).")
    memory_lr: float | None = help_field(None, "Learning rate of memory value rows (None = lr).")
    memory_weight_decay: float = help_field(0.0, "Weight decay of memory value rows.")
    momentum: float = help_field(0.0, "SGD momentum.")
    memory_update: MemoryUpdate = help_field(
        "dense",
        "dense | lazy: AdamW on every value row each step, or lazily on the rows read "
        "(components/lazy_adamw).",
    )
    implementation: AdamWImplementation = help_field(
        "auto",
        "AdamW kernels: fused (one kernel for all tensors) | foreach (batched ops) | for-loop; auto = fused "
        "on CUDA, foreach on CPU. Lazy value rows use their own row update.",
    )


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = help_field(10, "Linear warmup steps from 0 to the peak.")
    decay_type: DecayType = help_field("cosine", "cosine | wsd (warmup-stable-decay) | constant.")
    decay_ratio: float = help_field(0.2, "wsd only: fraction of steps spent in the final linear decay.")
    min_lr_factor: float = help_field(0.1, "Final learning rate as a fraction of the peak.")


@dataclass
class CheckpointConfig:
    enable: bool = help_field(True, "Save DCP checkpoints.")
    folder: str = help_field("checkpoints", "Checkpoint folder, relative to job.dump_folder.")
    interval: int = help_field(50, "Save every N steps (and at the last step).")
    keep_latest_k: int = help_field(2, "Keep only the newest k checkpoints (0 = keep all).")
    load_step: int = help_field(-1, "Resume from this step (-1 = newest found in the folder, if any).")
    initial_load_path: str | None = help_field(
        None, "Checkpoint step folder to start from when none to resume."
    )
    save_format: SaveFormat = help_field(
        "auto",
        "auto | full | sparse. auto: sparse_finetune saves knowledge patches on its base (rows ever updated, "
        "their row-optimizer state, schedule, data position), every other mode (and "
        "finetune.sparse_update=masked_gradient, which moves rows never selected) the whole model; full: "
        "the whole model in sparse_finetune too.",
    )
    initial_load_model_only: bool = help_field(
        True, "Load only model weights from initial_load_path (false: its full state, continuing its step)."
    )
    async_mode: AsyncMode = help_field(
        "disabled",
        "disabled | async: async copies the state to CPU memory and writes it in a background thread (DCP "
        "async_save) while training continues; the step-N folder appears once every rank finished. The last "
        "save and a save on a stop signal are always written before the run exits.",
    )


@dataclass
class MetricsConfig:
    log_freq: int = help_field(10, "Log every N steps.")
    tensorboard: bool = help_field(False, "Also write TensorBoard events (if tensorboard is installed).")


@dataclass
class ParallelismConfig:
    data_parallel_shard_degree: int = help_field(
        -1, "FSDP ranks that shard the model (-1 = world size / data_parallel_replicate_degree)."
    )
    data_parallel_replicate_degree: int = help_field(
        1,
        "HSDP: replicas of the FSDP group. Each shards the model over world / this many ranks (e.g. one "
        "node, on its fast links) and gradients are all-reduced across replicas (e.g. between nodes); "
        "1 = plain FSDP over all ranks.",
    )
    sync_every_micro_batch: bool = help_field(
        False,
        "Reduce-scatter gradients after every micro-batch (less memory) instead of once per step after the "
        "last one (1/grad_accum of the traffic; the default).",
    )
    memory_parallel_degree: int = help_field(
        -1,
        "Ranks that split each memory value table by columns (parallel/memory_parallel.py): -1 = all "
        "data-parallel ranks; k = groups of k, replicated across groups; 0 = off (FSDP shards the table "
        "by rows and all-gathers it whole every micro-batch).",
    )


@dataclass
class FinetuneConfig:
    ranking: Ranking = help_field(
        "tfidf",
        "sparse_finetune slot ranking: tfidf | tf | kl (Lin et al. 2025; Goyal et al.) | all (ablation: "
        "every touched row is updated, no top_t cut; needs top_t_rule=fixed).",
    )
    top_t: int = help_field(
        500, "sparse_finetune: value rows updated per step and memory layer (paper: 500 facts)."
    )
    top_t_rule: TopTRule = help_field(
        "fixed",
        "sparse_finetune: rows a batch may update: fixed (top_t) | mass (the fewest best-ranked slots "
        "holding top_t_mass of the batch's score mass) | poisson (slots read significantly more than the "
        "background predicts, level top_t_alpha); adaptive rules never exceed top_t (sparse/select.py).",
    )
    top_t_mass: float = help_field(
        0.5, "sparse_finetune, top_t_rule=mass: share of the score mass kept, (0, 1]."
    )
    top_t_alpha: float = help_field(
        0.01, "sparse_finetune, top_t_rule=poisson: family-wise significance level, (0, 1)."
    )
    sparse_update: SparseUpdate = help_field(
        "rows",
        "sparse_finetune optimizer semantics: rows (only this step's selected rows and their state change, "
        "docs/design.md invariant 4) | masked_gradient (ablation, breaks invariant 4 on purpose: the papers' "
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
    mode: RetrofitMode = help_field(
        "replace",
        "replace: the block's FFN is discarded and a fresh memory layer computes in its place (Goyal et al.) "
        "| add: the FFN stays and the memory's output is added behind a learned per-channel gate (init 1) "
        "from value rows initialised to 0, so step 0 reproduces the base model exactly while the values "
        "get a gradient from the first step.",
    )

    heal_objective: HealObjective = help_field(
        "lm",
        "What training.mode=heal minimises: lm (the next-token loss on the data, Goyal et al. 2026) | "
        "distill (replace only: each memory layer learns to output what its block's dropped FFN output on "
        "the same normalised input; squared error over the FFN output's square, per sequence; the base's "
        "FFNs are frozen teachers read from retrofit.base, never trained or saved; hf/distill.py).",
    )

    def validate(self) -> None:
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


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrofit: RetrofitConfig = field(default_factory=RetrofitConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
