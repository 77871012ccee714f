"""Memory models out to `transformers` (titan_mem/hf/remote/, hf/export.py, hf/auto.py): an exported memory
model loads with `trust_remote_code=True` and gives titan_mem's logits and greedy tokens, per base
architecture and memory variant and on a retrofitted SmolLM2; it loads in a process that cannot import
titan_mem; `import titan_mem.hf.auto` loads it with no remote code; what the modeling file cannot compute
is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import REAL_MODEL

from titan_mem.errors import ConvertError
from titan_mem.eval.greedy import greedy_generate
from titan_mem.hf.export import export_hf
from titan_mem.hf.remote.configuration_titan_mem import MEMORY_KEYS, TitanMemConfig
from titan_mem.models.args import FLAVORS, MemoryArgs, ModelArgs
from titan_mem.models.transformer import Transformer

VOCAB = 128
BASE = dataclasses.replace(
    FLAVORS["debug"], vocab_size=VOCAB, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64
)
VARIANTS = {
    # Llama base, memory in place of the FFN, batch-normalised queries (eval: running statistics)
    "llama_replace_batchnorm": ({}, MemoryArgs(layers=[1], n_keys=8, heads=2, topk=4, k_dim=16, v_dim=32,
                                                query_norm="batchnorm")),
    # Qwen2 base (q/k/v biases), retrofit `add` beside the FFN in two blocks, Memory+ gate
    "qwen2_add_two_layers": ({"qkv_bias": True}, MemoryArgs(layers=[1, 3], n_keys=8, heads=2, topk=4,
                                                            k_dim=16, v_dim=64, beside_ffn=True)),
    # Qwen3 base (q/k norms), tied embeddings, plain PKM (no Memory+), per-head RMS query norm
    "qwen3_tied_pkm": ({"qk_norm": True, "tie_embeddings": True}, MemoryArgs(layers=[2], n_keys=8, heads=2,
                                                                             topk=4, k_dim=16, v_dim=-1,
                                                                             plus=False)),
    # one value pool read by two memory layers, no query norm
    "llama_shared_pool": ({}, MemoryArgs(layers=[0, 2], n_keys=8, heads=2, topk=4, k_dim=16, v_dim=32,
                                         query_norm="none", shared_values=True)),
}  # fmt: skip
PROMPTS = [[5, 17, 99, 3, 64, 12, 7], [42, 8, 8, 120]]


def memory_model(variant: str) -> tuple[Transformer, ModelArgs]:
    """A random memory model whose every part moves the logits (value rows and gates far from their init)."""
    base_kw, memory = VARIANTS[variant]
    args = dataclasses.replace(BASE, memory=memory, **base_kw)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "values" in name or "out_gate" in name:
                p.normal_()
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return model.eval(), args


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], new: int, pad: int = 0) -> list[list[int]]:
    """`generate` on left-padded prompts: each row's new tokens."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad
    )
    return out[:, width:].tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_remote_code_gives_titan_mems_logits_and_greedy_tokens(variant, tmp_path):
    model, args = memory_model(variant)
    print(export_hf(model.state_dict(), args, tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_titan_mem.TitanMemForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert type(hf).__module__.startswith("transformers_modules.")  # the folder's copy, not titan_mem's
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(tokens), hf(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ours = greedy_generate(model, PROMPTS, max_new_tokens=12, pad_id=0, eos_id=None)
    assert hf_greedy(hf, PROMPTS, 12) == ours


def test_in_process_registration_needs_no_remote_code(tmp_path):
    import titan_mem.hf.auto  # noqa: F401  (registers the classes)
    from titan_mem.hf.remote.modeling_titan_mem import TitanMemForCausalLM

    model, args = memory_model("qwen2_add_two_layers")
    export_hf(model.state_dict(), args, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf) is TitanMemForCausalLM
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
    # a fresh model from the config gets titan_mem's memory init, not the decoder's (which skips it)
    fresh = transformers.AutoModelForCausalLM.from_config(hf.config)
    memory = fresh.model.layers[1].memory
    bound = (memory.k_dim // 2) ** -0.5
    assert 0.5 * bound < float(memory.keys.detach().abs().max()) <= bound
    assert float(memory.values.weight.detach().abs().max()) == 0.0  # `add`: starts as the base model
    assert torch.equal(memory.out_gate.detach(), torch.ones_like(memory.out_gate))


# Runs in a fresh interpreter that cannot import titan_mem (an import blocker ahead of every finder).
CLEAN_PROCESS = """
import importlib.abc, json, sys
class NoTitanMem(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "titan_mem" or name.startswith("titan_mem."):
            raise ImportError("titan_mem is hidden in this process")
sys.meta_path.insert(0, NoTitanMem())
import torch, transformers
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
try:
    transformers.AutoModelForCausalLM.from_pretrained(folder)
    refused = ""
except ValueError as e:
    refused = str(e)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
width = max(map(len, prompts))
ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
out = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                     pad_token_id=0)
result = {"tokens": out[:, width:].tolist(), "refused": refused, "module": type(model).__module__}
print("RESULT", json.dumps(result))
"""


def test_a_process_without_titan_mem_generates_the_same_tokens(tmp_path):
    model, args = memory_model("llama_replace_batchnorm")
    export_hf(model.state_dict(), args, tmp_path / "out")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", CLEAN_PROCESS, str(tmp_path / "out"), json.dumps(PROMPTS)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.rpartition("RESULT ")[2])
    assert got["tokens"] == greedy_generate(model, PROMPTS, max_new_tokens=12, pad_id=0, eos_id=None)
    assert got["module"].startswith("transformers_modules.")
    # without trust_remote_code: transformers' own refusal, not some other model
    assert "trust_remote_code" in got["refused"], got["refused"]


def test_the_modeling_file_knows_every_memory_setting():
    """A new MemoryArgs field must be taught to the remote code (and its check) before models carry it."""
    assert set(MEMORY_KEYS) == {f.name for f in dataclasses.fields(MemoryArgs)}


def test_what_the_modeling_file_cannot_compute_is_refused_in_one_line(tmp_path):
    model, args = memory_model("llama_replace_batchnorm")
    both = dataclasses.replace(args, qkv_bias=True, qk_norm=True)  # no transformers decoder computes it
    with pytest.raises(ConvertError, match="qkv_bias with qk_norm has no HF architecture"):
        export_hf(Transformer(both).state_dict(), both, tmp_path / "both")
    assert not (tmp_path / "both").exists() and not (tmp_path / "both.partial").exists()
    # a non-empty output folder is refused before anything is written
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="exists"):
        export_hf(model.state_dict(), args, tmp_path / "taken")
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["notes.txt"]
    # a config.json whose memory block this modeling file does not know: one line naming the key
    export_hf(model.state_dict(), args, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["titan_mem"]["memory"]["value_dtype"] = "fp8"
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    from titan_mem.hf.remote.modeling_titan_mem import TitanMemForCausalLM

    with pytest.raises(ValueError, match=r"^config.json: titan_mem.memory.value_dtype: a setting this"):
        TitanMemForCausalLM(TitanMemConfig.from_pretrained(tmp_path / "out"))


def real_model_present() -> bool:
    if (REAL_MODEL / "model.safetensors").is_file():
        return True
    if os.environ.get("TITAN_MEM_REQUIRE_REAL_MODEL") == "1":
        raise RuntimeError(f"{REAL_MODEL} is missing: run tools/get_model.sh smollm2-135m")
    return False


@pytest.fixture(scope="module")
def smollm2_retrofit(tmp_path_factory):
    """SmolLM2-135M retrofitted with an `add` memory at block 15 (1K slots), value rows and output
    projection random so the memory moves the logits, exported with its tokenizer: (titan_mem model, args,
    exported folder)."""
    if not real_model_present():
        pytest.skip(f"{REAL_MODEL} not present (tools/get_model.sh smollm2-135m)")
    from titan_mem.data.hf_tokenizer import TOKENIZER_FILES
    from titan_mem.hf.config import model_args_from_hf
    from titan_mem.hf.retrofit import base_state_dict

    args = model_args_from_hf(REAL_MODEL)
    args.memory = MemoryArgs(layers=[15], n_keys=32, heads=2, topk=8, k_dim=64, v_dim=256, beside_ffn=True)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    missing, _ = model.load_state_dict(base_state_dict(REAL_MODEL, args), strict=False)
    assert all(".feed_forward." in n for n in missing)  # only the memory layer stays as initialised
    with torch.no_grad():
        model.layers["15"].feed_forward.values.weight.normal_(0.0, 2.0)
        model.layers["15"].feed_forward.value_proj.weight.normal_(0.0, 0.05)
    folder = tmp_path_factory.mktemp("smollm2") / "hf"
    tokenizer = [REAL_MODEL / f for f in TOKENIZER_FILES if (REAL_MODEL / f).is_file()]
    export_hf(model.state_dict(), args, folder, tokenizer_files=tokenizer)
    return model.eval(), args, folder


def test_retrofitted_smollm2_loads_with_remote_code(smollm2_retrofit):
    model, _, folder = smollm2_retrofit
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = [tok("The capital of France is")["input_ids"], tok("def add(a, b):\n    return")["input_ids"]]
    tokens = torch.tensor([prompts[0]])
    with torch.no_grad():
        base_hf = transformers.AutoModelForCausalLM.from_pretrained(REAL_MODEL).eval()
        want, got, base = model(tokens), hf(tokens).logits, base_hf(tokens).logits
    assert (want - base).abs().max() > 0.1  # the memory changes the model: the comparison below means it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ours = greedy_generate(model, prompts, max_new_tokens=10, pad_id=pad, eos_id=None)
    assert hf_greedy(hf, prompts, 10, pad) == ours


def test_knowledge_patches_apply_to_an_exported_model_as_to_the_checkpoint(tmp_path):
    """Ship the base once, facts as patches: a patch made from two titan_mem checkpoints, applied to the
    base's transformers export, gives the finetuned checkpoint's logits; it comes off again bit for bit;
    the patched model saves with its lineage; a patch for another base, twice, or on a patched export's
    copy of itself is refused in one line."""
    from titan_mem.checkpoint.dcp_index import MODEL_KEY, open_dcp
    from titan_mem.checkpoint.files import save_dcp
    from titan_mem.checkpoint.patches import apply_delta, make_delta, read_lineage

    model, args = memory_model("qwen2_add_two_layers")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    finetuned = {k: v.clone() for k, v in base.items()}
    finetuned["layers.1.feed_forward.values.weight"][[3, 5, 40]] += 1.5
    finetuned["layers.3.feed_forward.values.weight"][7] -= 2.0
    save_dcp({MODEL_KEY: base}, tmp_path / "base")
    save_dcp({MODEL_KEY: finetuned}, tmp_path / "finetuned")
    patch = tmp_path / "facts.safetensors"
    make_delta(tmp_path / "finetuned", tmp_path / "base", patch)
    export_hf(base, args, tmp_path / "hf")  # its lineage: the base state's own tensor hashes

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = hf(tokens).logits
        assert hf.apply_knowledge_patch(str(patch)) == 4
        model.load_state_dict(finetuned)
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.equal(hf(tokens).logits, before)
    with pytest.raises(ValueError, match=r"facts.safetensors: this patch is already applied to this model$"):
        hf.apply_knowledge_patch(str(patch))
    hf.save_pretrained(tmp_path / "patched")  # the patched model carries its lineage (applied: this patch)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "patched", trust_remote_code=True)
    with pytest.raises(ValueError, match="already applied"):
        again.apply_knowledge_patch(str(patch))
    assert hf.apply_knowledge_patch(str(patch), remove=True) == 4
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, before)

    # the export of a patched checkpoint records the patch, and lets it come off
    apply_delta(tmp_path / "base", patch, tmp_path / "base+facts")
    export_hf(
        finetuned, args, tmp_path / "hf_patched", lineage=read_lineage(open_dcp(tmp_path / "base+facts"))
    )
    patched = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf_patched", trust_remote_code=True
    )
    with pytest.raises(ValueError, match="already applied"):
        patched.apply_knowledge_patch(str(patch))
    assert patched.apply_knowledge_patch(str(patch), remove=True) == 4

    other, other_args = memory_model("qwen2_add_two_layers")
    with torch.no_grad():
        other.layers["0"].attention.wq.weight.add_(0.01)  # another base: the same names and shapes
    export_hf(other.state_dict(), other_args, tmp_path / "other")
    other_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "other", trust_remote_code=True)
    with pytest.raises(ValueError, match=r"facts.safetensors: a patch for another base model"):
        other_hf.apply_knowledge_patch(str(patch))


# Items shaped as three kinds of lm-eval task: multiple choice (HellaSwag's context + endings), short-answer
# QA (TriviaQA's "Question: ... Answer:"), and a rolling log-likelihood (wikitext's perplexity).
CHOICE = (
    "A man is sitting on a roof. He",
    [
        " is using wrap to wrap a pair of skis.",
        " starts pulling up roofing on a roof.",
        " is ripping level tiles off.",
    ],
)
QA = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: Who wrote Hamlet?\nAnswer:", " William Shakespeare"),
    ("Question: What is 7 times 6?\nAnswer:", " 42"),
    ("1, 2, 3, 4, 5, 6, 7, 8,", " 9"),
]
ROLLING = "The river winds through the valley, past the old mill and the church, and on to the sea."


def test_lm_eval_hf_backend_and_our_adapter_agree_on_an_exported_model(smollm2_retrofit):
    """The check users run first: lm-eval's stock `hf` backend (transformers + remote code) and titan_mem's
    adapter score the same exported folder's items within 1e-4 nats, with the same greedy flags."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from titan_mem.data.hf_tokenizer import HFTokenizer
    from titan_mem.eval.lm import EvalModel
    from titan_mem.eval.lm_eval_adapter import TitanMemLM
    from titan_mem.hf.weights import load_hf_model

    _, _, folder = smollm2_retrofit
    pairs = [(CHOICE[0], ending) for ending in CHOICE[1]] + QA
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (ROLLING,), 0)]
    theirs = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=4, device="cpu", dtype="float32")
    model, args = load_hf_model(folder)
    ours = TitanMemLM(
        lm=EvalModel(model, HFTokenizer(str(folder)), max_seq_len=args.max_seq_len, batch_size=4)
    )
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want):
        assert abs(lp - ref_lp) < 1e-4 and greedy == ref_greedy, (lp, ref_lp, greedy, ref_greedy)
    assert abs(ours.loglikelihood_rolling(rolling)[0] - theirs.loglikelihood_rolling(rolling)[0]) < 1e-4
    assert any(g for _, g in got)  # the model is greedy on some answer: the flags are compared, not all False
