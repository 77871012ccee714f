"""The words a study file may use: its sections and keys, the sweep keys per finetuning mode (what each
means as a trainer override), the background corpora and the metrics where higher is better."""

from __future__ import annotations

from titan_mem.errors import UserError


class StudyError(UserError, ValueError):
    """A bad study file: one line naming the file and key."""


SECTIONS: dict[str, set[str]] = {
    "study": {"name", "out", "seeds", "base_seeds", "pair_seeds", "results"},
    "base": {
        "checkpoint", "pretrain_config", "study", "hf_model", "pretrain_overrides", "background_batches",
        "background", "reference",
    },
    "facts": {"task", "source", "candidates", "shots", "splits", "seed", "out", "ids", "known"},
    "method": set(),  # [method.X] tables, checked on their own
    "finetune": {"overrides"},
    "eval": {
        "tasks", "points", "every", "limit", "data_dir", "shots", "shots_seed", "learning", "control",
        "learning_f1", "control_f1", "forgetting", "show", "levels", "bootstrap",
    },
    "quick": {
        "seeds", "base_seeds", "pretrain_overrides", "finetune_overrides", "background_batches", "limit",
        "points", "forgetting", "max_sweep", "out", "heal_overrides", "every", "tasks",
    },
}  # fmt: skip

# The data the background counts read (Lin et al. 2025's next check: the background corpus matters):
# pretrain = the base's pretraining data; finetune = the finetuning stream itself; heldout = held-out data of
# the finetuning task's kind (synthetic: the same regime over the validation half of the known people).
# A tf-only arm (ranking = "tf") is the "no background" case.
BACKGROUNDS = ("pretrain", "finetune", "heldout")
# [[arm]] keys that are not sweep keys
ARM_KEYS = ("method", "group", "label", "background", "geometries", "start")
# Where an arm starts: "" = its geometry's base (pretrained, or retrofitted and healed); "hf" = [base]
# hf_model as it is, no memory layer (the baselines a user of a pretrained model would otherwise run)
STARTS = ("", "hf")
# The model a study's forgetting and learning are measured against (the base record): "healed" = each
# geometry's own base; "hf" = [base] hf_model as it is, the model a user starts from (a retrofit's own cost
# then counts against its arms, and the healed model is evaluated beside it)
REFERENCES = ("healed", "hf")

# A sweep key is the trainer key's own name, or its short form where the section makes it plain
# (tests/unit/test_study_spec.py checks every target is a config key).
_COMMON = {"lr": "optimizer.lr", "optimizer": "optimizer.name", "weight_decay": "optimizer.weight_decay"}
_SWEEP_KEYS: dict[str, dict[str, str]] = {
    "sparse_finetune": {
        **_COMMON,
        "top_t": "finetune.top_t",
        "ranking": "finetune.ranking",
        "top_t_rule": "finetune.top_t_rule",
        "top_t_mass": "finetune.top_t_mass",
        "top_t_alpha": "finetune.top_t_alpha",
        "sparse_update": "finetune.sparse_update",
        "momentum": "optimizer.momentum",
        "memory_weight_decay": "optimizer.memory_weight_decay",
    },
    "full_finetune": dict(_COMMON),
    "lora_finetune": {**_COMMON, "lora_rank": "finetune.lora_rank", "lora_alpha": "finetune.lora_alpha"},
}

# metrics where a higher value is better; every other metric (nll, ppl, bits_per_byte, answer_nll) is a loss
HIGHER_IS_BETTER = {"em", "f1", "acc", "acc_norm"}


def sweep_keys(mode: str) -> dict[str, str]:
    """Sweep key -> trainer key for a finetuning mode."""
    if mode not in _SWEEP_KEYS:
        raise StudyError(f"training.mode {mode!r} is not a finetuning mode ({', '.join(_SWEEP_KEYS)})")
    return _SWEEP_KEYS[mode]
