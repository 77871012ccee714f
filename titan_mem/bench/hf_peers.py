"""SmolLM2 (any HF Llama/Qwen folder) through titan_mem against transformers, lm-eval and PEFT: greedy
generation, log-likelihood evaluation and one finetuning step, on the same model and inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from titan_mem.bench.timing import rates, timed_interleaved
from titan_mem.components.bench import peak_rss_mib, reset_peak_rss
from titan_mem.data.packing import IGNORE_INDEX
from titan_mem.modes.base import NextTokenLoss


def tiny_llama(folder: Path) -> Path:
    """A random two-block Llama (transformers' init) with a word-level tokenizer over the numbers 1..255
    (id = the number; 0 is the end of text): items are text on both sides, with no downloaded vocabulary."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<|endoftext|>": 0, **{str(i): i for i in range(1, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (length - i % 3,), generator=gen).tolist() for i in range(batch)]


# Greedy decoding of a real model on random ids meets near-ties, where two correct fp32 implementations may
# pick different argmaxes; text prompts give the peaked distributions a user's prompts give.
TEXT_PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "In 1969, the first people to walk on the Moon were",
]


def text_or_random_prompts(folder: Path, batch: int) -> list[list[int]]:
    """`batch` prompts of the model's own text when its tokenizer has words, else random ids (the tiny
    model's numbers)."""
    from titan_mem.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(str(folder))
    if tok.n_words < 1000:
        return prompts(tok.n_words, batch, 24)
    return [tok.prefix_ids() + tok.encode(TEXT_PROMPTS[i % len(TEXT_PROMPTS)]) for i in range(batch)]


def case_generate(folder: Path, batches: list[int], new_tokens: int, repeat: int) -> list[dict[str, Any]]:
    import transformers

    from titan_mem.data.hf_tokenizer import HFTokenizer
    from titan_mem.eval.greedy import greedy_generate
    from titan_mem.hf.weights import load_hf_model

    ours, _ = load_hf_model(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = HFTokenizer(str(folder)).eos_id  # both stop a row at the end of text, as a user's generate does
    pad = 0
    rows = []
    for batch in batches:
        ps = text_or_random_prompts(folder, batch)
        width = max(map(len, ps))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])
        mask = torch.arange(width)[None] >= torch.tensor([width - len(p) for p in ps])[:, None]
        result: dict[str, list] = {}

        def run_ours(ps: list[list[int]] = ps, result: dict = result) -> None:
            result["ours"] = greedy_generate(ours, ps, max_new_tokens=new_tokens, pad_id=pad, eos_id=eos)

        def run_theirs(ids=ids, mask=mask, width=width, result: dict = result) -> None:
            with torch.inference_mode():
                out = theirs.generate(
                    ids, attention_mask=mask.long(), max_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=pad, eos_token_id=eos,
                )  # fmt: skip
            # each row up to its end of text (ours returns no EOS and nothing after it)
            rows_out = [r[: r.index(eos)] if eos in r else r for r in out[:, width:].tolist()]
            result["theirs"] = rows_out

        t = timed_interleaved({"ours": run_ours, "peer": run_theirs}, repeat)
        if result["ours"] != result["theirs"]:
            raise AssertionError(f"generate: batch {batch}: titan_mem's tokens differ from transformers'")
        tokens = sum(len(r) for r in result["ours"])
        rows.append(
            {
                "batch": batch,
                "max_new_tokens": new_tokens,
                "tokens_generated": tokens,
                **rates(t, tokens, "tokens"),
                "tokens_equal": True,
            }
        )
    return rows


def case_eval(folder: Path, items: int, repeat: int) -> dict[str, Any]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from titan_mem.data.hf_tokenizer import HFTokenizer
    from titan_mem.eval.lm import EvalModel
    from titan_mem.eval.lm_eval_adapter import TitanMemLM
    from titan_mem.hf.weights import load_hf_model

    ours_model, args = load_hf_model(folder)
    # number strings: every tokenizer reads them, and the tiny model's word-level one maps each to its id
    pairs = [(" ".join(map(str, p[:-4])), " " + " ".join(map(str, p[-4:]))) for p in prompts(256, items, 24)]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    tokenizer = HFTokenizer(str(folder))
    ours = TitanMemLM(lm=EvalModel(ours_model, tokenizer, max_seq_len=args.max_seq_len, batch_size=16))
    theirs = HFLM(pretrained=str(folder), batch_size=16, device="cpu", dtype="float32")
    got: dict[str, list] = {}
    t = timed_interleaved(
        {
            "ours": lambda: got.__setitem__("ours", ours.loglikelihood(requests, disable_tqdm=True)),
            "peer": lambda: got.__setitem__("peer", theirs.loglikelihood(requests, disable_tqdm=True)),
        },
        repeat,
    )
    gap = max(abs(a[0] - b[0]) for a, b in zip(got["ours"], got["peer"]))
    if gap > 1e-4:
        raise AssertionError(f"eval: log-likelihoods differ by {gap:.2e} nats (over 1e-4)")
    return {
        "items": items,
        **rates(t, items, "items"),
        "max_logprob_gap": gap,
    }


FINETUNE_METHODS = ("full", "lora")
LORA_TARGETS = {"ours": ["wq", "wk", "wv", "wo"], "peer": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def finetune_model(folder: Path, method: str, side: str) -> tuple[torch.nn.Module, int]:
    """`side` ("ours": titan_mem, "peer": transformers + PEFT) ready for a `method` step: (model, vocab)."""
    if side == "peer":
        import peft
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if method == "lora":
            config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS["peer"])
            model = peft.get_peft_model(model, config)
        return model.train(), model.config.vocab_size
    from titan_mem.hf.weights import load_hf_model
    from titan_mem.models.lora import LoRALinear, add_lora, lora_parameter_names

    model, args = load_hf_model(folder)
    if method == "lora":
        state = model.state_dict()
        add_lora(model, LORA_TARGETS["ours"], 16, 32.0)
        # assign: the adapters' layers take the loaded weights themselves; a copy into their new (untouched,
        # so not yet resident) weights held both at once, ~106 MB of peak RSS the trainer never pays
        model.load_state_dict(state, strict=False, assign=True)
        if args.tie_embeddings:  # assign re-wraps each tensor: tie them again, as load_hf_model does
            model.output.weight = model.tok_embeddings.weight
        for mod in model.modules():
            if isinstance(mod, LoRALinear):
                mod.init_lora()
        for name, p in model.named_parameters():
            p.requires_grad_(name in lora_parameter_names(model))
    return model.train(), args.vocab_size


def finetune_step(
    model: torch.nn.Module, side: str, tokens: torch.Tensor, compile: bool = False, first: dict | None = None
):
    """One AdamW step of `model` on `tokens` (next-token loss): the peer as its user writes it, ours through
    the trainer's objective; `compile`: the forward under `torch.compile` (inductor); `first` gets the first
    step's loss (the two sides must agree before any update)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    forward = torch.compile(model) if compile else model
    # ours: the trainer's own objective (labels shifted, never the logits: no [B, T, vocab] copy)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE_INDEX)], dim=1)
    batch = {"input_ids": tokens, "labels": labels}
    objective, units = NextTokenLoss(), NextTokenLoss().count(batch)

    def step() -> None:
        if side == "peer":
            loss = forward(input_ids=tokens, labels=tokens).loss
        else:
            loss, _ = objective(forward, batch, units, return_slots=False)
        if first is not None and "loss" not in first:
            first["loss"] = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def batch_tokens(vocab: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(4))


def finetune_peak_rss(folder: Path, method: str, side: str, shape: tuple[int, int]) -> dict[str, float]:
    """Run in a fresh process: load the model, take two steps; the process's peak resident memory (what a
    user's job costs: weights, gradients, AdamW state, activations, the libraries imported)."""
    reset = reset_peak_rss()
    model, vocab = finetune_model(folder, method, side)
    step = finetune_step(model, side, batch_tokens(vocab, shape))
    for _ in range(2):
        step()
    return {"peak_rss_mib": peak_rss_mib(), "peak_reset_at_start": reset}


def case_finetune(
    folder: Path,
    shape: tuple[int, int],
    repeat: int,
    peak_rss: Callable[[str, str], float] | None = None,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Step time of full finetuning and LoRA, ours vs the peer, in this process (eager, and compiled when
    `compile`); `peak_rss(method, side)` measures each in its own process when given."""
    rows = []
    for method in FINETUNE_METHODS:
        for compiled in (False, True) if compile else (False,):
            first: dict[str, dict] = {"ours": {}, "peer": {}}
            steps = {}
            for side in ("ours", "peer"):  # both held at once: timed interleaved
                model, vocab = finetune_model(folder, method, side)
                steps[side] = finetune_step(model, side, batch_tokens(vocab, shape), compiled, first[side])
            times = timed_interleaved(steps, repeat)
            del model, steps
            gap = abs(first["ours"]["loss"] - first["peer"]["loss"])
            if gap > 1e-3:
                raise AssertionError(f"finetune {method}: first-step losses differ by {gap:.2e} (over 1e-3)")
            n = shape[0] * shape[1]
            row = {
                "method": method,
                "compiled": compiled,
                "batch": list(shape),
                **rates(times, n, "tokens"),
                "first_loss_gap": gap,
            }
            if peak_rss is not None and not compiled:
                row["ours_peak_rss_mib"] = peak_rss(method, "ours")
                row["peer_peak_rss_mib"] = peak_rss(method, "peer")
            rows.append(row)
    return rows
