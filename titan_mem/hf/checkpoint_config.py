"""Which config a checkpoint folder was trained with: a titan_mem run's resolved `config.json` (two folders
up from `step-N`), or, for an HF model folder, the dense model that `retrofit.base = folder` starts from.
Evaluation, export and the study all read a checkpoint's config through `load_checkpoint_config`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from titan_mem import config as config_mod
from titan_mem.config import Config
from titan_mem.errors import CheckpointError
from titan_mem.hf.config import model_args_from_hf

CONFIG_NAME = "config.json"


def run_config_path(checkpoint: Path) -> Path:
    """`<run>/config.json` for `<run>/<checkpoint.folder>/step-N`."""
    return checkpoint.resolve().parent.parent / CONFIG_NAME


def is_hf_folder(path: Path) -> bool:
    """An HF model folder (config.json and safetensors weights), not a DCP checkpoint."""
    return (
        (path / CONFIG_NAME).is_file()
        and not (path / ".metadata").exists()
        and any(path.glob("*.safetensors"))
    )


def load_checkpoint_config(
    checkpoint: Path, config: Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """The run's resolved config (or a TOML/JSON `config`), with `--section.key=value` overrides; an HF
    folder's is the dense retrofit of it (its architecture, weights and tokenizer)."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: checkpoint folder not found")
    if config is None and is_hf_folder(checkpoint):
        hf, longest = str(checkpoint.resolve()), model_args_from_hf(checkpoint).max_seq_len
        seq = min(Config().training.seq_len, longest)  # nothing trains; only the model's limit matters
        return config_mod.parse_args(
            [f"--retrofit.base={hf}", f"--tokenizer.name={hf}", f"--training.seq_len={seq}", *overrides]
        )
    path = config or run_config_path(checkpoint)
    if path.suffix == ".toml":
        return config_mod.parse_args([str(path), *overrides])
    return config_mod.load_run_config(path, list(overrides))
