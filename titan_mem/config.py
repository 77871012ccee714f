"""Job configuration: dataclass sections filled from a TOML file, then from `--section.key=value` overrides.

Why dataclasses and not a dict: every key has a type, a default and a help line in one place, so an
unknown key or a wrong type is an error naming that key, and `--help` is generated rather than written.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titan_mem.data.config import DataConfig, TokenizerConfig
from titan_mem.kernels import LOOKUP_BACKENDS
from titan_mem.sparse.scores import RANKINGS, TOP_T_RULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the key."""


def _help(default: Any, text: str, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class JobConfig:
    config_file: str | None = _help(None, "TOML file this job was read from (set by the loader).")
    dump_folder: str = _help("outputs/debug", "Run folder: checkpoints, metrics.jsonl, resolved config.")
    description: str = _help("", "Free text describing the run.")
    seed: int = _help(0, "Seed for model init and everything random in the trainer.")
    deterministic: bool = _help(False, "Use deterministic algorithms (bit-exact resume on CPU).")
    dry_run: bool = _help(
        False, "Build on the meta device, print parameter counts and memory estimate, exit."
    )


@dataclass
class ModelConfig:
    flavor: str = _help(
        "debug", "Named model size from titan_mem.models.args.FLAVORS (debug, debug_dense, 1b, 1b_dense)."
    )
    # Optional overrides of single flavor fields; None keeps the flavor's value.
    dim: int | None = _help(None, "Override: model width.")
    n_layers: int | None = _help(None, "Override: number of transformer blocks.")
    n_heads: int | None = _help(None, "Override: attention heads.")
    n_kv_heads: int | None = _help(None, "Override: key/value heads (grouped-query attention).")
    ffn_hidden_dim: int | None = _help(None, "Override: SwiGLU hidden size.")
    max_seq_len: int | None = _help(None, "Override: maximum sequence length (RoPE table size).")
    tie_embeddings: bool | None = _help(None, "Override: share input embedding and output projection.")
    memory_layers: list[int] | None = _help(None, "Override: block indices whose FFN is a memory layer.")
    memory_n_keys: int | None = _help(None, "Override: half-keys per product half (slots = n_keys**2).")
    memory_heads: int | None = _help(None, "Override: memory heads.")
    memory_topk: int | None = _help(None, "Override: slots read per head per token.")
    memory_k_dim: int | None = _help(None, "Override: full key dimension (each half is k_dim/2).")
    memory_v_dim: int | None = _help(None, "Override: value row dimension (-1 = model dim).")
    memory_plus: bool | None = _help(None, "Override: Memory+ gated output (False = plain PKM).")
    memory_query_norm: str | None = _help(None, "Override: query normalisation: none | rms | batchnorm.")
    memory_shared_values: bool | None = _help(None, "Override: one value pool shared by all memory layers.")


@dataclass
class TrainingConfig:
    mode: str = _help("pretrain", "pretrain | sparse_finetune | full_finetune | lora_finetune.")
    seq_len: int = _help(256, "Tokens per sequence.")
    global_batch_size: int = _help(16, "Sequences per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = _help(8, "Sequences per forward/backward per rank (accumulation fills the rest).")
    steps: int = _help(100, "Optimizer steps to run (total, counting resumed ones).")
    max_norm: float = _help(1.0, "Gradient-norm clip; 0 disables clipping.")
    mixed_precision_param: str = _help("bfloat16", "FSDP compute dtype on GPU (float32 on CPU).")
    mixed_precision_reduce: str = _help("float32", "FSDP gradient reduce dtype.")
    activation_checkpoint: str = _help("none", "none | full (recompute each block in backward).")
    compile: bool = _help(False, "torch.compile each transformer block.")
    memory_kernel: str = _help(
        "auto", "Value-lookup kernel: auto (Triton on CUDA, else PyTorch) | torch | triton."
    )
    device: str = _help("auto", "auto | cpu | cuda.")


@dataclass
class OptimizerConfig:
    name: str = _help(
        "", "adamw | sgd; empty = the mode's default: sgd for sparse_finetune (SMF paper), else adamw."
    )
    lr: float = _help(3e-3, "Peak learning rate of dense parameters.")
    betas: list[float] = _help(None, "AdamW betas.", factory=lambda: [0.9, 0.95])
    eps: float = _help(1e-8, "AdamW epsilon.")
    weight_decay: float = _help(0.1, "Decoupled weight decay of matrices (norms/biases get none).")
    memory_lr: float | None = _help(None, "Learning rate of memory value rows (None = lr).")
    memory_weight_decay: float = _help(0.0, "Weight decay of memory value rows.")
    momentum: float = _help(0.0, "SGD momentum.")


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = _help(10, "Linear warmup steps from 0 to the peak.")
    decay_type: str = _help("cosine", "cosine | wsd (warmup-stable-decay) | constant.")
    decay_ratio: float = _help(0.2, "wsd only: fraction of steps spent in the final linear decay.")
    min_lr_factor: float = _help(0.1, "Final learning rate as a fraction of the peak.")


@dataclass
class CheckpointConfig:
    enable: bool = _help(True, "Save DCP checkpoints.")
    folder: str = _help("checkpoints", "Checkpoint folder, relative to job.dump_folder.")
    interval: int = _help(50, "Save every N steps (and at the last step).")
    keep_latest_k: int = _help(2, "Keep only the newest k checkpoints (0 = keep all).")
    load_step: int = _help(-1, "Resume from this step (-1 = newest found in the folder, if any).")
    initial_load_path: str | None = _help(None, "Checkpoint step folder to start from when none to resume.")
    save_format: str = _help(
        "auto",
        "auto | full | sparse. auto: sparse_finetune saves knowledge patches on its base (rows ever updated, "
        "their row-optimizer state, schedule, data position), every other mode the whole model; full: the "
        "whole model in sparse_finetune too.",
    )
    initial_load_model_only: bool = _help(
        True, "Load only model weights from initial_load_path (false: its full state, continuing its step)."
    )


@dataclass
class MetricsConfig:
    log_freq: int = _help(10, "Log every N steps.")
    tensorboard: bool = _help(False, "Also write TensorBoard events (if tensorboard is installed).")


@dataclass
class ParallelismConfig:
    data_parallel_shard_degree: int = _help(-1, "FSDP ranks (-1 = all ranks).")
    memory_parallel_degree: int = _help(
        -1,
        "Ranks that split each memory value table by columns (parallel/memory_parallel.py): -1 = all "
        "data-parallel ranks; k = groups of k, replicated across groups; 0 = off (FSDP shards the table "
        "by rows and all-gathers it whole every micro-batch).",
    )


@dataclass
class FinetuneConfig:
    ranking: str = _help(
        "tfidf", "sparse_finetune slot ranking: tfidf | tf | kl | all (Lin et al. 2025; Goyal et al.)."
    )
    top_t: int = _help(
        500, "sparse_finetune: value rows updated per step and memory layer (paper: 500 facts)."
    )
    top_t_rule: str = _help(
        "fixed",
        "sparse_finetune: rows a batch may update: fixed (top_t) | mass (the fewest best-ranked slots "
        "holding top_t_mass of the batch's score mass) | poisson (slots read significantly more than the "
        "background predicts, level top_t_alpha); adaptive rules never exceed top_t (sparse/scores.py).",
    )
    top_t_mass: float = _help(0.5, "sparse_finetune, top_t_rule=mass: share of the score mass kept, (0, 1].")
    top_t_alpha: float = _help(
        0.01, "sparse_finetune, top_t_rule=poisson: family-wise significance level, (0, 1)."
    )
    background_counts: str | None = _help(
        None,
        "Background slot counts file (tools/background_counts.py); None = <initial_load_path>/"
        "background_counts.safetensors.",
    )
    check_counts_checkpoint: bool = _help(
        True, "Refuse background counts recorded for another checkpoint than initial_load_path."
    )
    counts_shape_tolerance: float = _help(
        2.0,
        "Refuse background counts whose batch (sequences x seq_len tokens) is more than this factor larger "
        "or smaller than the finetuning batch: larger background batches push idf to 0 (debug model: the "
        "first selected idf-0 rows between 4x and 8x; 2 keeps a 2x margin, docs/benchmarks.md 'Slot "
        "selection'). 0 = accept any shape (ablations); otherwise >= 1.",
    )
    lora_rank: int = _help(16, "lora_finetune: adapter rank r.")
    lora_alpha: float = _help(32.0, "lora_finetune: scale alpha (update scaled by alpha / r).")
    lora_targets: list[str] = _help(
        None,
        "lora_finetune: linear layers that get adapters.",
        factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
    )


@dataclass
class EvalConfig:
    tasks: list[str] = _help(
        None,
        "In-loop evaluation tasks (names as in tools/evaluate.py, e.g. synthetic_qa, hellaswag, "
        "triviaqa:PATH); empty = no in-loop evaluation.",
        factory=list,
    )
    every: int = _help(0, "Evaluate every N optimizer steps (0 = never; the last step always if tasks set).")
    at_start: bool = _help(True, "Also evaluate before the first step (the reference for forgetting).")
    limit: int = _help(100, "Examples per task (per population for synthetic tasks); 0 = all.")
    batch_size: int = _help(16, "Sequences per evaluation forward.")
    data_dir: str | None = _help(
        None, "Folder of local evaluation files (../shared/data layout); None = HF hub names."
    )


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODES = ("pretrain", "sparse_finetune", "full_finetune", "lora_finetune")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}; got {value!r}")


def validate(cfg: Config) -> None:
    """Cross-field checks that make a run impossible; each error names its key."""
    _choice("training.mode", cfg.training.mode, MODES)
    _choice("checkpoint.save_format", cfg.checkpoint.save_format, ("auto", "full", "sparse"))
    if not cfg.optimizer.name:
        cfg.optimizer.name = "sgd" if cfg.training.mode == "sparse_finetune" else "adamw"
    _choice("optimizer.name", cfg.optimizer.name, ("adamw", "sgd"))
    _choice("lr_scheduler.decay_type", cfg.lr_scheduler.decay_type, ("cosine", "wsd", "constant"))
    _choice("training.activation_checkpoint", cfg.training.activation_checkpoint, ("none", "full"))
    _choice("training.device", cfg.training.device, ("auto", "cpu", "cuda"))
    for key in ("mixed_precision_param", "mixed_precision_reduce"):
        _choice(f"training.{key}", getattr(cfg.training, key), ("bfloat16", "float32", "float16"))
    t = cfg.training
    for key in ("seq_len", "global_batch_size", "micro_batch_size", "steps"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"training.{key}: must be positive; got {getattr(t, key)}")
    if cfg.optimizer.lr < 0:
        raise ConfigError(f"optimizer.lr: must be >= 0; got {cfg.optimizer.lr}")
    if cfg.checkpoint.interval <= 0:
        raise ConfigError(f"checkpoint.interval: must be positive; got {cfg.checkpoint.interval}")
    if cfg.metrics.log_freq <= 0:
        raise ConfigError(f"metrics.log_freq: must be positive; got {cfg.metrics.log_freq}")
    if not 0.0 <= cfg.lr_scheduler.decay_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.decay_ratio: must be in [0, 1]; got {cfg.lr_scheduler.decay_ratio}")
    _choice("finetune.ranking", cfg.finetune.ranking, RANKINGS)
    _choice("finetune.top_t_rule", cfg.finetune.top_t_rule, TOP_T_RULES)
    if not 0 < cfg.finetune.top_t_mass <= 1:
        raise ConfigError(f"finetune.top_t_mass: must be in (0, 1]; got {cfg.finetune.top_t_mass}")
    if not 0 < cfg.finetune.top_t_alpha < 1:
        raise ConfigError(f"finetune.top_t_alpha: must be in (0, 1); got {cfg.finetune.top_t_alpha}")
    if cfg.finetune.top_t < 0:
        raise ConfigError(f"finetune.top_t: must be >= 0; got {cfg.finetune.top_t}")
    tol = cfg.finetune.counts_shape_tolerance
    if not (tol == 0 or tol >= 1):  # also refuses nan
        raise ConfigError(
            f"finetune.counts_shape_tolerance: must be 0 (accept any shape) or >= 1 (a ratio); got {tol}"
        )
    if cfg.finetune.lora_rank <= 0:
        raise ConfigError(f"finetune.lora_rank: must be positive; got {cfg.finetune.lora_rank}")
    if (
        cfg.parallelism.data_parallel_shard_degree not in (-1,)
        and cfg.parallelism.data_parallel_shard_degree < 1
    ):
        degree = cfg.parallelism.data_parallel_shard_degree
        raise ConfigError(f"parallelism.data_parallel_shard_degree: -1 or >= 1; got {degree}")
    if cfg.parallelism.memory_parallel_degree < -1:
        degree = cfg.parallelism.memory_parallel_degree
        raise ConfigError(f"parallelism.memory_parallel_degree: -1, 0 or >= 1; got {degree}")
    _choice("training.memory_kernel", cfg.training.memory_kernel, LOOKUP_BACKENDS)
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas: expected two numbers; got {cfg.optimizer.betas}")
    if cfg.eval.every < 0:
        raise ConfigError(f"eval.every: must be >= 0; got {cfg.eval.every}")
    if cfg.eval.limit < 0:
        raise ConfigError(f"eval.limit: must be >= 0; got {cfg.eval.limit}")
    if cfg.eval.batch_size <= 0:
        raise ConfigError(f"eval.batch_size: must be positive; got {cfg.eval.batch_size}")
    for section in (cfg.tokenizer, cfg.data):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def validate_batch(cfg: Config, dp_world_size: int) -> int:
    """Return gradient-accumulation steps; refuse a global batch the ranks cannot split evenly."""
    t = cfg.training
    per_step = t.micro_batch_size * dp_world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size: {t.global_batch_size} is not divisible by "
            f"micro_batch_size ({t.micro_batch_size}) x data-parallel ranks ({dp_world_size})"
        )
    return t.global_batch_size // per_step


# ---------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any, from_cli: bool) -> Any:
    """Turn `value` into type `tp` or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, non_none[0], value, from_cli)
    if origin is list:
        (elem,) = args
        if from_cli and isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()] if value.strip("[] ") else []
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(elem)}; got {value!r}")
        return [_coerce(key, elem, v, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string; got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _set(cfg: Config, dotted: str, value: Any, from_cli: bool) -> None:
    if "." not in dotted:
        raise ConfigError(f"{dotted}: config keys look like section.key")
    section_name, key = dotted.split(".", 1)
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections:
        raise ConfigError(
            f"{dotted}: unknown section '{section_name}' (known: {', '.join(sorted(sections))})"
        )
    section = getattr(cfg, section_name)
    types_ = _section_types(type(section))
    if key not in types_:
        raise ConfigError(f"{dotted}: unknown key '{key}' in [{section_name}]")
    setattr(section, key, _coerce(dotted, types_[key], value, from_cli))


def _apply_toml(cfg: Config, data: dict[str, Any], path: str) -> None:
    for section_name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key '{section_name}' must be a [section]")
        for key, value in table.items():
            _set(cfg, f"{section_name}.{key}", value, from_cli=False)


def help_text() -> str:
    lines = ["usage: python -m titan_mem.train [CONFIG.toml] [--section.key=value ...]", ""]
    for sec in dataclasses.fields(Config):
        lines.append(f"[{sec.name}]")
        section_cls = sec.default_factory  # type: ignore[misc]
        types_ = _section_types(section_cls)
        for f in dataclasses.fields(section_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(
                f"  --{sec.name}.{f.name} ({_type_name(types_[f.name])}, default {default!r}): "
                f"{f.metadata.get('help', '')}"
            )
        lines.append("")
    return "\n".join(lines)


def read_toml(path: Path, kind: str = "config") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is one ConfigError line naming it."""
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def parse_args(argv: list[str]) -> Config:
    """Build a Config from `[CONFIG.toml] [--section.key=value | --section.key value]...`."""
    cfg = Config()
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        p = Path(path)
        data = read_toml(p)
        _apply_toml(cfg, data, path)
        cfg.job.config_file = str(p)
    apply_overrides(cfg, args)
    return cfg


def apply_overrides(cfg: Config, args: list[str]) -> None:
    """Apply `--section.key=value` / `--section.key value` / bare `--flag` arguments, then validate."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            key = arg[2:]
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                # A bare boolean flag means true.
                value = "true"
            else:
                value = args[i + 1]
                i += 1
        _set(cfg, key, value, from_cli=True)
        i += 1
    validate(cfg)


def load_run_config(path: Path, overrides: list[str] | None = None) -> Config:
    """The resolved config a run wrote (`config.json`, see `dump`), with overrides: how evaluation and
    generation rebuild the model, tokenizer and synthetic world of a checkpoint's run."""
    if not path.is_file():
        raise ConfigError(f"{path}: run config not found (pass the run's config with --config)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config sections")
    cfg = Config()
    _apply_toml(cfg, data, str(path))
    apply_overrides(cfg, list(overrides or []))
    return cfg


def dump(cfg: Config, path: Path) -> None:
    """Write the resolved config as JSON next to the checkpoints (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m titan_mem.config CONFIG [overrides]`: validate only (used by run_train.sh before launch)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
