"""Full finetuning (the SMF papers' first baseline): pretraining's step from a pretrained or healed
checkpoint (or an HF model through `[retrofit]`): every parameter trains with the dense optimizer."""

from __future__ import annotations

from titan_mem.modes.pretrain import Pretrain


class FullFinetune(Pretrain):
    name = "full_finetune"
