"""Hub names (`org/name`) as local folders: a snapshot in the HF cache, of the files we read only."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from titan_mem.errors import HubError

# config, safetensors weights, tokenizer files; never pickled weights
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def snapshot(name: str, patterns: Sequence[str] = MODEL_FILES) -> Path:
    """The local folder of hub repository `name` (downloaded once into the HF cache, `patterns` only)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HubError(f"{name} is a hub name; the hf extra (huggingface_hub) downloads it") from None
    try:
        return Path(snapshot_download(name, allow_patterns=list(patterns)))
    except Exception as e:  # offline, unknown repository, gated model: one line, the hub's own reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{name}: could not fetch from the hub ({first})") from None
