"""An HF model's own tokenizer (titan_mem/data/hf_tokenizer.py) and instruction data (data/chat.py): token ids
and chat renderings equal `transformers`' for the same tokenizer.json; special-token text in documents stays
text; the chat regime trains on assistant turns only; a retrofit heals on a local OASST-style JSONL with
the base model's tokenizer; bad files get one line."""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import error_line, losses, ok, run_trainer
from test_retrofit import retro
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from titan_mem.data import build_tokenizer
from titan_mem.data.chat import chat_row, load_conversations
from titan_mem.data.config import DataConfig, TokenizerConfig
from titan_mem.data.packing import IGNORE_INDEX
from titan_mem.data.qa import build_finetune_dataset

# ChatML as Qwen's models use it, written here: a default system turn when the conversation has none
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. Anna Berg was born in Oslo in 1931 and works as a chemist.",
    "Question: Where was Anna Berg born?\nAnswer: Oslo",
    "A helpful assistant answers the user's questions about people, places and numbers: 12, 345, 6789.",
] * 20
CONVERSATIONS = [
    [{"role": "user", "content": "Where was Anna Berg born?"}, {"role": "assistant", "content": "In Oslo."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And its river?"},
        {"role": "assistant", "content": "The Seine."},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here (vocabulary 400) with ChatML specials and template."""
    folder = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_ids_and_chat_rendering_equal_transformers(hf_tokenizer):
    ours = build_tokenizer(TokenizerConfig(name=str(hf_tokenizer)))
    theirs = transformers.AutoTokenizer.from_pretrained(hf_tokenizer)
    texts = [*CORPUS[:3], "Ünïcödé and emoji 🙂 survive", ""]
    assert [ours.encode(t) for t in texts] == [theirs.encode(t, add_special_tokens=False) for t in texts]
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]
    assert all(ours.decode(ours.encode(t)) == t for t in texts)
    assert ours.eos_id == theirs.convert_tokens_to_ids("<|im_end|>")
    assert ours.pad_id == theirs.convert_tokens_to_ids("<|endoftext|>")
    assert ours.n_words == len(theirs)
    for conv in CONVERSATIONS:
        for prompt in (False, True):
            want = theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(conv, add_generation_prompt=prompt) == want
    # a document cannot inject a special token: its text is plain text
    assert ours.eos_id not in ours.encode("end <|im_end|> here")
    assert ours.encode_special("<|im_end|>") == [ours.eos_id]


def test_chat_rows_train_on_assistant_turns_only(hf_tokenizer, tmp_path):
    tok = build_tokenizer(TokenizerConfig(name=str(hf_tokenizer)))
    row = chat_row(CONVERSATIONS[1], tok)
    assert tok.decode(row.tokens) == tok.apply_chat_template(CONVERSATIONS[1])
    targets = [t for t, is_target in zip(row.tokens, row.targets) if is_target]
    assert tok.decode(targets) == "Paris.<|im_end|>\nThe Seine.<|im_end|>\n"
    # through the finetuning loader: labels are exactly the assistant tokens
    data = tmp_path / "oasst.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    cfg = DataConfig(source=str(data), regime="chat", shuffle_buffer=0)
    batch = build_finetune_dataset(
        cfg, tok, seq_len=96, micro_batch_size=2, dp_rank=0, dp_world_size=1
    ).batch(0)
    labels = [int(x) for x in batch["labels"][0] if x != IGNORE_INDEX]
    assert tok.decode(labels) == "In Oslo.<|im_end|>\n"
    # a tiktoken tokenizer has no template: `User:` / `Assistant:` lines, answers end with EOS
    plain = build_tokenizer(TokenizerConfig())
    row = chat_row(CONVERSATIONS[0], plain)
    answer = [t for t, is_target in zip(row.tokens, row.targets) if is_target]
    assert plain.decode(answer) == " In Oslo.<|endoftext|>"
    assert plain.decode(row.tokens[1:]).startswith("User: Where was Anna Berg born?\nAssistant:")


def test_retrofit_heals_on_oasst_jsonl_with_the_bases_tokenizer(dense_hf, hf_tokenizer, tmp_path):
    _, folder = dense_hf
    data = tmp_path / "oasst.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4))
    args = retro(
        folder,
        "--retrofit.mode=add",
        f"--tokenizer.name={hf_tokenizer}",
        f"--data.source={data}",
        "--data.regime=chat",
        "--training.mode=heal",
        "--training.steps=2",
        "--training.seq_len=96",  # ChatML's system turn alone is ~20 tokens
        f"--job.dump_folder={tmp_path / 'run'}",
    )
    ok(run_trainer(args))
    assert len(losses(tmp_path / "run")) == 2


def test_bad_tokenizer_and_chat_files_get_one_line(dense_hf, hf_tokenizer, tmp_path):
    _, folder = dense_hf
    run = [
        f"--job.dump_folder={tmp_path / 'run'}",
        "--training.steps=1",
        "--training.mode=heal",
        "--data.regime=chat",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    error_line(run_trainer([*retro(folder, f"--tokenizer.name={empty}"), *run]), "tokenizer.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    error_line(run_trainer([*retro(folder, f"--tokenizer.name={broken}"), *run]), "not a tokenizers file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    tok = [f"--tokenizer.name={hf_tokenizer}", f"--data.source={bad}"]
    error_line(run_trainer([*retro(folder, *tok), *run]), "bad.jsonl: record 1", "assistant")


def test_oasst_message_trees_become_one_conversation_per_top_reply(tmp_path):
    """OpenAssistant/oasst1 rows (message trees) read as conversations: root to each rank-0 reply."""
    rows = [
        {"message_id": "a", "parent_id": None, "role": "prompter", "text": "Hi?", "rank": None},
        {"message_id": "b", "parent_id": "a", "role": "assistant", "text": "Hello.", "rank": 0},
        {"message_id": "c", "parent_id": "a", "role": "assistant", "text": "Meh.", "rank": 1},
        {"message_id": "d", "parent_id": "b", "role": "prompter", "text": "And?", "rank": None},
        {"message_id": "e", "parent_id": "d", "role": "assistant", "text": "Bye.", "rank": 0},
    ]
    path = tmp_path / "oasst1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    threads = load_conversations(DataConfig(source=str(path), regime="chat"))
    assert [[m["content"] for m in t] for t in threads] == [
        ["Hi?", "Hello."],
        ["Hi?", "Hello.", "And?", "Bye."],
    ]
    assert [m["role"] for m in threads[1]] == ["user", "assistant", "user", "assistant"]
    assert load_conversations(DataConfig(source=str(path), regime="chat", max_examples=1)) == threads[:1]


def test_a_hub_tokenizer_offline_is_refused_in_one_line(dense_hf, tmp_path):
    _, folder = dense_hf
    args = [*retro(folder, "--tokenizer.name=hf:nobody/no-such-model"), f"--job.dump_folder={tmp_path}/run"]
    error_line(run_trainer(args, env={"HF_HUB_OFFLINE": "1"}), "tokenizer.name: nobody/no-such-model", "hub")
