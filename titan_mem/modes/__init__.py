"""Training modes, one module each (docs/architecture.md, "Adding a mode"): `base` has the interface the
Trainer calls and pretraining's answers; pretrain, full_finetune, lora, heal and sparse_finetune change
what they decide. `build_mode` checks what every mode shares and what the named one refuses."""

from __future__ import annotations

from titan_mem.config import MODES, Config
from titan_mem.errors import ConfigError
from titan_mem.modes.base import ModelConverter, TrainingMode
from titan_mem.modes.full_finetune import FullFinetune
from titan_mem.modes.heal import Heal
from titan_mem.modes.lora import LoRAFinetune
from titan_mem.modes.pretrain import Pretrain
from titan_mem.modes.sparse_finetune import SparseFinetune, sparse_counts_path

# config.MODES lists these names for the `training.mode` check (tests/unit/test_modes.py: the same, in order)
MODE_CLASSES: dict[str, type[TrainingMode]] = {
    m.name: m for m in (Pretrain, Heal, SparseFinetune, FullFinetune, LoRAFinetune)
}


def build_mode(cfg: Config) -> TrainingMode:
    """The mode `training.mode` names; refuses what it cannot run (a finetune without its base)."""
    name = cfg.training.mode
    if name not in MODE_CLASSES:
        raise ConfigError(f"training.mode: expected one of {', '.join(MODES)}; got {name!r}")
    if cfg.retrofit.heal_objective != "lm" and name != "heal":
        raise ConfigError(
            f"retrofit.heal_objective: {cfg.retrofit.heal_objective} is a healing objective "
            f"(training.mode=heal); got training.mode={name}"
        )
    # a retrofit's HF weights can start any mode but sparse finetuning, whose patches need a base checkpoint
    from_hf = cfg.retrofit.base and name != "sparse_finetune"
    if name != "pretrain" and not (cfg.checkpoint.initial_load_path or from_hf):
        raise ConfigError(
            f"checkpoint.initial_load_path: {name} needs the pretrained (or healed) checkpoint to start from"
        )
    if cfg.checkpoint.save_format == "sparse" and name != "sparse_finetune":
        raise ConfigError(f"checkpoint.save_format: 'sparse' needs training.mode=sparse_finetune; got {name}")
    MODE_CLASSES[name].check(cfg)
    return MODE_CLASSES[name](cfg)


def model_converters(cfg: Config) -> list[ModelConverter]:
    """What the run's mode changes in the model's structure (LoRA adapters): a checkpoint of the run loads
    only into a model converted the same way, e.g. for evaluation."""
    return MODE_CLASSES[cfg.training.mode](cfg).converters


__all__ = ["MODES", "MODE_CLASSES", "TrainingMode", "build_mode", "model_converters", "sparse_counts_path"]
