#!/usr/bin/env python
"""Convert titan_mem checkpoints (logic in `titan_mem.checkpoint`; this file is the CLI).

    python tools/convert_checkpoint.py to-file DCP_DIR OUT.pt [--model-only]   # whole state, weights_only
    python tools/convert_checkpoint.py to-file DCP_DIR OUT.safetensors         # model tensors, FQN keys
    python tools/convert_checkpoint.py to-dcp IN.pt|IN.safetensors OUT_DIR
    python tools/convert_checkpoint.py export-model DCP_DIR OUT_DIR [--merge-lora --lora-alpha A]
    python tools/convert_checkpoint.py export-model SPARSE_STEP_DIR OUT_DIR [--base BASE_DCP]  # base + patch
    python tools/convert_checkpoint.py to-hf STEP_DIR OUT_DIR [--config RUN.json] [--dtype bfloat16]
    python tools/convert_checkpoint.py to-peft LORA_STEP_DIR OUT_DIR [--config RUN.json]  # PEFT adapter
    python tools/convert_checkpoint.py from-gguf MODEL.gguf OUT_DIR     # llama.cpp file -> HF folder
    python tools/convert_checkpoint.py delta FINETUNED_DCP BASE_DCP OUT.safetensors [--allow-dense]
    python tools/convert_checkpoint.py apply-delta BASE_DCP DELTA OUT_DIR
    python tools/convert_checkpoint.py apply-delta FINETUNED_DCP DELTA OUT_DIR --remove
    (a sparse-finetuning checkpoint's patch.safetensors is such a delta: patches stack and come off again)

Outputs are written to `<out>.tmp` / `<out>.partial` and renamed when complete; an existing output is
kept unless --overwrite. A bad input prints one line `error: <path>: <what>` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_mem.checkpoint import CheckpointError
from titan_mem.checkpoint.convert import export_model, to_dcp, to_file
from titan_mem.checkpoint.patches import apply_delta, make_delta
from titan_mem.errors import UNEXPECTED_EXIT, is_user_error, report_unexpected


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line `error:` and exit code 2 as bad inputs."""

    def error(self, message: str):  # type: ignore[override]
        raise CheckpointError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="convert_checkpoint.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        return sp

    sp = add(
        "to-file",
        "DCP folder -> one file. .pt: the whole nested state (torch.load(weights_only=True) reads it; to-dcp "
        "restores it); .safetensors: model tensors only, keyed by model FQN without the 'model.' prefix.",
    )
    sp.add_argument("dcp_dir", type=Path, help="checkpoint step folder (has .metadata)")
    sp.add_argument("out", type=Path, help="OUT.pt or OUT.safetensors")
    sp.add_argument("--model-only", action="store_true", help=".pt: keep only the model tensors")

    sp = add(
        "to-dcp",
        "One file -> DCP folder the trainer loads as checkpoint.initial_load_path (model under 'model.*'). "
        "A .pt from to-file gives back every saved key.",
    )
    sp.add_argument("src", type=Path, help="IN.pt or IN.safetensors")
    sp.add_argument("out_dir", type=Path)

    sp = add(
        "export-model",
        "Model-only DCP folder (just 'model.*'): the start of finetuning runs or an evaluation. A sparse "
        "finetuning checkpoint is applied onto its base (the output records the patch lineage).",
    )
    sp.add_argument("dcp_dir", type=Path)
    sp.add_argument("--base", type=Path, help="sparse checkpoint: its base, if moved from the recorded path")
    sp.add_argument("out_dir", type=Path)
    sp.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold adapters into the base weights (W + alpha/r * B A, r from the adapter shape), drop them",
    )
    sp.add_argument("--lora-alpha", type=float, help="the run's finetune.lora_alpha (needed by --merge-lora)")

    sp = add(
        "to-hf",
        "Checkpoint (any mode; sparse ones applied onto their base) -> HF folder: a dense model as the "
        "Llama/Qwen2/Qwen3 architecture transformers loads with no remote code, a memory model as "
        "TitanMemForCausalLM with its modeling code (trust_remote_code=True), which titan_mem also reads "
        "back. LoRA: merge first, or to-peft.",
    )
    sp.add_argument("dcp_dir", type=Path, help="checkpoint step folder")
    sp.add_argument("out_dir", type=Path)
    sp.add_argument("--config", type=Path, help="the run's config (default: config.json two folders up)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")

    sp = add(
        "to-peft",
        "LoRA finetuning checkpoint -> its adapters in PEFT's format (adapter_config.json + "
        "adapter_model.safetensors): peft.PeftModel.from_pretrained loads them onto the base's HF folder.",
    )
    sp.add_argument("dcp_dir", type=Path, help="checkpoint step folder of a lora_finetune run")
    sp.add_argument("out_dir", type=Path)
    sp.add_argument("--config", type=Path, help="the run's config (default: config.json two folders up)")

    sp = add(
        "from-gguf",
        "GGUF file (llama.cpp; Llama/Qwen2/Qwen3; F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/K-quants) -> HF "
        "folder (config.json, fp32 model.safetensors, tokenizer.json, tokenizer_config.json, "
        "chat_template.jinja): what retrofit.base, tokenizer.name and the HF reader take.",
    )
    sp.add_argument("src", type=Path, help="MODEL.gguf")
    sp.add_argument("out_dir", type=Path)

    sp = add(
        "delta",
        "Sparse delta of a finetuned checkpoint against its base: per memory value table the changed rows "
        "(ids, finetuned and base values) plus sha256 of "
        "every model tensor of both, as one safetensors file.",
    )
    sp.add_argument("finetuned", type=Path, help="finetuned DCP step folder")
    sp.add_argument("base", type=Path, help="base DCP step folder it was finetuned from")
    sp.add_argument("out", type=Path, help="OUT.safetensors")
    sp.add_argument(
        "--allow-dense",
        action="store_true",
        help="store non-value tensors that changed whole instead of refusing",
    )

    sp = add(
        "apply-delta",
        "Model-only DCP folder = base with the delta's rows applied (or, with --remove, a finetuned "
        "checkpoint with the base rows restored). Refuses a checkpoint the delta was not made from.",
    )
    sp.add_argument("src", type=Path, help="base DCP folder (finetuned with --remove)")
    sp.add_argument("delta", type=Path, help="DELTA.safetensors from the delta command")
    sp.add_argument("out_dir", type=Path)
    sp.add_argument("--remove", action="store_true", help="take the delta off a finetuned checkpoint")

    for action in sub.choices.values():
        action.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def run(argv: list[str]) -> str:
    args = build_parser().parse_args(argv)
    if args.cmd == "to-file":
        return to_file(args.dcp_dir, args.out, model_only=args.model_only, overwrite=args.overwrite)
    if args.cmd == "to-dcp":
        return to_dcp(args.src, args.out_dir, overwrite=args.overwrite)
    if args.cmd == "export-model":
        if args.lora_alpha is not None and not args.merge_lora:
            raise CheckpointError("--lora-alpha: only used with --merge-lora")
        return export_model(
            args.dcp_dir,
            args.out_dir,
            merge=args.merge_lora,
            lora_alpha=args.lora_alpha,
            overwrite=args.overwrite,
            base=args.base,
        )
    if args.cmd == "to-peft":
        from titan_mem.hf.peft import export_peft_checkpoint

        return export_peft_checkpoint(
            args.dcp_dir, args.out_dir, config=args.config, overwrite=args.overwrite
        )
    if args.cmd == "to-hf":
        from titan_mem.hf.export import export_checkpoint  # transformers-free, but only this command needs it

        return export_checkpoint(
            args.dcp_dir, args.out_dir, config=args.config, dtype=args.dtype, overwrite=args.overwrite
        )
    if args.cmd == "from-gguf":
        from titan_mem.hf.gguf import gguf_to_hf  # needs the optional gguf extra

        return gguf_to_hf(args.src, args.out_dir, overwrite=args.overwrite)
    if args.cmd == "delta":
        summary = make_delta(
            args.finetuned, args.base, args.out, allow_dense=args.allow_dense, overwrite=args.overwrite
        )
        return summary.line(args.out)
    return apply_delta(args.src, args.delta, args.out_dir, remove=args.remove, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    """User errors (errors.is_user_error) are one `error:` line, exit 2; anything else keeps its traceback."""
    try:
        print(run(sys.argv[1:] if argv is None else argv), flush=True)
        return 0
    except Exception as e:
        if not is_user_error(e):
            report_unexpected(e, None)  # no run folder: the traceback goes to stderr
            return UNEXPECTED_EXIT
        if isinstance(e, OSError) and e.strerror:  # disk full, permissions: nothing half-written stays
            print(f"error: {e.filename or ''}: {e.strerror}", file=sys.stderr, flush=True)
        else:  # ConvertError included: already `<path>: <what>`
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
