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

from titan_mem.config_sections import (
    ConfigError,
    EvalConfig,
    FinetuneConfig,
    RetrofitConfig,
    choice,
    help_field,
)
from titan_mem.data.config import DataConfig, TokenizerConfig
from titan_mem.kernels import LOOKUP_BACKENDS
from titan_mem.models.args import FLAVORS, model_overrides
from titan_mem.models.transformer import AC_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
    mode: str = help_field(
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
    mixed_precision_param: str = help_field("bfloat16", "FSDP compute dtype on GPU (float32 on CPU).")
    mixed_precision_reduce: str = help_field("float32", "FSDP gradient reduce dtype.")
    cpu_mixed_precision: bool = help_field(
        False,
        "Apply mixed_precision_param/reduce on CPU too (slow; how CI exercises the bf16 path without a GPU).",
    )
    activation_checkpoint: str = help_field(
        "none",
        "none | full (recompute each block in backward) | selective (op-level, as torchtitan: keep each "
        "block's matmul, attention and memory-lookup outputs, recompute the rest).",
    )
    compile: bool = help_field(False, "torch.compile each transformer block.")
    memory_kernel: str = help_field(
        "auto", "Value-lookup kernel: auto (Triton on CUDA, else PyTorch) | torch | triton."
    )
    device: str = help_field("auto", "auto | cpu | cuda.")


@dataclass
class OptimizerConfig:
    name: str = help_field(
        "", "adamw | sgd; empty = the mode's default: sgd for sparse_finetune (SMF paper), else adamw."
    )
    lr: float = help_field(3e-3, "Peak learning rate of dense parameters.")
    betas: list[float] = help_field(None, "AdamW betas.", factory=lambda: [0.9, 0.95])
    eps: float = help_field(1e-8, "AdamW epsilon.")
    weight_decay: float = help_field(0.1, "Decoupled weight decay of matrices (norms/biases get none).")
    memory_lr: float | None = help_field(None, "Learning rate of memory value rows (None = lr).")
    memory_weight_decay: float = help_field(0.0, "Weight decay of memory value rows.")
    momentum: float = help_field(0.0, "SGD momentum.")
    memory_update: str = help_field(
        "dense",
        "dense | lazy: AdamW on every value row each step, or lazily on the rows read "
        "(components/lazy_adamw).",
    )
    implementation: str = help_field(
        "auto",
        "AdamW kernels: fused (one kernel for all tensors) | foreach (batched ops) | for-loop; auto = fused "
        "on CUDA, foreach on CPU. Lazy value rows use their own row update.",
    )


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = help_field(10, "Linear warmup steps from 0 to the peak.")
    decay_type: str = help_field("cosine", "cosine | wsd (warmup-stable-decay) | constant.")
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
    save_format: str = help_field(
        "auto",
        "auto | full | sparse. auto: sparse_finetune saves knowledge patches on its base (rows ever updated, "
        "their row-optimizer state, schedule, data position), every other mode (and "
        "finetune.sparse_update=masked_gradient, which moves rows never selected) the whole model; full: "
        "the whole model in sparse_finetune too.",
    )
    initial_load_model_only: bool = help_field(
        True, "Load only model weights from initial_load_path (false: its full state, continuing its step)."
    )
    async_mode: str = help_field(
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


# heal: only memory-layer parameters train (Goyal et al. 2026, sec. 3.3 stage 2: a retrofit's recovery)
MODES = ("pretrain", "heal", "sparse_finetune", "full_finetune", "lora_finetune")


def resolve_defaults(cfg: Config) -> None:
    """Fill the keys whose default depends on others: optimizer.name '' = sgd for sparse finetuning (Lin et
    al. 2025, sec. 5: SGD forgets less for sparse updates), adamw otherwise."""
    if not cfg.optimizer.name:
        cfg.optimizer.name = "sgd" if cfg.training.mode == "sparse_finetune" else "adamw"


def validate(cfg: Config) -> None:
    """Cross-field checks that make a run impossible; each error names its key. Reads only."""
    choice("training.mode", cfg.training.mode, MODES)
    choice("checkpoint.save_format", cfg.checkpoint.save_format, ("auto", "full", "sparse"))
    if cfg.checkpoint.save_format == "sparse" and cfg.finetune.sparse_update == "masked_gradient":
        raise ConfigError(  # a patch holds the rows ever selected; momentum and decay move the others too
            "checkpoint.save_format: 'sparse' cannot hold finetune.sparse_update=masked_gradient (it moves "
            "rows never selected); use auto or full"
        )
    choice("checkpoint.async_mode", cfg.checkpoint.async_mode, ("disabled", "async"))
    choice("optimizer.implementation", cfg.optimizer.implementation, ("auto", "fused", "foreach", "for-loop"))
    choice("optimizer.name", cfg.optimizer.name, ("adamw", "sgd"))
    choice("lr_scheduler.decay_type", cfg.lr_scheduler.decay_type, ("cosine", "wsd", "constant"))
    choice("training.activation_checkpoint", cfg.training.activation_checkpoint, AC_MODES)
    choice("training.device", cfg.training.device, ("auto", "cpu", "cuda"))
    for key in ("mixed_precision_param", "mixed_precision_reduce"):
        choice(f"training.{key}", getattr(cfg.training, key), ("bfloat16", "float32", "float16"))
        if getattr(cfg.training, key) == "float16":  # fp16 gradients underflow without loss scaling
            raise ConfigError(
                f"training.{key}: float16 needs a gradient scaler, which we do not have; use bfloat16"
            )
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
    if (degree := cfg.parallelism.data_parallel_shard_degree) != -1 and degree < 1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree: -1 or >= 1; got {degree}")
    if (replicas := cfg.parallelism.data_parallel_replicate_degree) < 1:
        raise ConfigError(f"parallelism.data_parallel_replicate_degree: >= 1; got {replicas}")
    if cfg.parallelism.memory_parallel_degree < -1:
        degree = cfg.parallelism.memory_parallel_degree
        raise ConfigError(f"parallelism.memory_parallel_degree: -1, 0 or >= 1; got {degree}")
    choice("training.memory_kernel", cfg.training.memory_kernel, LOOKUP_BACKENDS)
    choice("optimizer.memory_update", cfg.optimizer.memory_update, ("dense", "lazy"))
    lazy_ok = cfg.training.mode in ("pretrain", "full_finetune") and cfg.optimizer.name == "adamw"
    if cfg.optimizer.memory_update == "lazy" and not (lazy_ok and cfg.parallelism.memory_parallel_degree):
        raise ConfigError(
            "optimizer.memory_update: 'lazy' needs optimizer.name=adamw, training.mode pretrain or "
            "full_finetune and parallelism.memory_parallel_degree != 0 (a row-sparse gradient); got "
            f"{cfg.optimizer.name}, {cfg.training.mode}, {cfg.parallelism.memory_parallel_degree}"
        )
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas: expected two numbers; got {cfg.optimizer.betas}")
    for section in (cfg.tokenizer, cfg.data, cfg.finetune, cfg.eval, cfg.retrofit):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def shard_degree(cfg: Config, world_size: int) -> int:
    """Ranks one FSDP group shards the model over: world size / replicas, or a refusal naming the key."""
    replicas = cfg.parallelism.data_parallel_replicate_degree
    if world_size % replicas:
        raise ConfigError(
            f"parallelism.data_parallel_replicate_degree: {replicas} does not divide world size {world_size}"
        )
    shard = world_size // replicas
    if cfg.parallelism.data_parallel_shard_degree not in (-1, shard):
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree: {cfg.parallelism.data_parallel_shard_degree} != world "
            f"size {world_size} / data_parallel_replicate_degree {replicas} = {shard}"
        )
    return shard


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
        if from_cli and isinstance(value, str) and value.strip().startswith("["):  # a TOML array
            try:
                value = tomllib.loads(f"v = {value.strip()}")["v"]
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{key}: not a TOML array ({e}); got {value!r}") from None
        elif from_cli and isinstance(value, str):  # a,b,c
            value = [v.strip() for v in value.split(",") if v.strip()]
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
    """Apply `--section.key=value` / `--section.key value` / bare `--flag` arguments, fill the dependent
    defaults (`resolve_defaults`), then validate."""
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
    resolve_defaults(cfg)
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
