"""Training modes as parts with one job each (torchtitan-style; DESIGN.md: "one Trainer, no mode branches").

A `TrainingMode` is a bundle the Trainer uses without asking which mode it is:

converters         change the meta-device model before sharding (LoRA adds adapters)
policy             what trains: freezes the rest, names what FSDP must leave whole
build_optimizer    the optimizer over the trainable parameters (row-sparse for sparse finetuning)
hooks              step hooks (`on_micro_batch`, `prepare_gradients`, `after_step`): the slot selector
build_checkpoint   what a checkpoint holds: the whole model, or a knowledge patch on the base
"""

from __future__ import annotations

from titan_mem.modes.base import TrainingMode
from titan_mem.modes.build import MODES, build_mode

__all__ = ["MODES", "TrainingMode", "build_mode"]
