"""The order the facts regime teaches its facts in: what the study needs to measure retention along the
stream (facts taught early, still known at the end). A pure function of the data config: no tokenizer,
no loader, the same order the finetuning loader yields (`qa.build_finetune_dataset`)."""

from __future__ import annotations

from titan_mem.data.config import DataConfig
from titan_mem.data.qa import fact_epoch_order, finetune_facts


def taught_fact_order(cfg: DataConfig) -> list[str]:
    """Fact ids in the order the facts regime teaches them in its first epoch (one fact per optimizer
    step), for the config's `data.seed`. Later epochs reshuffle, with (seed, epoch), when
    `data.shuffle_buffer` > 0; with 0 every epoch repeats this order (the source's). On the synthetic
    source the ids are those of synthetic_qa's items, `{population}-{pid}-{attribute}`."""
    facts = finetune_facts(cfg)
    return [facts[int(i)].fact_id for i in fact_epoch_order(cfg, len(facts))(0)]
