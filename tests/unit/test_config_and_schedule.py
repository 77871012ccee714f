"""Config parsing (types, overrides, errors) and learning-rate schedules, in process."""

import json
import math

import pytest

from titan_mem.components.lr import lr_multiplier
from titan_mem.config import dump, help_text, parse_args, validate_batch
from titan_mem.errors import ConfigError


def test_toml_then_cli_overrides_in_both_spellings(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[training]\nsteps = 7\nseq_len = 64\n[optimizer]\nbetas = [0.8, 0.9]\n")
    cfg = parse_args([str(cfg_file), "--training.steps", "9", "--model.memory_layers=1,3", "--job.dry_run"])
    assert cfg.training.steps == 9 and cfg.training.seq_len == 64
    assert cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.model.memory_layers == [1, 3]
    assert cfg.job.dry_run is True
    assert cfg.job.config_file == str(cfg_file)
    assert parse_args(["--checkpoint.initial_load_path=none"]).checkpoint.initial_load_path is None
    assert parse_args(["--optimizer.lr=2"]).optimizer.lr == 2.0


@pytest.mark.parametrize(
    "argv,key",
    [
        (["--training.stepz=1"], "training.stepz"),
        (["--training.steps=1.5"], "training.steps"),
        (["--optimizer.lr=fast"], "optimizer.lr"),
        (["--finetune.ranking=bm25"], "finetune.ranking"),
        (["--finetune.top_t=-1"], "finetune.top_t"),
        (["--training.mode=distill"], "training.mode"),
        (["--lr_scheduler.decay_ratio=2"], "lr_scheduler.decay_ratio"),
        (["training.steps=3"], "training.steps=3"),
    ],
)
def test_errors_name_the_key(argv, key):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_toml_type_errors(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text("[training]\nsteps = true\n")
    with pytest.raises(ConfigError, match="training.steps"):
        parse_args([str(f)])
    f.write_text("training = 3\n")
    with pytest.raises(ConfigError, match="must be a \\[section\\]"):
        parse_args([str(f)])


def test_global_batch_split():
    cfg = parse_args(["--training.global_batch_size=16", "--training.micro_batch_size=4"])
    assert validate_batch(cfg, 2) == 2
    with pytest.raises(ConfigError, match="training.global_batch_size"):
        validate_batch(cfg, 3)


def test_dump_writes_resolved_config_atomically(tmp_path):
    cfg = parse_args(["--training.steps=5"])
    dump(cfg, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["training"]["steps"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_help_documents_every_key():
    text = help_text()
    for key in ("--finetune.top_t", "--lr_scheduler.decay_type", "--parallelism.data_parallel_shard_degree"):
        assert key in text


def test_lr_schedules():
    warm = [lr_multiplier(s, 100, 10, "cosine", 0.2, 0.1) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_multiplier(10, 100, 10, "cosine", 0.2, 0.1) == pytest.approx(1.0)
    mid = lr_multiplier(55, 100, 10, "cosine", 0.2, 0.1)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, 100, 10, "cosine", 0.2, 0.1) == pytest.approx(0.1)
    # WSD: flat until the last 20 % of steps, then linear to the floor.
    assert lr_multiplier(79, 100, 10, "wsd", 0.2, 0.1) == 1.0
    assert lr_multiplier(90, 100, 10, "wsd", 0.2, 0.1) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_multiplier(100, 100, 10, "wsd", 0.2, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, 0, "constant", 0.2, 0.1) == 1.0


def test_optimizer_defaults_to_sgd_for_sparse_finetuning_only():
    """SMF (Lin et al. 2025) updates the selected rows with plain SGD; the other modes default to AdamW."""
    assert parse_args(["--training.mode=sparse_finetune"]).optimizer.name == "sgd"
    for mode in ("pretrain", "full_finetune", "lora_finetune"):
        assert parse_args([f"--training.mode={mode}"]).optimizer.name == "adamw"
    chosen = parse_args(["--training.mode=sparse_finetune", "--optimizer.name=adamw"])
    assert chosen.optimizer.name == "adamw"
    with pytest.raises(ConfigError, match="optimizer.name"):
        parse_args(["--optimizer.name=lion"])


def test_cli_lists_take_toml_arrays_or_commas():
    cfg = parse_args(["--data.hf_data_files=[\"/d/*.zst\", '/e/x.json']"])
    assert cfg.data.hf_data_files == ["/d/*.zst", "/e/x.json"]  # no quotes kept
    assert parse_args(["--data.hf_data_files=a.json, b.json"]).data.hf_data_files == ["a.json", "b.json"]
    with pytest.raises(ConfigError, match="data.hf_data_files: not a TOML array"):
        parse_args(['--data.hf_data_files=["unclosed'])


@pytest.mark.parametrize("key", ["mixed_precision_param", "mixed_precision_reduce"])
def test_float16_is_refused_without_a_gradient_scaler(key):
    with pytest.raises(ConfigError, match=f"training.{key}: float16 needs a gradient scaler"):
        parse_args([f"--training.{key}=float16"])


def test_ablation_keys_refuse_what_they_cannot_mean():
    """ranking=all updates every touched row (no rule applies); a masked-gradient run moves rows never
    selected (momentum, decay), which no knowledge patch can hold."""
    for rule in ("mass", "poisson"):
        with pytest.raises(ConfigError, match="finetune.top_t_rule.*finetune.ranking=all") as e:
            parse_args(["--finetune.ranking=all", f"--finetune.top_t_rule={rule}"])
        assert "\n" not in str(e.value)
    assert parse_args(["--finetune.ranking=all", "--finetune.top_t=1"]).finetune.top_t_rule == "fixed"
    masked = ["--training.mode=sparse_finetune", "--finetune.sparse_update=masked_gradient"]
    with pytest.raises(ConfigError, match="checkpoint.save_format.*masked_gradient") as e:
        parse_args([*masked, "--checkpoint.save_format=sparse"])
    assert "\n" not in str(e.value)
    for fmt in ("auto", "full"):
        assert (
            parse_args([*masked, f"--checkpoint.save_format={fmt}"]).finetune.sparse_update
            == "masked_gradient"
        )
    assert parse_args([]).finetune.sparse_update == "rows"
    with pytest.raises(ConfigError, match="finetune.sparse_update"):
        parse_args(["--finetune.sparse_update=dense"])


def test_every_model_hyper_parameter_is_a_model_key_that_reaches_the_model():
    """models/args.py is the one definition: each overridable ModelArgs / MemoryArgs field is a [model] key
    (memory fields as memory_<name>), and a value given there is the one the built model args hold."""
    import dataclasses

    from titan_mem.models.args import MemoryArgs, ModelArgs, build_model_args

    keys = {f.name for f in dataclasses.fields(parse_args([]).model)} - {"flavor"}
    fields = {f.name for f in dataclasses.fields(ModelArgs)} - {"vocab_size", "memory"}
    # beside_ffn is the one memory field set elsewhere: `retrofit.mode` (the base decides which FFNs exist)
    fields |= {f"memory_{f.name}" for f in dataclasses.fields(MemoryArgs)} - {"memory_beside_ffn"}
    assert keys == fields
    given = {
        "dim": 256, "n_heads": 8, "n_kv_heads": 2, "rope_theta": 123.0, "norm_eps": 1e-6,
        "tie_embeddings": True, "memory_layers": [1, 3], "memory_n_keys": 32, "memory_topk": 4,
        "memory_query_norm": "batchnorm", "memory_shared_values": True,
    }  # fmt: skip
    argv = [f"--model.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in given.items()]
    args = build_model_args(parse_args(argv).model, vocab_size=128)
    for key, value in given.items():
        owner, attr = (args.memory, key[len("memory_") :]) if key.startswith("memory_") else (args, key)
        assert getattr(owner, attr) == value, key
