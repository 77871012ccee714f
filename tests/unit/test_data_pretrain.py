import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from titan_mem.data import DataConfig, TokenizerConfig, build_dataloader, build_tokenizer
from titan_mem.data.streams import merge_positions

DOCS = [f"Doc {i} says " + "la " * (i % 11) + f"and ends {i}." for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(name="debug"))


@pytest.fixture
def corpus(tmp_path):
    for f in range(3):
        (tmp_path / f"part{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[f::3]))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "all.parquet", row_group_size=5)
    return tmp_path


def _same(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(a[k], b[k]) for a, b in zip(xs, ys) for k in a)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _resume_matches(cfg, tok, *, rank, world, n_before, n_after, seq_len=12, bsz=3, gbs=None):
    kw = dict(seq_len=seq_len, micro_batch_size=bsz, dp_rank=rank, dp_world_size=world, global_batch_size=gbs)
    loader = build_dataloader(cfg, tok, **kw)
    it = iter(loader)
    _take(it, n_before)
    state = pickle.loads(pickle.dumps(loader.state_dict()))  # what a checkpoint stores
    expected = _take(it, n_after)
    resumed = build_dataloader(cfg, tok, **kw)
    resumed.load_state_dict(state)
    return _same(_take(iter(resumed), n_after), expected)


def test_batch_layout(tok):
    loader = build_dataloader(
        DataConfig(synthetic_known_people=30, synthetic_new_people=5, streams=1), tok, seq_len=32,
        micro_batch_size=4, dp_rank=0, dp_world_size=1,
    )  # fmt: skip
    b = next(iter(loader))
    assert set(b) == {"input_ids", "labels", "token_mask"}
    assert b["input_ids"].shape == b["labels"].shape == b["token_mask"].shape == (4, 32)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long and b["token_mask"].dtype == torch.bool
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])  # targets are the next tokens
    assert bool(b["token_mask"].all()) and int((b["labels"] == -100).sum()) == 0
    # consecutive windows of one stream continue it: a row's last target is the next row's first input
    assert torch.equal(b["labels"][:-1, -1], b["input_ids"][1:, 0])


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("source", ["jsonl", "parquet", "synthetic"])
def test_resume_reproduces_next_batches(corpus, tok, world, source):
    cfg = {
        "jsonl": DataConfig(source=str(corpus / "*.jsonl"), shuffle_buffer=7),
        "parquet": DataConfig(source=str(corpus / "all.parquet"), shuffle_buffer=7),
        "synthetic": DataConfig(synthetic_known_people=40, synthetic_new_people=5, shuffle_buffer=16),
    }[source]
    # resume points: before any batch, mid-block, mid-epoch and late (the corpus is ~700 tokens/epoch)
    for rank in range(world):
        for n_before in (0, 5, 23):
            assert _resume_matches(cfg, tok, rank=rank, world=world, n_before=n_before, n_after=12), (
                rank,
                n_before,
            )


def test_resume_with_dataloader_workers(corpus, tok):
    """Rank 1 of 2 owns 4 of 8 streams, two per worker; the loader reorders the workers' chunks."""
    cfg = DataConfig(source=str(corpus / "*.jsonl"), shuffle_buffer=5, num_workers=2)
    kw = dict(seq_len=12, micro_batch_size=2, dp_rank=1, dp_world_size=2, global_batch_size=16)
    with_workers = build_dataloader(cfg, tok, **kw)
    assert with_workers.num_workers == 2
    no_workers = DataConfig(source=str(corpus / "*.jsonl"), shuffle_buffer=5, num_workers=0)
    in_process = build_dataloader(no_workers, tok, **kw)
    assert _same(_take(iter(with_workers), 12), _take(iter(in_process), 12))  # workers change speed only
    for n_before in (7, 8):  # mid-step (4 micro-batches per step) and at a step boundary
        assert _resume_matches(cfg, tok, rank=1, world=2, n_before=n_before, n_after=8, bsz=2, gbs=16)


def test_same_config_same_batches_different_seed_differs(corpus, tok):
    cfg = DataConfig(source=str(corpus), shuffle_buffer=8, seed=1)
    kw = dict(seq_len=16, micro_batch_size=2, dp_rank=0, dp_world_size=1)
    a = _take(iter(build_dataloader(cfg, tok, **kw)), 20)
    assert _same(a, _take(iter(build_dataloader(cfg, tok, **kw)), 20))
    cfg.seed = 2
    assert not _same(a, _take(iter(build_dataloader(cfg, tok, **kw)), 20))


def test_two_ranks_see_disjoint_documents(corpus, tok):
    cfg = DataConfig(source=str(corpus / "*.jsonl"), shuffle_buffer=0, repeat=False)
    seen = []
    for rank in range(2):
        loader = build_dataloader(cfg, tok, seq_len=8, micro_batch_size=1, dp_rank=rank, dp_world_size=2)
        text = tok.decode(torch.cat([b["input_ids"][0] for b in loader]).tolist())
        seen.append({int(p.split(" ")[0]) for p in text.split("Doc ")[1:] if p.split(" ")[0].isdigit()})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= len(DOCS) - 4  # all but the dropped partial window at each rank's end


def test_repeat_false_ends_and_repeat_true_continues(corpus, tok):
    kw = dict(seq_len=16, micro_batch_size=2, dp_rank=0, dp_world_size=1)
    one_stream = DataConfig(source=str(corpus / "all.parquet"), repeat=False, streams=1)
    finite = list(build_dataloader(one_stream, tok, **kw))
    total = sum(len(tok.encode(d)) + 1 for d in DOCS)
    assert len(finite) == (total - 1) // 16 // 2
    loader = build_dataloader(DataConfig(source=str(corpus / "all.parquet")), tok, **kw)
    it = iter(loader)
    _take(it, 3 * len(finite))
    assert all(s["epoch"] >= 2 for s in loader.state_dict()["streams"].values())


def _global_batches(cfg, tok, world, steps, gbs, state=None, bsz=2):
    """Per step, the global batch's windows in rank order, and each rank's state after `steps`."""
    loaders = [
        build_dataloader(cfg, tok, seq_len=8, micro_batch_size=bsz, dp_rank=r, dp_world_size=world,
                         global_batch_size=gbs)
        for r in range(world)
    ]  # fmt: skip
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    its = [iter(loader) for loader in loaders]
    per_rank = gbs // world // bsz
    out = [torch.cat([b["input_ids"] for it in its for b in _take(it, per_rank)]) for _ in range(steps)]
    return out, [loader.state_dict() for loader in loaders]


def _same_tensors(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(a, b) for a, b in zip(xs, ys))


@pytest.mark.parametrize("source", ["jsonl", "synthetic"])
def test_global_batch_and_resize_do_not_depend_on_rank_count(corpus, tok, source):
    """Every step reads the same windows on 1, 2 or 4 ranks; a position saved on 2 ranks continues on 1
    and then on 4 exactly where a straight run is: nothing seen twice, nothing skipped."""
    cfg = {
        "jsonl": DataConfig(source=str(corpus / "*.jsonl"), shuffle_buffer=5),
        "synthetic": DataConfig(synthetic_known_people=20, synthetic_new_people=2, shuffle_buffer=8),
    }[source]
    straight, _ = _global_batches(cfg, tok, 1, 9, gbs=8)
    for world in (2, 4):
        assert _same_tensors(_global_batches(cfg, tok, world, 9, gbs=8)[0], straight)
    first, states = _global_batches(cfg, tok, 2, 3, gbs=8)
    second, states = _global_batches(cfg, tok, 1, 3, gbs=8, state=merge_positions(states))
    third, _ = _global_batches(cfg, tok, 4, 3, gbs=8, state=merge_positions(states))
    assert _same_tensors(first + second + third, straight)


def test_refuses_state_from_other_streams_seed_or_a_rank_missing(corpus, tok):
    cfg = DataConfig(source=str(corpus / "*.jsonl"))
    kw = dict(seq_len=8, micro_batch_size=1, global_batch_size=4)
    two = build_dataloader(cfg, tok, dp_rank=0, dp_world_size=2, **kw)
    it = iter(two)
    _take(it, 2)  # the rank's whole step: a position at a step boundary
    state = two.state_dict()
    one = build_dataloader(cfg, tok, dp_rank=0, dp_world_size=1, **kw)
    with pytest.raises(ValueError, match=r"no position for streams \[2, 3\]"):
        one.load_state_dict(state)  # rank 1's streams are in rank 1's state: merge_positions first
    other = build_dataloader(
        DataConfig(source=str(corpus / "*.jsonl"), streams=2), tok, dp_rank=0, dp_world_size=2, **kw
    )
    with pytest.raises(ValueError, match="data.streams=4 but this run has data.streams=2"):
        other.load_state_dict(state)
    other_seed = build_dataloader(
        DataConfig(source=str(corpus / "*.jsonl"), seed=5), tok, dp_rank=0, dp_world_size=2, **kw
    )
    with pytest.raises(ValueError, match="data.seed=0"):
        other_seed.load_state_dict(state)
    mid_step = build_dataloader(cfg, tok, dp_rank=0, dp_world_size=2, **kw)
    next(iter(mid_step))
    with pytest.raises(ValueError, match="middle of an optimizer step"):
        merge_positions([mid_step.state_dict(), state])


def test_pretrain_resume_with_other_batch_shape_continues_the_token_stream(corpus, tok):
    cfg = DataConfig(source=str(corpus / "*.jsonl"), shuffle_buffer=7, streams=1)
    kw = dict(seq_len=12, dp_rank=0, dp_world_size=1)
    loader = build_dataloader(cfg, tok, micro_batch_size=3, **kw)
    it = iter(loader)
    _take(it, 4)
    state = loader.state_dict()
    expected = torch.cat([b["input_ids"] for b in _take(it, 4)])  # 12 windows
    smaller = build_dataloader(cfg, tok, micro_batch_size=2, **kw)
    smaller.load_state_dict(state)
    got = torch.cat([b["input_ids"] for b in _take(iter(smaller), 6)])
    assert torch.equal(got, expected)


def test_iterating_does_not_touch_global_torch_rng(tok):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loader = build_dataloader(
        DataConfig(synthetic_known_people=10, synthetic_new_people=2), tok, seq_len=8, micro_batch_size=1,
        dp_rank=0, dp_world_size=1,
    )  # fmt: skip
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected)
