"""Checkpoints, one job per module.

manager    the trainer's DCP checkpoints `step-N/` (save atomically, resume, model-only start)
dcp_index  reading a DCP folder without a process group and without loading what is not asked for
files      atomic writes of tool outputs
convert    DCP <-> one file, model-only exports (LoRA merged, sparse checkpoint applied)
patches    knowledge patches: the changed value rows of a sparse finetune, applied to / removed from a base
sparse     the sparse-finetune checkpoint: a patch + row-optimizer state instead of the whole model
"""

from titan_mem.checkpoint.manager import (
    CheckpointManager,
    ModelState,
    OptimizerState,
    RankState,
    SchedulerState,
    check_resume_world_size,
    resume_path,
    rng_state,
    set_rng_state,
    step_dirs,
)
from titan_mem.errors import CheckpointError, ConvertError, root_cause

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "ConvertError",
    "ModelState",
    "OptimizerState",
    "RankState",
    "SchedulerState",
    "check_resume_world_size",
    "resume_path",
    "rng_state",
    "root_cause",
    "set_rng_state",
    "step_dirs",
]
