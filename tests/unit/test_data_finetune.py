import json
import random

import pytest
import torch

from titan_mem.data import DataConfig, TokenizerConfig, build_dataloader, build_tokenizer
from titan_mem.data.facts_order import taught_fact_order
from titan_mem.data.synthetic import get_world
from titan_mem.eval.tasks import TaskContext, build_tasks

SYN = dict(source="synthetic", synthetic_known_people=20, synthetic_new_people=4, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(name="debug"))


def _loader(tok, *, seq_len=32, bsz=4, rank=0, world=1, gbs=None, **cfg):
    return build_dataloader(
        DataConfig(**cfg), tok, seq_len=seq_len, micro_batch_size=bsz, dp_rank=rank, dp_world_size=world,
        global_batch_size=gbs,
    )  # fmt: skip


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _rows(tok, batch):
    """Decoded real input tokens of each row."""
    return [tok.decode(ids[mask].tolist()) for ids, mask in zip(batch["input_ids"], batch["token_mask"])]


def _check_padding(tok, b):
    pad = ~b["token_mask"]
    assert bool((b["input_ids"][pad] == tok.pad_id).all())
    assert bool((b["labels"][pad] == -100).all())
    assert tok.pad_id not in b["input_ids"][b["token_mask"]].tolist()
    assert tok.pad_id not in b["labels"].tolist()


def test_fact_regime_one_fact_per_batch_cycled_paraphrases(tok):
    b = _take(_loader(tok, regime="facts", synthetic_paraphrases=3, shuffle_buffer=0, **SYN), 1)[0]
    fact = get_world(0, 20, 4).facts("new", 3)[0]
    rows = _rows(tok, b)
    assert rows == [
        "<|endoftext|>" + p for p in (fact.paraphrases + fact.paraphrases)[:4]
    ]  # BOS + text, cycled
    assert b["input_ids"].shape == (4, 32)
    _check_padding(tok, b)
    # loss on every real token after BOS, ending with EOS; nothing else
    for i in range(4):
        n = int(b["token_mask"][i].sum())
        assert torch.equal(b["labels"][i, : n - 1], b["input_ids"][i, 1:n])
        assert int(b["labels"][i, n - 1]) == tok.eos_id
        assert bool((b["labels"][i, n:] == -100).all())


def test_fact_regime_ranks_and_accumulation_share_one_fact_per_optimizer_step(tok):
    kw = dict(regime="facts", synthetic_paraphrases=8, shuffle_buffer=0, **SYN)
    fact0, fact1 = get_world(0, 20, 4).facts("new", 8)[:2]
    # 2 ranks x 2 micro-batches of 2 rows = global batch 8 = one fact's 8 paraphrases, each once
    per_rank = [_take(_loader(tok, bsz=2, rank=r, world=2, gbs=8, **kw), 4) for r in range(2)]
    step0 = [row for r in range(2) for b in per_rank[r][:2] for row in _rows(tok, b)]
    assert sorted(step0) == sorted("<|endoftext|>" + p for p in fact0.paraphrases)
    step1 = [row for r in range(2) for b in per_rank[r][2:] for row in _rows(tok, b)]
    assert sorted(step1) == sorted("<|endoftext|>" + p for p in fact1.paraphrases)


def test_fact_regime_from_jsonl(tmp_path, tok):
    path = tmp_path / "facts.jsonl"
    facts = [{"fact_id": "f1", "paraphrases": ["Ada lives in Paris.", "Paris is home to Ada."]},
             {"fact_id": "f2", "paraphrases": ["Bo was born in 1990."]}]  # fmt: skip
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    batches = _take(_loader(tok, regime="facts", source=str(path), shuffle_buffer=0, bsz=3), 3)
    ada = ["Ada lives in Paris.", "Paris is home to Ada.", "Ada lives in Paris."]
    assert _rows(tok, batches[0]) == ["<|endoftext|>" + x for x in ada]
    assert _rows(tok, batches[1]) == ["<|endoftext|>Bo was born in 1990."] * 3
    assert _rows(tok, batches[2]) == _rows(tok, batches[0])  # repeats
    (tmp_path / "bad.jsonl").write_text('{"fact_id": "x", "paraphrases": []}\n')
    with pytest.raises(ValueError, match="paraphrases"):
        _loader(tok, regime="facts", source=str(tmp_path / "bad.jsonl"))


def test_qa_regime_loss_only_on_answer(tok):
    b = _take(_loader(tok, regime="qa", shuffle_buffer=0, bsz=2, **SYN), 1)[0]
    qa = get_world(0, 20, 4).qa_examples("new")
    _check_padding(tok, b)
    for i in range(2):
        row = _rows(tok, b)[i]
        assert row == f"<|endoftext|>Question: {qa[i].question}\nAnswer: {qa[i].answers[0]}"
        targets = b["labels"][i][b["labels"][i] != -100].tolist()
        assert tok.decode(targets) == f" {qa[i].answers[0]}<|endoftext|>"


def test_qa_regime_from_local_eval_format(tmp_path, tok):
    path = tmp_path / "nq.jsonl"
    path.write_text(json.dumps({"question": "who wrote it", "answer": ["Bob", "Robert"]}) + "\n")
    b = _take(_loader(tok, regime="qa", source=str(path), bsz=1), 1)[0]
    targets = b["labels"][0][b["labels"][0] != -100].tolist()
    assert tok.decode(targets) == " Bob<|endoftext|>"


def test_documents_regime_streams_chunks_in_order(tmp_path, tok):
    docs = ["First document. " * 9, "Second one is short.", "Third document here. " * 6]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    loader = _loader(tok, regime="documents", source=str(path), seq_len=16, bsz=1, repeat=False)
    batches = list(loader)
    encoded = [tok.encode(d, bos=True, eos=True) for d in docs]
    assert len(batches) == sum(-(-(len(e) - 1) // 16) for e in encoded)  # one step per chunk
    stream, targets = [], []
    for b in batches:
        n = int(b["token_mask"][0].sum())
        stream += b["input_ids"][0, :n].tolist()
        targets += b["labels"][0, :n].tolist()
        _check_padding(tok, b)
    # chunks are consecutive pieces of each document, every token after BOS a target exactly once
    assert targets == [t for e in encoded for t in e[1:]]
    assert stream == [t for e in encoded for t in e[:-1]]


def test_synthetic_articles_hold_each_fact_twice_inside_generic_prose(tok):
    """data.synthetic_article_sections: the document regime's long documents (facts inside mostly other text)
    stream as seq_len chunks, one per step, in document order."""
    world = get_world(0, 20, 4)
    people = world.people("new", 4)
    articles = world.finetune_documents(people, seed=0, article_sections=8)
    assert articles == world.finetune_documents(people, seed=0, article_sections=8)  # deterministic
    assert world.finetune_documents(people, seed=0) == [  # 0 sections: the biography, as before
        world.biography(p, random.Random(f"titan_mem.documents.0.{p.pid}")) for p in people
    ]
    for person, text in zip(people, articles):
        paragraphs = text.split("\n\n")
        assert len(paragraphs) == 8
        statements = [s for s in text.replace("\n\n", " ").split(". ") if person.name in s]
        assert len(statements) >= 12  # six facts, each stated twice (a statement may hold a value twice)
        for attribute in ("birth_city", "university", "employer", "work_city", "field"):
            assert text.count(person.value(attribute)) >= 2, attribute
        assert sum(len(s) for s in statements) < len(text) / 2  # mostly other text
    loader = _loader(
        tok, regime="documents", seq_len=128, bsz=1, repeat=False, synthetic_article_sections=8,
        **{**SYN, "synthetic_taught_people": 4},
    )  # fmt: skip
    stream = [t for b in loader for t in b["labels"][0][b["token_mask"][0]].tolist()]
    assert stream == [t for a in articles for t in tok.encode(a, bos=True, eos=True)[1:]]


def test_finetune_resume_and_worker_count_give_the_same_batches(tok):
    kw = dict(regime="qa", bsz=2, shuffle_buffer=1, **SYN)
    ref = _take(_loader(tok, **kw), 20)  # 24 examples / 2 = 12 steps per epoch: crosses an epoch
    loader = _loader(tok, **kw)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    resumed = _loader(tok, **kw)
    resumed.load_state_dict(state)
    got = _take(resumed, 13)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, ref[7:]) for k in a)
    with_workers = _take(_loader(tok, num_workers=2, **kw), 20)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(with_workers, ref) for k in a)
    # an epoch shows each of the 24 examples once; the next epoch is reshuffled
    epoch0 = [row for b in ref[:12] for row in _rows(tok, b)]
    assert len(set(epoch0)) == 24
    epoch1 = [row for b in ref[12:20] for row in _rows(tok, b)]
    assert epoch1 != epoch0[:16]


def test_finetune_refuses_mismatched_state(tok):
    loader = _loader(tok, regime="facts", **SYN)
    next(iter(loader))
    with pytest.raises(ValueError, match="dp_world_size=1.*dp_world_size=2"):
        _loader(tok, regime="facts", rank=0, world=2, **SYN).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="micro_batch_size=4"):
        _loader(tok, regime="facts", bsz=2, **SYN).load_state_dict(loader.state_dict())


def test_global_batch_must_split_evenly(tok):
    with pytest.raises(ValueError, match="global_batch_size 6"):
        _loader(tok, regime="facts", bsz=4, gbs=6, **SYN)


@pytest.mark.parametrize("regime", ["facts", "qa", "documents"])
def test_taught_people_narrow_every_finetune_regime(tok, regime):
    """data.synthetic_taught_people=K: finetuning reads only the first K new people (the rest stay untaught
    for evaluation's new_untaught population)."""
    world = get_world(0, 20, 4)
    taught, untaught = world.people("new_taught", 2), world.people("new_untaught", 2)
    assert [p.pid for p in taught + untaught] == [p.pid for p in world.people("new")]
    cfg = dict(regime=regime, shuffle_buffer=0, repeat=False, synthetic_taught_people=2, **SYN)
    text = "".join(" ".join(_rows(tok, b)) for b in _loader(tok, seq_len=64, bsz=1, **cfg))
    assert all(p.name in text for p in taught)
    assert not any(p.name in text for p in untaught)
    with pytest.raises(ValueError, match="synthetic_taught_people: 5 exceeds"):
        DataConfig(**{**SYN, "synthetic_taught_people": 5}).validate()


def test_qa_set_taught_as_template_facts(tmp_path, tok):
    """data.fact_paraphrases=templates: each QA pair becomes one fact of template statements holding its
    answer; data.max_examples keeps the first N pairs (TriviaQA's 1K facts in studies/triviaqa_1b.toml)."""
    path = tmp_path / "tqa.jsonl"
    rows = [{"question": f"Which city is number {i}?", "answer": [f"City{i}", f"C{i}"]} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(regime="facts", source=str(path), fact_paraphrases="templates", synthetic_paraphrases=3)
    batches = _take(_loader(tok, shuffle_buffer=0, bsz=3, max_examples=2, seq_len=48, **kw), 3)
    first = _rows(tok, batches[0])
    assert len(set(first)) == 3 and all("Which city is number 0?" in r and "City0" in r for r in first)
    assert all("City1" in r for r in _rows(tok, batches[1]))
    assert _rows(tok, batches[2]) == first  # 2 facts per epoch: max_examples cut the other 3
    with pytest.raises(ValueError, match="data.fact_paraphrases"):
        DataConfig(fact_paraphrases="model").validate()


@pytest.mark.parametrize("shuffle", [1000, 0])
def test_taught_fact_order_is_the_order_the_facts_loader_teaches(tok, shuffle):
    """taught_fact_order(cfg): epoch 0's fact ids as the facts regime yields them (one fact per step);
    a shuffling config draws a new order each epoch, an unshuffled one repeats the source order. The ids
    are those of synthetic_qa's new_taught items."""
    kw = dict(regime="facts", shuffle_buffer=shuffle, synthetic_taught_people=3, **SYN)
    cfg = DataConfig(**kw)
    order = taught_fact_order(cfg)
    facts = get_world(0, 20, 4).facts("new_taught", 8, taught=3)
    by_text = {"<|endoftext|>" + f.paraphrases[0]: f.fact_id for f in facts}
    taught = [by_text[_rows(tok, b)[0]] for b in _take(_loader(tok, seq_len=48, bsz=1, **kw), 2 * len(facts))]
    assert len(order) == len(facts) == 18 and taught[:18] == order
    source = [f.fact_id for f in facts]
    if shuffle:
        assert order != source and sorted(order) == sorted(source)
        assert taught[18:] != order and sorted(taught[18:]) == sorted(order)  # epoch 1 reshuffles
        reseeded = taught_fact_order(DataConfig(**{**kw, "seed": 1, "synthetic_seed": 0}))  # same world
        assert reseeded != order and sorted(reseeded) == sorted(order)
    else:
        assert order == source and taught[18:] == order
    (task,) = [
        t for t in build_tasks(["synthetic_qa"], TaskContext(data=cfg)) if t.name.endswith("/new_taught")
    ]
    assert sorted(e.id for e in task.examples) == sorted(order)


def test_a_held_out_population_streams_only_its_people(tok):
    """data.synthetic_population=known_val (the study's `background = heldout` counts): the facts stream
    reads the validation half of the known people and none of the test half or the new people."""
    world = get_world(0, 20, 4)
    val, test = world.people("known_val"), world.people("known_test")
    cfg = dict(regime="facts", shuffle_buffer=0, repeat=False, synthetic_population="known_val", **SYN)
    DataConfig(**cfg).validate()
    text = "".join(" ".join(_rows(tok, b)) for b in _loader(tok, seq_len=64, bsz=1, **cfg))
    assert all(p.name in text for p in val)
    assert not any(p.name in text for p in test + world.people("new"))
    with pytest.raises(ValueError, match="population: expected one of auto, known,.*; got 'vip'"):
        DataConfig(**{**SYN, "synthetic_population": "vip"}).validate()
