"""Benchmark: titan_mem against the tools a user would pick instead, in one run on one machine, same inputs.

    python tools/bench_peers.py [--quick] [--cases pkm,sparse_update,generate,eval,finetune] [--model DIR]
        [--repeat 5] [--compile] [--out FILE]
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
               2 x 256 tokens: titan_mem vs transformers (+ PEFT), tokens/s, eager (and under
               `torch.compile` with --compile: minutes of compiling on a small CPU), and the peak RSS of a
               process that loads the model and takes two steps (each side in its own process).

--quick: tiny sizes (a random two-block Llama for the model cases) so a smoke test runs every case in
seconds. Without --model the model cases use that tiny model too. The cases live in titan_mem/bench/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titan_mem.bench import hf_peers, memory_peers  # noqa: E402
from titan_mem.bench.peers_report import markdown  # noqa: E402
from titan_mem.components.bench import machine_info, run_child, write_report  # noqa: E402

CASES = ("pkm", "sparse_update", "generate", "eval", "finetune")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: every case in seconds (the smoke test)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--model", type=Path, help="HF model folder for generate/eval/finetune (SmolLM2-135M)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (after a warm-up)")
    p.add_argument("--compile", action="store_true", help="finetune: also time both sides compiled")
    p.add_argument("--device", default="cpu", help="pkm and sparse_update: the device (cuda on a GPU)")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    p.add_argument("--table", type=Path, help="print this report's tables in markdown, run nothing")
    child = ("FOLDER", "METHOD", "SIDE", "BxT")  # one finetune side's peak RSS, in its own process
    p.add_argument("--rss-child", nargs=4, metavar=child, help=argparse.SUPPRESS)
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
        "device": args.device,
    }
    shape = (2, 32) if quick else (4, 256)
    sizes = [32] if quick else [256, 1024]  # n_keys: slots = n_keys^2
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or hf_peers.tiny_llama(Path(tmp) / "tiny_llama")
        report["model"] = str(args.model) if args.model else "tiny random Llama (2 blocks, dim 64)"
        ft_shape = (2, 16) if quick else (2, 256)

        def peak_rss(method: str, side: str) -> float:
            child = ["--rss-child", str(folder), method, side, f"{ft_shape[0]}x{ft_shape[1]}"]
            return run_child(__file__, child, REPO)["peak_rss_mib"]

        for case in args.cases:
            t0 = time.perf_counter()
            if case == "pkm":
                report[case] = memory_peers.case_pkm(sizes, shape, args.repeat, args.device)
            elif case == "sparse_update":
                slots = [64, 128] if quick else [64, 256, 512, 1024]
                report[case] = memory_peers.case_sparse_update(slots, shape, args.repeat, args.device)
            elif case == "generate":
                report[case] = hf_peers.case_generate(
                    folder, [1, 2] if quick else [1, 8], 4 if quick else 32, args.repeat
                )
            elif case == "eval":
                report[case] = hf_peers.case_eval(folder, 8 if quick else 32, args.repeat)
            else:
                report[case] = hf_peers.case_finetune(folder, ft_shape, args.repeat, peak_rss, args.compile)
            print(f"[bench_peers] {case}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return report


def main() -> int:
    args = parse()
    if args.rss_child:
        folder, method, side, bxt = args.rss_child
        b, t = map(int, bxt.split("x"))
        print(json.dumps(hf_peers.finetune_peak_rss(Path(folder), method, side, (b, t))))
        return 0
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    write_report(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
