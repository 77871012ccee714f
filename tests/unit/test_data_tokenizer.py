import base64
import importlib.util
from pathlib import Path

import pytest

from titan_mem.data import TokenizerConfig, build_tokenizer, padded_vocab_size
from titan_mem.data.tokenizer import CL100K_SHA256, DEBUG_BPE_PATH, cl100k_path, load_bpe_file

REPO = Path(__file__).resolve().parents[2]
TEXTS = [
    "hello world",
    "Héllo wörld 🙂 — naïve café",
    "line one\nline two\n\n  indented\ttab",
    "",
    "<|endoftext|> x",
]


def _write_bpe(path: Path, merges: list[bytes]) -> None:
    tokens = [bytes([i]) for i in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


def test_cl100k_offline_roundtrip_and_known_ids():
    tok = build_tokenizer(TokenizerConfig(name="cl100k_base"))
    assert tok.encode("hello world") == [15339, 1917]  # the real cl100k ids
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == tok.bos_id == 100257
    assert tok.pad_id == 100277 and tok.n_words == 100278
    assert tok.padded_vocab_size == 100352 and tok.padded_vocab_size % 128 == 0


def test_cl100k_file_hash_is_checked(tmp_path):
    assert cl100k_path().is_file()
    wrong = "0" * 64
    with pytest.raises(ValueError, match="sha256"):
        load_bpe_file(cl100k_path(), expected_sha256=wrong)
    assert CL100K_SHA256.startswith("223921b7")


def test_special_tokens_bos_eos_and_literal_special_text_is_plain():
    tok = build_tokenizer(TokenizerConfig(name="cl100k_base"))
    ids = tok.encode("a b", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == len(tok.encode("a b")) + 2
    assert tok.eos_id not in tok.encode("<|endoftext|>")  # a document cannot inject a special token
    assert tok.pad_id not in tok.encode("<|pad|>")


def test_encode_batch_matches_encode():
    tok = build_tokenizer(TokenizerConfig(name="cl100k_base", num_threads=2))
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, num_threads=1, eos=True) == [tok.encode(t, eos=True) for t in TEXTS]


def test_debug_tokenizer_is_small_and_roundtrips():
    assert DEBUG_BPE_PATH.is_file() and 10_000 < DEBUG_BPE_PATH.stat().st_size < 100_000
    tok = build_tokenizer(TokenizerConfig(name="debug"))
    assert 2000 < tok.n_words <= 4096
    assert tok.eos_id == tok.n_words - 2 and tok.pad_id == tok.n_words - 1
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # trained on the synthetic corpus: its words are single tokens
    assert len(tok.encode(" was born on")) == 3


def test_custom_tiktoken_file_loads(tmp_path):
    path = tmp_path / "tiny.tiktoken"
    _write_bpe(path, [b"ab", b"abc", b" a"])
    tok = build_tokenizer(TokenizerConfig(name=str(path)))
    assert tok.n_words == 256 + 3 + 2 and tok.eos_id == 259 and tok.pad_id == 260
    assert tok.encode("abc") == [257]
    assert tok.decode(tok.encode("xabc ab é")) == "xabc ab é"
    llama_style = build_tokenizer(TokenizerConfig(name=str(path), pattern="llama3"))
    assert llama_style.decode(llama_style.encode("Don't 123456")) == "Don't 123456"


def test_missing_tokenizer_file_errors_naming_path(tmp_path):
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        build_tokenizer(TokenizerConfig(name=str(missing)))


@pytest.mark.parametrize(
    "content, why",
    [
        ("not base64!!! 0\n", "line 1"),
        ("YQ== notanumber\n", "line 1"),
        ("", "no tokens"),
        ("YQ== 0\nYg== 1\n", "single bytes"),
        ("YQ== 0\nYQ== 1\n", "duplicate"),
    ],
)
def test_corrupt_tokenizer_file_errors_naming_path(tmp_path, content, why):
    path = tmp_path / "corrupt.tiktoken"
    path.write_text(content)
    with pytest.raises(ValueError, match=why) as err:
        build_tokenizer(TokenizerConfig(name=str(path)))
    assert "corrupt.tiktoken" in str(err.value) and "\n" not in str(err.value)


def test_padded_vocab_size():
    assert padded_vocab_size(1) == 128
    assert padded_vocab_size(128) == 128
    assert padded_vocab_size(129) == 256
    assert padded_vocab_size(3072) == 3072
    assert padded_vocab_size(100, multiple=64) == 128
    with pytest.raises(ValueError):
        padded_vocab_size(0)


def test_bpe_trainer_is_deterministic_and_learns_frequent_pairs():
    spec = importlib.util.spec_from_file_location(
        "train_debug_tokenizer", REPO / "tools" / "train_debug_tokenizer.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    texts = ["the cat sat on the mat", "the hat", "that theme"] * 5
    a = mod.train_bpe(texts, 256 + 10)
    b = mod.train_bpe(list(reversed(texts)), 256 + 10)
    assert a == b and len(a) == 266
    assert b"th" in a and b" the" in a
    assert sorted(a.values()) == list(range(266))
