"""Each training mode decides what trains and which gradients it needs (titan_mem/modes/, one module per
mode); the Trainer only calls them. In-process on a tiny model: what `prepare` freezes, what it switches
on, and what `build_mode` refuses before anything is built."""

from __future__ import annotations

import pytest
import torch.nn as nn
from conftest import TINY, tiny_transformer

from titan_mem.config import MODES, parse_args
from titan_mem.errors import ConfigError
from titan_mem.models.transformer import Transformer
from titan_mem.modes import MODE_CLASSES, build_mode, model_converters


def _model() -> Transformer:
    return tiny_transformer(128, max_seq_len=32)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _mode(mode: str, *extra: str):
    cfg = parse_args([*TINY, f"--training.mode={mode}", "--checkpoint.initial_load_path=/base", *extra])
    return MODE_CLASSES[mode](cfg)


def test_every_configurable_mode_has_its_module_in_config_order():
    assert tuple(MODE_CLASSES) == MODES


def test_pretraining_trains_everything_and_lazy_values_switch_on_row_sparse_grads():
    model = _model()
    params = _mode("pretrain").prepare(model)
    assert len(params) == len(list(model.parameters()))
    assert not any(layer.sparse_grad for layer in model.memory_layers().values())
    model = _model()
    _mode("full_finetune", "--optimizer.memory_update=lazy").prepare(model)
    assert all(layer.sparse_grad for layer in model.memory_layers().values())


def test_sparse_finetuning_trains_only_value_tables_with_row_sparse_grads_outside_fsdp():
    model, mode = _model(), _mode("sparse_finetune", "--finetune.ranking=tf")
    table = model.memory_layers()["layers.1.feed_forward"].value_table.weight
    tables = {n for n, p in model.named_parameters() if p is table}
    assert len(tables) == 1 and mode.fsdp_ignored(model) == tables
    params = mode.prepare(model)
    assert _trainable(model) == tables and len(params) == 1
    assert all(layer.sparse_grad for layer in model.memory_layers().values())
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm1d))


def test_healing_trains_the_memory_layers_only():
    model = _model()
    _mode("heal").prepare(model)
    assert _trainable(model) and all(n.startswith("layers.1.feed_forward.") for n in _trainable(model))
    table = model.memory_layers()["layers.1.feed_forward"].value_table.weight
    assert table.requires_grad and not model.output.weight.requires_grad


def test_lora_adds_adapters_and_trains_only_them():
    model, mode = _model(), _mode("lora_finetune", "--finetune.lora_targets=wq,wv")
    for converter in mode.converters:
        converter.convert(model)
    mode.prepare(model)
    assert len(mode.new_tensor_names()) == 8  # lora_a and lora_b of wq and wv in both blocks
    assert _trainable(model) == mode.new_tensor_names()
    assert len(model_converters(mode.cfg)) == 1 and model_converters(_mode("pretrain").cfg) == []


@pytest.mark.parametrize(
    "argv,key",
    [
        (["--training.mode=full_finetune"], "checkpoint.initial_load_path"),
        (["--checkpoint.save_format=sparse"], "checkpoint.save_format"),
        (
            ["--training.mode=sparse_finetune", "--checkpoint.initial_load_path=/base",
             "--finetune.ranking=tfidf", "--finetune.background_counts=/base/counts.safetensors"],
            None,
        ),
    ],
)  # fmt: skip
def test_build_mode_refuses_with_the_key_at_fault(argv, key):
    cfg = parse_args([*TINY, *argv])
    if key is None:
        assert build_mode(cfg).name == "sparse_finetune"
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_mode(cfg)
