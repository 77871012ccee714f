"""Greedy generation: KV cache == full recompute, batch == alone, left padding/RoPE positions, stop rules."""

from __future__ import annotations

import pytest
import torch

from titan_mem.eval.greedy import greedy_generate
from titan_mem.models.args import MemoryArgs, ModelArgs
from titan_mem.models.kv_cache import KVCache
from titan_mem.models.memory import QueryBatchNorm
from titan_mem.models.transformer import Transformer, apply_rope

VOCAB, PAD = 128, 0
LENGTHS = (5, 11, 2)  # three prompts of different lengths: two rows are left-padded
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def _model(query_norm: str = "rms", seed: int = 0) -> Transformer:
    """Tiny model with GQA (4 query heads, 2 kv heads) and a memory layer of 16**2 slots at block 1."""
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden_dim=128,
        vocab_size=VOCAB,
        max_seq_len=64,
        memory=MemoryArgs(layers=[1], n_keys=16, heads=2, topk=4, k_dim=16, v_dim=64, query_norm=query_norm),
    )
    args.validate()
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    return model.eval()


def _prompts(lengths=LENGTHS, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: one thread is as fast, and immune to a second thread stalling on a shared, busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _model()


def _gen(model, prompts, n=14, **kw):
    return greedy_generate(model, prompts, max_new_tokens=n, pad_id=PAD, eos_id=kw.pop("eos_id", None), **kw)


def test_cached_equals_uncached_and_batch_equals_alone(model):
    prompts = _prompts()
    cached = _gen(model, prompts)
    assert [len(o) for o in cached] == [14, 14, 14]
    assert len({tuple(o) for o in cached}) == 3  # the rows really continue different prompts
    assert _gen(model, prompts, use_cache=False) == cached
    assert [_gen(model, [p])[0] for p in prompts] == cached
    assert [_gen(model, [p], use_cache=False)[0] for p in prompts] == cached


def test_incremental_logits_match_plain_forward_of_each_row(model):
    """Left-padded prefill + one-token cached steps == the training path on each unpadded row alone."""
    prompts = _prompts()
    width = max(LENGTHS)
    tokens = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    pad = torch.tensor([[True] * (width - len(p)) + [False] * len(p) for p in prompts])
    cache = KVCache.for_model(model.args, 3, width + 6, device=None)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        logits = model(tokens, cache=cache, pad_mask=pad)
        for i, p in enumerate(prompts):  # every real prompt position, not just the last
            torch.testing.assert_close(logits[i, width - len(p) :], model(torch.tensor([p]))[0], **TIGHT)
        for _ in range(6):
            nxt = logits[:, -1].argmax(-1)
            for i, s in enumerate(seqs):
                s.append(int(nxt[i]))
            logits = model(nxt[:, None], cache=cache)
            assert logits.shape == (3, 1, VOCAB)
            for i, s in enumerate(seqs):
                torch.testing.assert_close(logits[i, -1], model(torch.tensor([s]))[0, -1], **TIGHT)
        assert cache.length == width + 6 and cache.seen.tolist() == [n + 6 for n in LENGTHS]
        # The padding handling matters: the same padded batch through the plain causal path differs.
        plain = model(tokens)[:, -1]
        full = model(tokens, pad_mask=pad)[:, -1]
        assert not torch.allclose(plain[0], full[0], atol=1e-3)
        torch.testing.assert_close(plain[1], full[1], **TIGHT)  # the longest row has no padding


def test_apply_rope_per_row_positions_equal_shared_table():
    rope = Transformer(_model().args).rope
    x = torch.randn(3, 7, 2, 16)
    shared = apply_rope(x, rope[:7])
    assert torch.equal(apply_rope(x, rope[torch.arange(7).expand(3, 7)]), shared)
    shifted = apply_rope(x, rope[torch.arange(7).expand(3, 7) + torch.tensor([[0], [2], [5]])])
    assert torch.equal(shifted[0], shared[0]) and not torch.allclose(shifted[1], shared[1])
    torch.testing.assert_close(shifted[2], apply_rope(x[2:], rope[5:12])[0])


def test_eos_should_stop_and_max_new_tokens(model):
    prompts = _prompts()
    ref = _gen(model, prompts, n=12)
    eos = ref[0][4]  # row 0 emits it as its 5th token
    expect = [r[: r.index(eos)] if eos in r else r for r in ref]
    assert len(expect[0]) <= 4
    assert _gen(model, prompts, n=12, eos_id=eos) == expect
    assert _gen(model, prompts, n=12, eos_id=eos, use_cache=False) == expect

    calls = []

    def stop(row: int, new: list[int]) -> bool:
        calls.append((row, len(new)))
        return row == 1 and len(new) == 3 or row == 2 and new[-1] == ref[2][6]

    got = _gen(model, prompts, n=12, should_stop=stop)
    row2_stop = ref[2].index(ref[2][6]) + 1
    assert got == [ref[0], ref[1][:3], ref[2][:row2_stop]]
    assert (1, 4) not in calls and (2, row2_stop + 1) not in calls  # a stopped row is never asked again
    assert [len(o) for o in _gen(model, prompts, n=5)] == [5, 5, 5]
    assert _gen(model, prompts, n=5) == [r[:5] for r in ref]
    assert _gen(model, prompts, n=0) == [[], [], []]


def test_long_prompt_keeps_its_last_tokens(model):
    long = _prompts((80,), seed=4)[0]  # longer than max_seq_len (64) itself
    n = 10
    tail = long[-(model.args.max_seq_len - n) :]
    got = _gen(model, [long, long[:3]], n=n)
    assert got[0] == _gen(model, [tail], n=n)[0]
    assert got == _gen(model, [long, long[:3]], n=n, use_cache=False)
    with pytest.raises(ValueError, match="no room"):
        _gen(model, [long], n=64)
    with pytest.raises(ValueError, match="empty prompt"):
        _gen(model, [[]], n=3)


def test_query_batchnorm_model_uses_running_stats_and_modes_are_restored():
    model = _model("batchnorm", seed=2)
    bn = next(m for m in model.modules() if isinstance(m, QueryBatchNorm))
    model.train()
    with torch.no_grad():  # a few training forwards move the running statistics away from (0, 1)
        for _ in range(3):
            model(torch.randint(1, VOCAB, (4, 16)))
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    model.layers["0"].eval()  # a mixed state, restored as it was
    prompts = _prompts()
    cached = _gen(model, prompts)
    assert model.training and bn.training and not model.layers["0"].training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2] == 3
    assert not torch.allclose(stats[0], torch.zeros_like(stats[0]), atol=1e-3)
    assert _gen(model, prompts, use_cache=False) == cached
    assert [_gen(model, [p])[0] for p in prompts] == cached  # batch statistics would mix rows and pads


def test_kv_cache_refuses_overflow_and_wrong_batch(model):
    cache = KVCache.for_model(model.args, 2, 8)
    with torch.no_grad():
        model(torch.ones(2, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            model(torch.ones(2, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            model(torch.ones(3, 1, dtype=torch.long), cache=cache)
    assert cache.keys[0].shape == (2, 2, 8, 16)  # [B, H_kv, max_len, head_dim]
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache.for_model(model.args, 1, 65)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_cpu_rope_is_the_real_arithmetic_rotation(dtype):
    """Eager CPU rotates by one complex multiply; compiled and GPU code by the real arithmetic inductor fuses:
    the same products and sums (equal bit for bit on B's AVX2), values and gradients, shared and per-row
    tables."""
    from titan_mem.models.transformer import _rope_complex, _rope_real

    torch.manual_seed(0)
    table = torch.polar(torch.ones(11, 8), torch.rand(11, 8) * 50)
    for cache in (table, table[torch.randint(0, 11, (3, 11))]):
        x = (torch.randn(3, 11, 4, 16) * 3).to(dtype).requires_grad_(True)
        up = torch.randn(3, 11, 4, 16)
        got, want = _rope_complex(x, cache), _rope_real(x, cache)
        torch.testing.assert_close(got, want)
        (g_got,) = torch.autograd.grad((got.float() * up).sum(), x)
        (g_want,) = torch.autograd.grad((want.float() * up).sum(), x)
        torch.testing.assert_close(g_got, g_want)
