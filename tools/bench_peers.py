"""Benchmark: titan_mem against the tools a user would pick instead, in one run on one machine, same inputs.

    python tools/bench_peers.py [--quick] [--cases pkm,sparse_update,generate,eval,finetune] [--model DIR]
        [--repeat 5] [--out FILE]
    python tools/bench_peers.py --table FILE     # a report's tables in markdown (docs/benchmarks.md)

Every timing is the median of --repeat runs after one warm-up, with min and max; every ratio is the peer's
median over ours (> 1: ours is faster) from the same run. Peers come from the `bench` extra
(`pip install -e ".[bench]"`: product-key-memory, transformers, peft, lm-eval).

pkm            our memory layer (PKM, no Memory+ gate) vs product-key-memory 0.3.0's `PKM`, same geometry
               (dim 512, 4 heads, top-32, k_dim 256, values 512, keys 256^2 and 1024^2, batch 4 x 256):
               forward and forward+backward (dense table gradient, as in pretraining), and ours with the
               row-sparse table gradient (sparse finetuning).
sparse_update  one sparse-finetuning step of a memory layer (values trained only, top-t = 500 rows by TF):
               ours (rows chosen after the forward, gradient rows of those only, updated in place) vs our
               dense gradient + the same row update vs the papers' recipe (dense gradient, top-t row mask,
               SGD over the whole table) at 4K, 64K, 256K and 1M slots: step time and bytes allocated
               (total, largest, peak live).
generate       greedy decoding with a KV cache, titan_mem vs `transformers.generate` on the same HF model
               (SmolLM2-135M with --model): tokens/s at batch 1 and 8; the tokens must be equal.
eval           log-likelihood items/s (32 items of 24 numbers as text), titan_mem's lm-eval adapter vs
               lm-eval's `hf` backend on the same model and requests; the scores must agree within 1e-4.
finetune       one optimizer step (AdamW) of full finetuning and of LoRA (r 16 on q/k/v/o) on one batch of
               2 x 256 tokens: titan_mem vs transformers (+ PEFT), tokens/s, eager.

--quick: tiny sizes (a random two-block Llama for the model cases) so a smoke test runs every case in
seconds. Without --model the model cases use that tiny model too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titan_mem.components.bench import allocations, machine_info, write_report  # noqa: E402
from titan_mem.kernels import restrict_row_grads  # noqa: E402
from titan_mem.models.args import MemoryArgs  # noqa: E402
from titan_mem.models.memory import MemoryLayer  # noqa: E402
from titan_mem.sparse.select import rows_of_sparse_grad, select_slots  # noqa: E402
from titan_mem.sparse.update import RowSparseSGD  # noqa: E402

CASES = ("pkm", "sparse_update", "generate", "eval", "finetune")
DIM, HEADS, TOPK, K_DIM = 512, 4, 32, 256
TOP_T, LR = 500, 1.0


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Median, min and max seconds of `fn()` over `repeat` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeat}


def ratio(peer: dict[str, float], ours: dict[str, float]) -> float:
    return peer["median_s"] / ours["median_s"]


# ------------------------------------------------------------------------------------------------ pkm


def our_layer(n_keys: int, dim: int = DIM) -> MemoryLayer:
    args = MemoryArgs(layers=[0], n_keys=n_keys, heads=HEADS, topk=TOPK, k_dim=K_DIM, v_dim=dim, plus=False)
    torch.manual_seed(0)
    layer = MemoryLayer(dim, args, dim)
    layer.init_weights()
    return layer


def case_pkm(sizes: list[int], shape: tuple[int, int], repeat: int) -> list[dict[str, Any]]:
    from product_key_memory import PKM

    rows = []
    for n_keys in sizes:
        ours = our_layer(n_keys)
        torch.manual_seed(0)
        theirs = PKM(DIM, heads=HEADS, num_keys=n_keys, topk=TOPK, dim_head=K_DIM // 2)
        x = torch.randn(*shape, DIM)

        def forward(layer: torch.nn.Module, x: torch.Tensor = x) -> Callable[[], Any]:
            def run() -> None:
                with torch.no_grad():
                    layer(x)

            return run

        def train(layer: torch.nn.Module, sparse: bool = False, x: torch.Tensor = x) -> Callable[[], Any]:
            def run() -> None:
                layer.zero_grad(set_to_none=True)
                if isinstance(layer, MemoryLayer):
                    layer.sparse_grad = sparse
                layer(x).square().mean().backward()

            return run

        t = {
            "ours_forward": timed(forward(ours), repeat),
            "peer_forward": timed(forward(theirs), repeat),
            "ours_forward_backward": timed(train(ours), repeat),
            "peer_forward_backward": timed(train(theirs), repeat),
            "ours_forward_backward_row_sparse": timed(train(ours, sparse=True), repeat),
        }
        rows.append(
            {
                "slots": n_keys**2,
                **t,
                "ratio_forward": ratio(t["peer_forward"], t["ours_forward"]),
                "ratio_forward_backward": ratio(t["peer_forward_backward"], t["ours_forward_backward"]),
                "ratio_forward_backward_row_sparse": ratio(
                    t["peer_forward_backward"], t["ours_forward_backward_row_sparse"]
                ),
            }
        )
    return rows


# ------------------------------------------------------------------------------------- sparse update


def sparse_step(layer: MemoryLayer, x: torch.Tensor, upstream: torch.Tensor, how: str) -> Callable[[], None]:
    """One step of `how`: 'row_sparse' (ours), 'dense_grad' (our dense gradient, same row update) or 'masked'
    (the papers' recipe: dense gradient masked to the top-t rows, SGD over the whole table)."""
    table = layer.values.weight
    updater = RowSparseSGD(table.data, lr=LR)
    masked_sgd = torch.optim.SGD([table], lr=LR)

    def run() -> None:
        table.grad = None
        layer.sparse_grad = how == "row_sparse"
        out, slots = layer(x, return_slots=True)
        touched, counts = slots.reshape(-1).unique(return_counts=True)
        rows = select_slots(touched, counts, "tf", TOP_T)
        if how == "row_sparse":  # as the sparse finetune does: chosen after the forward, before the backward
            restrict_row_grads(table, rows)
        (out * upstream).sum().backward()
        restrict_row_grads(table, None)
        if how == "masked":
            mask = torch.zeros(table.shape[0], 1, dtype=table.dtype)
            mask[rows] = 1.0
            table.grad.mul_(mask)
            masked_sgd.step()
            return
        grad = table.grad
        grad_rows = rows_of_sparse_grad(grad, rows) if grad.is_sparse else grad.index_select(0, rows)
        updater.step(rows, grad_rows)

    return run


def case_sparse_update(sizes: list[int], shape: tuple[int, int], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for n_keys in sizes:
        layer = our_layer(n_keys)
        for name, p in layer.named_parameters():  # sparse finetuning trains the value rows only
            p.requires_grad_(name == "values.weight")
        x = torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(1))
        upstream = torch.randn(*shape, DIM, generator=torch.Generator().manual_seed(2))
        row: dict[str, Any] = {"slots": n_keys**2, "top_t": TOP_T}
        for how in ("row_sparse", "dense_grad", "masked"):
            step = sparse_step(layer, x, upstream, how)
            row[how] = {**timed(step, repeat), "alloc": allocations(step)}
        row["ratio_vs_dense_grad"] = ratio(row["dense_grad"], row["row_sparse"])
        row["ratio_vs_masked"] = ratio(row["masked"], row["row_sparse"])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ model cases


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

        t_ours, t_theirs = timed(run_ours, repeat), timed(run_theirs, repeat)
        if result["ours"] != result["theirs"]:
            raise AssertionError(f"generate: batch {batch}: titan_mem's tokens differ from transformers'")
        tokens = sum(len(r) for r in result["ours"])
        rows.append(
            {
                "batch": batch,
                "max_new_tokens": new_tokens,
                "tokens_generated": tokens,
                "ours": t_ours,
                "peer": t_theirs,
                "ours_tokens_per_s": tokens / t_ours["median_s"],
                "peer_tokens_per_s": tokens / t_theirs["median_s"],
                "ratio": ratio(t_theirs, t_ours),
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
    t_ours = timed(lambda: got.__setitem__("ours", ours.loglikelihood(requests, disable_tqdm=True)), repeat)
    t_theirs = timed(
        lambda: got.__setitem__("peer", theirs.loglikelihood(requests, disable_tqdm=True)), repeat
    )
    gap = max(abs(a[0] - b[0]) for a, b in zip(got["ours"], got["peer"]))
    if gap > 1e-4:
        raise AssertionError(f"eval: log-likelihoods differ by {gap:.2e} nats (over 1e-4)")
    return {
        "items": items,
        "ours": t_ours,
        "peer": t_theirs,
        "ours_items_per_s": items / t_ours["median_s"],
        "peer_items_per_s": items / t_theirs["median_s"],
        "ratio": ratio(t_theirs, t_ours),
        "max_logprob_gap": gap,
    }


def case_finetune(folder: Path, shape: tuple[int, int], repeat: int) -> list[dict[str, Any]]:
    import peft
    import transformers

    from titan_mem.hf.weights import load_hf_model
    from titan_mem.models.lora import LoRALinear, add_lora, lora_parameter_names

    rows = []
    for method in ("full", "lora"):
        ours, args = load_hf_model(folder)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if method == "lora":
            state = ours.state_dict()
            add_lora(ours, ["wq", "wk", "wv", "wo"], 16, 32.0)
            ours.load_state_dict(state, strict=False)
            for mod in ours.modules():
                if isinstance(mod, LoRALinear):
                    mod.init_lora()
            for name, p in ours.named_parameters():
                p.requires_grad_(name in lora_parameter_names(ours))
            targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
            theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        tokens = torch.randint(0, args.vocab_size, shape, generator=torch.Generator().manual_seed(4))
        ours.train(), theirs.train()
        opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
        opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-5)

        def step_ours(ours=ours, tokens=tokens, opt_ours=opt_ours) -> None:
            logits = ours(tokens)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
            opt_ours.zero_grad(set_to_none=True)
            loss.backward()
            opt_ours.step()

        def step_theirs(theirs=theirs, tokens=tokens, opt_theirs=opt_theirs) -> None:
            loss = theirs(input_ids=tokens, labels=tokens).loss
            opt_theirs.zero_grad(set_to_none=True)
            loss.backward()
            opt_theirs.step()

        t_ours, t_theirs = timed(step_ours, repeat), timed(step_theirs, repeat)
        n = shape[0] * shape[1]
        rows.append(
            {
                "method": method,
                "batch": list(shape),
                "ours": t_ours,
                "peer": t_theirs,
                "ours_tokens_per_s": n / t_ours["median_s"],
                "peer_tokens_per_s": n / t_theirs["median_s"],
                "ratio": ratio(t_theirs, t_ours),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- main


def _ms(t: dict[str, float]) -> str:
    return f"{t['median_s'] * 1e3:,.0f} ({t['min_s'] * 1e3:,.0f}-{t['max_s'] * 1e3:,.0f})"


def markdown(report: dict[str, Any]) -> str:
    """The report's cases as markdown tables: ms as median (min-max), ratio = peer / ours (> 1: ours is
    faster)."""
    out = []
    if "pkm" in report:
        out += ["| slots | forward ours / peer | ratio | fwd+bwd ours / peer | ratio | fwd+bwd row-sparse "
                "| ratio |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["pkm"]:
            out.append(
                f"| {r['slots']:,} | {_ms(r['ours_forward'])} / {_ms(r['peer_forward'])} | "
                f"{r['ratio_forward']:.2f} | {_ms(r['ours_forward_backward'])} / "
                f"{_ms(r['peer_forward_backward'])} | {r['ratio_forward_backward']:.2f} | "
                f"{_ms(r['ours_forward_backward_row_sparse'])} | "
                f"{r['ratio_forward_backward_row_sparse']:.2f} |"
            )
        out.append("")
    if "sparse_update" in report:
        out += ["| slots | row-sparse (ours) | dense grad + rows | masked recipe | vs dense | vs masked |"
                " largest alloc MiB: ours / dense / masked |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["sparse_update"]:
            mib = [r[h]["alloc"]["largest_bytes"] / 2**20 for h in ("row_sparse", "dense_grad", "masked")]
            out.append(
                f"| {r['slots']:,} | {_ms(r['row_sparse'])} | {_ms(r['dense_grad'])} | {_ms(r['masked'])} | "
                f"{r['ratio_vs_dense_grad']:.2f} | {r['ratio_vs_masked']:.2f} | "
                + " / ".join(f"{m:,.0f}" for m in mib)
                + " |"
            )
        out.append("")
    rows = [("generate", r, f"batch {r['batch']}, {r['tokens_generated']} tokens", "tok/s",
             r["ours_tokens_per_s"], r["peer_tokens_per_s"]) for r in report.get("generate", [])]  # fmt: skip
    if "eval" in report:
        e = report["eval"]
        rows.append(
            ("eval", e, f"{e['items']} items", "items/s", e["ours_items_per_s"], e["peer_items_per_s"])
        )
    for r in report.get("finetune", []):
        what = f"{r['method']}, {r['batch'][0]}x{r['batch'][1]}"
        rows.append(("finetune", r, what, "tok/s", r["ours_tokens_per_s"], r["peer_tokens_per_s"]))
    if rows:
        out += ["| case | what | ms ours | ms peer | ours | peer | ratio |", "|---|---|---|---|---|---|---|"]
        for case, r, what, unit, ours, peer in rows:
            out.append(
                f"| {case} | {what} | {_ms(r['ours'])} | {_ms(r['peer'])} | {ours:,.1f} {unit} | "
                f"{peer:,.1f} {unit} | {r['ratio']:.2f} |"
            )
    return "\n".join(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: every case in seconds (the smoke test)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--model", type=Path, help="HF model folder for generate/eval/finetune (SmolLM2-135M)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (after a warm-up)")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    p.add_argument("--table", type=Path, help="print this report's tables in markdown, run nothing")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown[0]!r} (known: {', '.join(CASES)})")
    if args.model is not None and not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: not an HF model folder (no config.json)")
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat}: must be at least 1")
    args.argv = argv if argv is not None else sys.argv[1:]
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case of `args.cases`, in order, into one report with the machine and the command."""
    quick = args.quick
    report: dict[str, Any] = {
        "machine": machine_info(),
        "command": " ".join(["python", "tools/bench_peers.py", *args.argv]),
        "quick": quick,
    }
    shape = (2, 32) if quick else (4, 256)
    sizes = [32] if quick else [256, 1024]  # n_keys: slots = n_keys^2
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or tiny_llama(Path(tmp) / "tiny_llama")
        report["model"] = str(args.model) if args.model else "tiny random Llama (2 blocks, dim 64)"
        for case in args.cases:
            t0 = time.perf_counter()
            if case == "pkm":
                report[case] = case_pkm(sizes, shape, args.repeat)
            elif case == "sparse_update":
                slots = [64, 128] if quick else [64, 256, 512, 1024]
                report[case] = case_sparse_update(slots, shape, args.repeat)
            elif case == "generate":
                report[case] = case_generate(
                    folder, [1, 2] if quick else [1, 8], 4 if quick else 32, args.repeat
                )
            elif case == "eval":
                report[case] = case_eval(folder, 8 if quick else 32, args.repeat)
            else:
                report[case] = case_finetune(folder, (2, 16) if quick else (2, 256), args.repeat)
            print(f"[bench_peers] {case}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return report


def main() -> int:
    args = parse()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    write_report(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
