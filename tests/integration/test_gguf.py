"""GGUF in (titan_mem/hf/gguf.py, hf/gguf_tokenizer.py): a tiny Llama written here as llama.cpp's converter
writes it (q/k rows permuted, tensors quantized) reads back as the HF folder whose logits equal the
original model's; every supported quantization dequantizes as `gguf` does; the tokenizer splits digits
where the file's pre-tokenizer says; the chat template and BOS come from the file; bad files get one line
and leave nothing behind."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import run_tool
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from titan_mem.data import build_tokenizer
from titan_mem.data.config import TokenizerConfig
from titan_mem.data.qa import qa_rows
from titan_mem.data.records import QAExample
from titan_mem.hf.gguf import read_gguf
from titan_mem.hf.weights import load_hf_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Anna Berg was born in Oslo in 1931; she is 93 years old.", "Question: Where?\nAnswer: Oslo"] * 30
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
N_HEADS, N_KV = 4, 2


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, initial_alphabet=alphabet)
    )
    return tok


def _llama(vocab: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from rotate_half halves to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _gguf_name(hf: str) -> str:
    if hf in _NAMES:
        return _NAMES[hf]
    _, _, layer, *module, leaf = hf.split(".")
    return f"blk.{layer}.{_NAMES['.'.join(module)]}.{leaf}"


def write_gguf(path, model, tok: Tokenizer, *, qtype=Q.F32, arch="llama", pre="smollm", add_bos=False, **kv):
    """`model` and `tok` as a GGUF file, the way llama.cpp's convert_hf_to_gguf writes a Llama."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    data = json.loads(tok.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda x: x[1])
    w.add_tokenizer_model(kv.pop("tokenizer_model", "gpt2"))
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(tok.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if "q_proj" in name:
            a = _permute(a, cfg.num_attention_heads)
        elif "k_proj" in name:
            a = _permute(a, cfg.num_key_value_heads)
        kind = qtype if a.ndim == 2 else Q.F32
        w.add_tensor(_gguf_name(name), gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bpe():
    return _bpe()


@pytest.fixture(scope="module")
def llama(bpe):
    return _llama(bpe.get_vocab_size())


def _convert(src, out):
    return run_tool("convert_checkpoint.py", ["from-gguf", str(src), str(out)])


def test_a_gguf_llama_reads_back_with_the_original_logits(tmp_path, bpe, llama):
    src = write_gguf(tmp_path / "m.gguf", llama, bpe)
    r = _convert(src, tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    ids = torch.tensor([bpe.encode(CORPUS[0]).ids])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = llama(ids).logits
        assert torch.equal(theirs(ids).logits, want)  # every tensor, q/k order included, came back exactly
        ours, _ = load_hf_model(tmp_path / "hf")
        torch.testing.assert_close(ours.eval()(ids), want, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == N_KV


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_each_quantization_dequantizes_as_gguf_does(tmp_path, bpe, llama, qtype):
    model = read_gguf(write_gguf(tmp_path / "m.gguf", llama, bpe, qtype=qtype))
    for name, t in llama.state_dict().items():
        a = t.float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # quantized in llama.cpp's row order
            heads = N_HEADS if "q_proj" in name else N_KV
            a = _permute(a, heads)
            want = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
            perm = torch.from_numpy(_permute(np.arange(a.shape[0]), heads))
            got = model.tensors[name][perm]  # back into llama.cpp's order
            assert torch.equal(got, torch.from_numpy(want))
        elif a.ndim == 2:
            want = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
            assert torch.equal(model.tensors[name], torch.from_numpy(want)), name
        err = (model.tensors[name] - t).abs().max().item()
        assert err < (0.02 if qtype in (Q.F16, Q.BF16, Q.Q8_0) else 0.2), (name, err)


def test_k_quant_tensors_take_their_logical_shape(tmp_path, bpe, llama):
    """K-quants (256-value super-blocks): `gguf` cannot write them, so raw blocks of Q6_K/Q4_K bytes stand in;
    the reader must give the dequantized values in the tensor's (rows, columns) shape."""
    rng = np.random.default_rng(0)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raws = {}
    for kind in (Q.Q6_K, Q.Q4_K):
        block, nbytes = gguf.GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 255, size=(3, 512 // block * nbytes), dtype=np.uint8)
        raw.view(np.float16)[:, :1] = np.float16(0.01)  # finite scales
        raws[kind] = raw
        w.add_tensor(f"blk.0.ffn_{'up' if kind == Q.Q6_K else 'gate'}.weight", raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    for t, (kind, raw) in zip(reader.tensors, raws.items()):
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        assert got.shape == (3, 512) and torch.equal(got, torch.from_numpy(gguf.quants.dequantize(raw, kind)))


def test_the_tokenizer_splits_digits_as_the_files_pre_tokenizer_says(tmp_path, bpe, llama):
    text = "In 1931 she was 93; 12345 + 6789 = 19134, ok?"
    digits = read_gguf(write_gguf(tmp_path / "a.gguf", llama, bpe, pre="smollm"))
    plain = read_gguf(write_gguf(tmp_path / "b.gguf", llama, bpe, pre="gpt2"))
    for model, folder in ((digits, tmp_path / "ta"), (plain, tmp_path / "tb")):
        folder.mkdir()
        for name, body in model.tokenizer.items():
            (folder / name).write_text(body)
    ours_d = build_tokenizer(TokenizerConfig(name=str(tmp_path / "ta")))
    ours_p = build_tokenizer(TokenizerConfig(name=str(tmp_path / "tb")))
    pieces = [bpe.id_to_token(i) for i in ours_d.encode(text)]
    numbers = [p for p in pieces if any(c.isdigit() for c in p)]
    assert numbers and all(len(p.lstrip("Ġ")) == 1 for p in numbers)  # every digit a token of its own
    assert ours_p.encode(text) == bpe.encode(text).ids  # plain GPT-2 splitting: the trained tokenizer's ids
    assert ours_d.encode(text) != ours_p.encode(text)
    assert all(ours_d.decode(ours_d.encode(t)) == t for t in (text, *CORPUS[:2], "Ünïcödé 🙂"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "ta")  # transformers reads the same files
    assert theirs.encode(text, add_special_tokens=False) == ours_d.encode(text)


def test_chat_template_and_bos_come_from_the_file(tmp_path, bpe, llama):
    for add_bos in (False, True):
        folder = tmp_path / f"hf{add_bos}"
        assert (
            _convert(
                write_gguf(tmp_path / f"m{add_bos}.gguf", llama, bpe, add_bos=add_bos), folder
            ).returncode
            == 0
        )
        tok = build_tokenizer(TokenizerConfig(name=str(folder)))
        bos = bpe.token_to_id("<|im_start|>")
        assert tok.add_bos is add_bos and tok.bos_id == bos
        assert (tok.prefix_ids() == [bos]) is add_bos
        row = qa_rows([QAExample(question="Where was Anna born?", answers=["Oslo"])], tok)[0]
        assert (row.tokens[0] == bos) is add_bos
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        assert theirs("Oslo").input_ids == tok.encode("Oslo", bos=True)  # transformers adds what we add
        msgs = [{"role": "user", "content": "hi"}]
        assert tok.apply_chat_template(msgs) == theirs.apply_chat_template(msgs, tokenize=False)
        assert (folder / "chat_template.jinja").read_text() == TEMPLATE


def _refused(tmp_path, src, *needles):
    out = tmp_path / "out"
    r = _convert(src, out)
    line = r.stderr.strip()
    assert r.returncode == 2 and len(line.splitlines()) == 1 and line.startswith("error:"), r.stderr
    assert all(n in line for n in needles), line
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_bad_gguf_files_get_one_line_and_leave_nothing(tmp_path, bpe, llama):
    good = write_gguf(tmp_path / "good.gguf", llama, bpe, qtype=Q.Q8_0)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _refused(tmp_path, cut, "cut.gguf", "truncated")
    head = tmp_path / "head.gguf"
    head.write_bytes(good.read_bytes()[:64])
    _refused(tmp_path, head, "head.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    _refused(tmp_path, text, "notes.gguf", "not a GGUF file")
    _refused(tmp_path, tmp_path / "missing.gguf", "missing.gguf", "not found")
    _refused(tmp_path, write_gguf(tmp_path / "phi.gguf", llama, bpe, arch="phi3"), "phi.gguf", "'phi3'")
    _refused(tmp_path, write_gguf(tmp_path / "pre.gguf", llama, bpe, pre="falcon"), "pre.gguf", "'falcon'")
    spm = write_gguf(tmp_path / "spm.gguf", llama, bpe, tokenizer_model="llama")
    _refused(tmp_path, spm, "spm.gguf", "tokenizer.ggml.model='llama'")
    iq = tmp_path / "iq.gguf"  # a quantization the reader does not take
    w = gguf.GGUFWriter(str(iq), "llama")
    block, nbytes = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 64 // block * nbytes), np.uint8), raw_dtype=Q.IQ4_NL)
    for key in ("block_count", "embedding_length", "feed_forward_length", "head_count"):
        getattr(w, f"add_{key}")(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _refused(tmp_path, iq, "iq.gguf", "IQ4_NL", "not supported")


def test_an_hf_folder_evaluates_as_the_model_it_holds(tmp_path, bpe, llama):
    """tools/evaluate.py --checkpoint HF_FOLDER: a pretrained model's baseline needs no training run."""
    from titan_mem.distributed import shutdown
    from titan_mem.eval.runner import load_eval_model

    assert _convert(write_gguf(tmp_path / "m.gguf", llama, bpe), tmp_path / "hf").returncode == 0
    try:
        lm, cfg = load_eval_model(tmp_path / "hf")
    finally:
        shutdown()  # loading makes a one-rank process group in this pytest process
    assert cfg.retrofit.base == str((tmp_path / "hf").resolve()) and not cfg.retrofit.layers
    ids = torch.tensor([bpe.encode(CORPUS[0]).ids])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), llama(ids).logits, atol=1e-4, rtol=0)
    context, continuation = "Question: Where was Anna Berg born?\nAnswer:", " Oslo"
    (score,) = lm.loglikelihood([(context, continuation)])
    ctx, cont = lm.encode_pair(context, continuation)
    with torch.no_grad():
        logp = llama(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]
    want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert abs(score.logprob - want) < 1e-3 and ctx[0] != bpe.token_to_id("<|im_start|>")  # no BOS added
