"""A `titan_mem` model for lm-evaluation-harness 0.4.x, so any harness task can score a checkpoint.

    from titan_mem.eval import lm_eval_adapter  # registers "titan_mem" with lm-eval
    lm_eval.simple_evaluate(model="titan_mem", model_args="checkpoint=RUN/checkpoints/step-N", tasks=[...])

or from the shell `python -m titan_mem.eval.lm_eval_cli --model titan_mem --model_args checkpoint=...`
(lm-eval 0.4.13 has no plugin discovery, so its own `lm_eval` command cannot see this model; releases with
lm-eval's plugin mechanism find it through the `lm_eval.models` entry point in pyproject.toml). lm-eval's
own models are imported before ours registers: 0.4.13 imports them only while its registry is empty, so a
registry holding just "titan_mem" would hide `hf` and `vllm`.

The three request kinds go to `EvalModel`, the scorer the project's own tasks use, so a harness number and
`tools/evaluate.py`'s number for the same prompt are the same computation: BOS-prefixed context, HFLM's
`_encode_pair`, left truncation, greedy decoding only. One difference from HFLM: rolling log-likelihood
scores disjoint windows of `max_seq_len` tokens (each window sees only its own tokens), not HFLM's overlapping
windows with maximal context; for texts shorter than the model the two agree.

`model_args`: `checkpoint=` (a step folder, required), `config=` (default: the run's config.json),
`batch_size=`, `max_gen_toks=` (256, as HFLM), `progress=`, and config overrides either as dotted keys
(`training.device=cpu`) or `overrides="--a.b=1 --c.d=2"`. The harness's `--device` (cpu, cuda[:N]) sets
`training.device` unless an override does; its CLI default cuda:0 on a machine without CUDA means the run
config's device (as HFLM falls back).

One process: rank 0 of 1, as the harness sees it. Sharding a checkpoint over torchrun ranks is what
`tools/evaluate.py` does; this adapter is not tested under torchrun.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (first: 0.4.13 fills its registry from it only while the registry is empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from titan_mem.errors import ConfigError
from titan_mem.eval.lm import EvalModel, Score
from titan_mem.eval.runner import load_eval_model

logger = logging.getLogger("titan_mem.eval")

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default
# No effect on greedy decoding (HF ignores top_p/top_k without sampling); anything else in gen_kwargs (a
# repetition penalty, say, which would change the argmax) is refused rather than silently ignored.
GREEDY_NEUTRAL_KWARGS = {"do_sample", "temperature", "top_p", "top_k", "num_beams"}


class LoglikelihoodResult(tuple):
    """lm-eval's `(logprob, is_greedy)` pair that also carries the continuation's token count, which a task's
    `process_results` reads for token-weighted NLL (the harness's interface has no place for it)."""

    n_tokens: int

    def __new__(cls, logprob: float, is_greedy: bool, n_tokens: int) -> LoglikelihoodResult:
        out = super().__new__(cls, (logprob, is_greedy))
        out.n_tokens = n_tokens
        return out

    def __reduce__(self) -> tuple[Any, ...]:  # request caches pickle results
        return (LoglikelihoodResult, (self[0], self[1], self.n_tokens))

    @classmethod
    def of(cls, score: Score) -> LoglikelihoodResult:
        return cls(score.logprob, score.greedy, score.n_tokens)


@register_model("titan_mem")
class TitanMemLM(LM):
    """lm-eval's view of a titan_mem checkpoint (or of an already loaded `EvalModel`, via `lm=`)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        config: str | None = None,
        batch_size: int | str | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        overrides: str | Sequence[str] | None = None,
        progress: bool = True,
        device: str | None = None,
        max_batch_size: int | None = None,
        lm: EvalModel | None = None,
        **dotted: Any,
    ) -> None:
        super().__init__()
        del max_batch_size  # harness flag for batch_size=auto; EvalModel caps batches by tokens instead
        args = _override_args(overrides, dotted, device)
        if lm is None:
            if not checkpoint:
                raise ConfigError("titan_mem: model_args needs checkpoint=<run>/checkpoints/step-N")
            lm, _ = load_eval_model(
                checkpoint,
                config=config,
                overrides=args,
                batch_size=_batch_size(batch_size),
                progress=bool(progress),
            )
        elif checkpoint or args:
            raise ConfigError("titan_mem: pass either lm= or checkpoint= (with its overrides), not both")
        self.lm = lm
        self.max_gen_toks = int(max_gen_toks)
        self._device = lm.device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TitanMemLM:
        """`key=value,...` model_args; the harness's own flags (batch_size, device) fill only what they
        leave out, so `model_args batch_size=8` is not a duplicate keyword beside the CLI's default 1."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict | None = None
    ) -> TitanMemLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ---- requests ---------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) of each Instance's (context, continuation)."""
        pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
        return [LoglikelihoodResult.of(s) for s in self.lm.loglikelihood(pairs, "lm-eval loglikelihood")]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Summed logprob of each Instance's whole text (after BOS)."""
        texts = [str(r.args[0]) for r in requests]
        return [s.logprob for s in self.lm.loglikelihood_rolling(texts, "lm-eval rolling")]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each Instance's (context, gen_kwargs); requests sharing stop strings and
        a token budget run together."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._generation_args(r.args[1]), []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new), idx in groups.items():
            texts = self.lm.generate_until(
                [str(requests[i].args[0]) for i in idx],
                until=until,
                max_new_tokens=max_new,
                desc="lm-eval generate_until",
            )
            for i, text in zip(idx, texts):
                out[i] = text
        return out

    def _generation_args(self, gen_kwargs: dict[str, Any] | None) -> tuple[tuple[str, ...], int]:
        kw = dict(gen_kwargs or {})
        if kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0.0:
            raise ConfigError(
                f"titan_mem decodes greedily only; got do_sample={kw.get('do_sample')!r}, "
                f"temperature={kw.get('temperature')!r} (set do_sample=false, temperature=0)"
            )
        if kw.get("num_beams", 1) not in (1, None):
            raise ConfigError(f"titan_mem decodes greedily only; got num_beams={kw['num_beams']!r}")
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", None) or self.max_gen_toks)
        unknown = set(kw) - GREEDY_NEUTRAL_KWARGS
        if unknown:
            raise ConfigError(f"titan_mem: unsupported generation arguments {sorted(unknown)}")
        limit = self.lm.max_seq_len - 1
        if max_new > limit:
            logger.warning(
                "max_gen_toks %d exceeds the model's %d positions; using %d", max_new, limit + 1, limit
            )
            max_new = limit
        return tuple(until), max_new

    # ---- what the harness asks besides requests -----------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return type(self.lm.tokenizer).__name__

    def get_model_info(self) -> dict[str, Any]:
        return {"model_max_length": self.lm.max_seq_len, "batch_size": self.lm.batch_size}


def _batch_size(value: int | str | None) -> int:
    """An int, or the harness's "auto" (EvalModel already caps batches by padded tokens)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size <= 0:
        raise ConfigError(f"titan_mem: batch_size must be positive; got {value}")
    return size


def _override_args(
    overrides: str | Sequence[str] | None, dotted: dict[str, Any], device: str | None
) -> list[str]:
    """`--section.key=value` arguments from an overrides string/list and dotted model_args keys."""
    items = overrides.replace(";", " ").split() if isinstance(overrides, str) else list(overrides or [])
    args = [a if a.startswith("--") else f"--{a}" for a in items]
    for key, value in dotted.items():
        if "." not in key:
            raise TypeError(
                f"titan_mem: unknown model_args key {key!r} (config overrides look like section.key)"
            )
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args.append(f"--{key}={text}")
    if device and not any(a.startswith("--training.device") for a in args):
        args += _device_args(str(device))
    return args


def _device_args(device: str) -> list[str]:
    """The harness's `--device` (its CLI default is cuda:0) as a training.device override. CUDA that is not
    there falls back to the config's choice with a warning, as HFLM falls back; the GPU is LOCAL_RANK's."""
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"titan_mem: device {device!r} is not cpu or cuda[:N]")
    if kind == "cuda" and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available; using the run config's device", device)
        return []
    return [f"--training.device={kind}"]
