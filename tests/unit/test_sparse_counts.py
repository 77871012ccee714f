"""Slot access counting (padding excluded), distributed merging, and the background-counts file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

from titan_mem.config import parse_args
from titan_mem.distributed import exit_process
from titan_mem.errors import CheckpointError, ConfigError
from titan_mem.sparse.counts import (
    BackgroundCounts,
    SlotCounter,
    check_counts_batch_shape,
    count_slots,
    load_background_counts,
    merge_counts,
    save_background_counts,
)

N_SLOTS = 64


def test_count_slots_by_hand_padding_never_counts():
    # B=1, T=3, H=2, k=2; the last position is padding and reads slot 63, which must not appear.
    indices = torch.tensor([[[[1, 5], [5, 9]], [[9, 9], [2, 1]], [[63, 63], [63, 1]]]])
    mask = torch.tensor([[True, True, False]])
    touched, counts = count_slots(indices, mask, N_SLOTS)
    assert touched.tolist() == [1, 2, 5, 9]
    assert counts.tolist() == [2, 1, 2, 3]
    assert counts.dtype == torch.int64
    touched, counts = count_slots(indices, torch.zeros(1, 3, dtype=torch.bool), N_SLOTS)
    assert touched.numel() == 0 and counts.numel() == 0


def test_count_slots_rejects_bad_inputs():
    idx = torch.zeros(2, 3, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="token_mask"):
        count_slots(idx, torch.ones(2, 4, dtype=torch.bool), N_SLOTS)
    with pytest.raises(ValueError, match="token_mask"):
        count_slots(idx, torch.ones(2, 3, dtype=torch.int64), N_SLOTS)
    with pytest.raises(ValueError, match="indices"):
        count_slots(idx[0], torch.ones(2, 3, dtype=torch.bool), N_SLOTS)
    idx[1, 2, 0, 0] = N_SLOTS
    with pytest.raises(ValueError, match="outside"):
        count_slots(idx, torch.ones(2, 3, dtype=torch.bool), N_SLOTS)
    # an out-of-range id at a padding position does not matter
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert count_slots(idx, mask, N_SLOTS)[1].sum().item() == 5 * 4


def _batch(seed: int, b: int = 3, t: int = 7, h: int = 2, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, N_SLOTS, (b, t, h, k), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    return indices, mask


def test_micro_batches_sum_to_their_concatenation():
    (i1, m1), (i2, m2) = _batch(1), _batch(2, b=2)
    counter = SlotCounter({"mem": N_SLOTS})
    counter.add_indices("mem", i1, m1)
    counter.add("mem", *count_slots(i2, m2, N_SLOTS))
    touched, counts = counter.local("mem")
    want_t, want_c = count_slots(torch.cat([i1, i2]), torch.cat([m1, m2]), N_SLOTS)
    assert torch.equal(touched, want_t) and torch.equal(counts, want_c)
    assert counts.sum().item() == int(torch.cat([m1, m2]).sum()) * 2 * 4
    # without torch.distributed, global counts are the local ones
    assert not dist.is_initialized()
    g_t, g_c = counter.global_counts()["mem"]
    assert torch.equal(g_t, want_t) and torch.equal(g_c, want_c)
    counter.reset()
    assert counter.local("mem")[0].numel() == 0
    with pytest.raises(ValueError, match="unknown memory layer"):
        counter.add_indices("nope", i1, m1)


def test_add_slots_counts_every_layer_of_a_forward():
    counter = SlotCounter({"layers.1.feed_forward": N_SLOTS, "layers.3.feed_forward": N_SLOTS})
    (a, mask), (b, _) = _batch(3), _batch(4)
    with pytest.raises(ValueError, match=r"no slots for memory layer\(s\) \['layers.3.feed_forward'\]"):
        counter.add_slots({"layers.1.feed_forward": a}, mask)
    counter.add_slots({"layers.1.feed_forward": a, "layers.3.feed_forward": b}, mask)
    assert torch.equal(counter.local("layers.1.feed_forward")[1], count_slots(a, mask, N_SLOTS)[1])
    assert torch.equal(counter.local("layers.3.feed_forward")[1], count_slots(b, mask, N_SLOTS)[1])


def test_merge_counts():
    a = (torch.tensor([1, 4]), torch.tensor([2, 1]))
    t, c = merge_counts(a, (torch.tensor([0, 4]), torch.tensor([5, 3])))
    assert t.tolist() == [0, 1, 4] and c.tolist() == [5, 2, 4]


def _filled_background(path_ckpt: str = "ckpt/step-100") -> BackgroundCounts:
    bg = BackgroundCounts.empty(
        {"layers.2.feed_forward": N_SLOTS, "layers.4.feed_forward": 32},
        checkpoint=path_ckpt,
        checkpoint_step=100,
        data_source="synthetic:unit",
        batch_size=3,
        seq_len=7,
    )
    for seed in range(4):
        for name, n in (("layers.2.feed_forward", N_SLOTS), ("layers.4.feed_forward", 32)):
            indices, mask = _batch(seed)
            bg.add_batch(name, *count_slots(indices % n, mask, n))
    return bg


def test_background_add_batch():
    bg = BackgroundCounts.empty({"m": 10})
    bg.add_batch("m", torch.tensor([1, 3]), torch.tensor([4, 1]))
    bg.add_batch("m", torch.tensor([3, 9]), torch.tensor([2, 2]))
    assert bg.df["m"].tolist() == [0, 1, 0, 2, 0, 0, 0, 0, 0, 1]
    assert bg.total["m"].tolist() == [0, 4, 0, 3, 0, 0, 0, 0, 0, 2]
    assert bg.n_batches == 2 and bg.metadata["n_batches"] == 2
    view = bg.layer("m")
    assert view.n_batches == 2 and view.bg_norm == 4 + 10
    assert bg.layer("m") is view  # cached: the df.sum() is not redone every step
    with pytest.raises(ValueError, match="sorted and unique"):
        bg.add_batch("m", torch.tensor([3, 3]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="unknown layer"):
        bg.add_batch("x", torch.tensor([3]), torch.tensor([1]))


def test_save_load_round_trip(tmp_path):
    bg = _filled_background(str(tmp_path / "ckpt"))
    path = tmp_path / "out" / "background_counts.safetensors"
    save_background_counts(path, bg)
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    back = load_background_counts(
        path, {"layers.2.feed_forward": N_SLOTS, "layers.4.feed_forward": 32}, str(tmp_path / "ckpt")
    )
    assert back.layers == bg.layers
    for n in bg.layers:
        assert back.df[n].dtype == torch.int64 and torch.equal(back.df[n], bg.df[n])
        assert torch.equal(back.total[n], bg.total[n])
    assert back.metadata == bg.metadata
    assert back.metadata["n_batches"] == 4 and back.n_batches == 4
    assert back.metadata["n_slots"] == {"layers.2.feed_forward": N_SLOTS, "layers.4.feed_forward": 32}
    for key in (
        "checkpoint",
        "checkpoint_step",
        "data_source",
        "batch_size",
        "seq_len",
        "tokens_per_batch",
        "layers",
        "created",
        "titan_mem_version",
    ):
        assert key in back.metadata
    assert back.layer("layers.2.feed_forward").n_batches == 4


def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "bg.safetensors"
    save_background_counts(path, _filled_background())
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(CheckpointError, match=f"{path}: writing background counts failed: OSError: disk"):
        save_background_counts(path, BackgroundCounts.empty({"m": 4}))
    assert path.read_bytes() == before
    assert not path.with_name(path.name + ".tmp").exists()


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_load_errors_name_file_and_mismatch(tmp_path, monkeypatch):
    path = tmp_path / "bg.safetensors"
    save_background_counts(path, _filled_background(str(tmp_path / "a" / "ckpt")))
    layers = {"layers.2.feed_forward": N_SLOTS}

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError) as e:
        load_background_counts(missing)
    assert "not found" in _one_line(e, missing)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all\n" * 3)
    with pytest.raises(ValueError) as e:
        load_background_counts(garbage)
    assert "safetensors" in _one_line(e, garbage)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError) as e:
        load_background_counts(truncated)
    assert "safetensors" in _one_line(e, truncated)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError) as e:
        load_background_counts(foreign)
    assert "not a titan_mem background counts file" in _one_line(e, foreign)

    with pytest.raises(ValueError) as e:
        load_background_counts(path, {**layers, "layers.6.feed_forward": N_SLOTS})
    assert "'layers.6.feed_forward' missing" in _one_line(e, path)

    with pytest.raises(ValueError) as e:
        load_background_counts(path, {"layers.2.feed_forward": 2 * N_SLOTS})
    assert f"has {N_SLOTS} slots, the model has {2 * N_SLOTS}" in _one_line(e, path)

    with pytest.raises(ValueError) as e:
        load_background_counts(path, layers, str(tmp_path / "b" / "ckpt"))
    assert "checkpoint" in _one_line(e, path)

    # tampered values: a negative df (NaN scores), df above N, a non-integer or missing n_batches
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    df_key = "layers.2.feed_forward.df"
    for name, change, needle in [
        ("negative", {df_key: tensors[df_key] - 5}, "negative counts"),
        ("too_many", {df_key: tensors[df_key] + 10**6}, "more than n_batches"),
        ("float_df", {df_key: tensors[df_key].double()}, "1-D integer tensor"),
        ("n_batches_float", {"n_batches": "2.5"}, "n_batches must be a whole number >= 0, got 2.5"),
        ("n_batches_text", {"n_batches": '"many"'}, "n_batches must be a whole number >= 0, got 'many'"),
    ]:
        bad = tmp_path / f"{name}.safetensors"
        meta = {**header, **{k: v for k, v in change.items() if isinstance(v, str)}}
        save_file({**tensors, **{k: v for k, v in change.items() if not isinstance(v, str)}}, str(bad), meta)
        with pytest.raises(ValueError) as e:
            load_background_counts(bad)
        assert needle in _one_line(e, bad), name

    # the same checkpoint spelled differently resolves equal; None skips the check
    monkeypatch.chdir(tmp_path)
    load_background_counts(path, layers, "b/../a/./ckpt")
    load_background_counts(path, layers, None)


def _rank_data(rank: int):
    # rank 1 sees a different number of tokens and touches fewer slots, so K differs across ranks
    indices, mask = _batch(10 + rank, b=3 - rank)
    extra = _batch(20 + rank, b=1)
    return [(indices, mask), extra]


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        counter = SlotCounter({"a": N_SLOTS, "b": 1 << 20})
        for indices, mask in _rank_data(rank):
            counter.add_indices("a", indices, mask)
            counter.add_indices("b", indices * 997, mask)
        # "auto" picks dense for the 64-slot layer "a" and gather for the 1M-slot layer "b"
        result = {m: counter.global_counts(method=m) for m in ("gather", "dense", "auto")}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_process(0)  # success: skip interpreter teardown, which can abort after gloo use (see exit_process)


def test_distributed_global_counts_equal_single_process(tmp_path):
    # spawn, not fork: a forked child can hang in OpenMP if the parent already ran parallel ops
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = SlotCounter({"a": N_SLOTS, "b": 1 << 20})
    for rank in range(2):
        for indices, mask in _rank_data(rank):
            single.add_indices("a", indices, mask)
            single.add_indices("b", indices * 997, mask)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for method, per_layer in got.items():
            for name in ("a", "b"):
                touched, counts = per_layer[name]
                want_t, want_c = single.local(name)
                assert torch.equal(touched, want_t), (rank, method, name)
                assert torch.equal(counts, want_c), (rank, method, name)


def _shaped(path: Path, batch_size: int, seq_len: int, drop_shape: bool = False) -> Path:
    bg = _filled_background()
    bg.metadata.update(batch_size=batch_size, seq_len=seq_len, tokens_per_batch=float(batch_size * seq_len))
    if drop_shape:  # a file written before the shape was recorded
        for key in ("batch_size", "seq_len", "tokens_per_batch"):
            del bg.metadata[key]
    save_background_counts(path, bg)
    return path


def test_shape_metadata_round_trip(tmp_path):
    bg = BackgroundCounts.empty({"m": 4}, batch_size=16, seq_len=64, tokens_per_batch=1000.5)
    save_background_counts(tmp_path / "bg.safetensors", bg)
    meta = load_background_counts(tmp_path / "bg.safetensors").metadata
    assert (meta["batch_size"], meta["seq_len"], meta["tokens_per_batch"]) == (16, 64, 1000.5)


def test_counts_batch_shape_check(tmp_path):
    path = _shaped(tmp_path / "bg.safetensors", 512, 2048)
    meta = load_background_counts(path).metadata
    with pytest.raises(ValueError) as e:
        check_counts_batch_shape(path, meta, 16, 64, 2.0)
    msg = _one_line(e, path)
    assert "counted over 512 x 2048-token batches, but this finetune's batches are 16 x 64" in msg
    assert "ratio of tokens per batch 1024.0 > tolerance 2.0" in msg
    assert "--finetune-config" in msg and "finetune.counts_shape_tolerance=0" in msg
    check_counts_batch_shape(path, meta, 16, 64, 0)  # 0: any shape (ablations)
    check_counts_batch_shape(path, meta, 16, 64, 1024)
    # the ratio is symmetric and compares tokens per batch, not the two factors
    for batch_size, seq_len, ok in ((1024, 1024, True), (256, 8192, True), (2048, 2048, False)):
        if ok:
            check_counts_batch_shape(path, meta, batch_size, seq_len, 2.0)
        else:
            with pytest.raises(ValueError, match="ratio of tokens per batch 4.0 > tolerance 2.0"):
                check_counts_batch_shape(path, meta, batch_size, seq_len, 2.0)
    small = _shaped(tmp_path / "small.safetensors", 8, 64)
    with pytest.raises(ValueError, match="counted over 8 x 64-token batches.* 16 x 128 .*ratio .* 4.0"):
        load_background_counts(small, expect_batch=(16, 128), shape_tolerance=2.0)
    assert load_background_counts(small, expect_batch=(16, 64), shape_tolerance=2.0).n_batches == 4
    load_background_counts(small, expect_batch=(16, 128), shape_tolerance=4.0)
    load_background_counts(small, expect_batch=None, shape_tolerance=2.0)  # None skips the check


def test_counts_without_batch_shape_are_refused(tmp_path):
    old = _shaped(tmp_path / "old.safetensors", 16, 64, drop_shape=True)
    with pytest.raises(ValueError) as e:
        load_background_counts(old, expect_batch=(16, 64), shape_tolerance=2.0)
    assert "recorded no batch shape; recount with tools/background_counts.py" in _one_line(e, old)
    assert load_background_counts(old, expect_batch=(16, 64), shape_tolerance=0).n_batches == 4
    unset = _shaped(tmp_path / "unset.safetensors", 0, 0)  # BackgroundCounts.empty() without a shape
    with pytest.raises(ValueError, match="recorded no batch shape"):
        load_background_counts(unset, expect_batch=(16, 64), shape_tolerance=1.0)


@pytest.mark.parametrize("value,ok", [("0", True), ("1", True), ("2.5", True), ("0.5", False), ("-1", False)])
def test_counts_shape_tolerance_config(value, ok):
    arg = f"--finetune.counts_shape_tolerance={value}"
    if ok:
        assert parse_args([arg]).finetune.counts_shape_tolerance == float(value)
    else:
        with pytest.raises(ConfigError, match="finetune.counts_shape_tolerance: must be 0 .* or >= 1"):
            parse_args([arg])
    assert parse_args([]).finetune.counts_shape_tolerance >= 1  # refuses by default
