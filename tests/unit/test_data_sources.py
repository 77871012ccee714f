import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from titan_mem.data import DataConfig, TokenizerConfig, build_dataloader, build_tokenizer
from titan_mem.data.documents import BadDoc, assign_files
from titan_mem.data.sources import LocalFileSource, build_source
from titan_mem.data.text import EmptySourceError

DOCS = [
    f"Document {i}: " + " ".join(f"w{i}x{j}" for j in range(i % 7 + 1)) + " — déjà vu." for i in range(40)
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(name="debug"))


def _jsonl(docs, **extra) -> bytes:
    return "".join(json.dumps({"id": i, "text": d, **extra}) + "\n" for i, d in enumerate(docs)).encode()


def _write_all_formats(d, docs):
    (d / "a.jsonl").write_bytes(_jsonl(docs))
    (d / "b.json.gz").write_bytes(gzip.compress(_jsonl(docs)))
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs)))
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), d / "d.parquet", row_group_size=7)
    (d / "e.txt").write_text("\n".join(docs) + "\n")
    (d / "f.json").write_text(json.dumps([{"text": x} for x in docs]))
    txt_dir = d / "txt"
    txt_dir.mkdir()
    for i, x in enumerate(docs):
        (txt_dir / f"doc_{i:03d}.txt").write_text(x)
    return {
        "jsonl": DataConfig(source=str(d / "a.jsonl")),
        "json.gz": DataConfig(source=str(d / "b.json.gz")),
        "jsonl.zst": DataConfig(source=str(d / "c.jsonl.zst")),
        "parquet": DataConfig(source=str(d / "d.parquet")),
        "txt-lines": DataConfig(source=str(d / "e.txt"), text_split="line"),
        "json-array": DataConfig(source=str(d / "f.json")),
    }, txt_dir


def _batches(cfg, tok, n, *, seq_len=16, bsz=2, rank=0, world=1):
    it = iter(
        build_dataloader(cfg, tok, seq_len=seq_len, micro_batch_size=bsz, dp_rank=rank, dp_world_size=world)
    )
    return [next(it) for _ in range(n)]


def _same(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(a[k], b[k]) for a, b in zip(xs, ys) for k in a)


def test_local_formats_give_identical_packed_streams(tmp_path, tok):
    cfgs, txt_dir = _write_all_formats(tmp_path, DOCS)
    for cfg in cfgs.values():
        cfg.shuffle_buffer = 8
    # 25 batches x 32 tokens spans several epochs of the ~450-token corpus: epoch reshuffles included
    ref = _batches(cfgs["jsonl"], tok, 25)
    for name, cfg in cfgs.items():
        assert _same(_batches(cfg, tok, 25), ref), name
    # one document per file (directory, sorted names) = the same documents in order when not shuffling
    one = dict(shuffle_buffer=0, streams=1)
    unshuffled = _batches(DataConfig(source=str(tmp_path / "a.jsonl"), **one), tok, 25)
    assert _same(_batches(DataConfig(source=str(txt_dir), **one), tok, 25), unshuffled)
    assert _same(_batches(DataConfig(source=str(txt_dir / "*.txt"), **one), tok, 25), unshuffled)
    # and the packed stream is the documents joined by EOS
    flat = torch.cat([torch.cat([b["input_ids"][i, :] for i in range(2)]) for b in unshuffled[:3]])
    expected = sum((tok.encode(d, eos=True) for d in DOCS), [])[: len(flat)]
    assert flat.tolist() == expected


def test_hf_datasets_path_on_dclm_shaped_zstd_shards(tmp_path, tok):
    pytest.importorskip("datasets")
    files = []
    for s in range(3):
        docs = DOCS[s * 10 : (s + 1) * 10]
        meta = {"url": "http://example.com", "language_id_whole_page_fasttext": {"en": 0.9}}
        path = tmp_path / f"shard_{s:08d}_processed.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs, **meta)))
        files.append(str(path))
    hf = DataConfig(source="json", source_type="hf", hf_data_files=files, shuffle_buffer=0)
    local = DataConfig(source=str(tmp_path / "*.jsonl.zst"), shuffle_buffer=0)
    ref = _batches(local, tok, 12)
    assert _same(_batches(hf, tok, 12), ref)
    # resume through HF's own iterable state, with 2 ranks, in-process and in DataLoader workers
    hf.shuffle_buffer = 4
    kw = dict(seq_len=16, micro_batch_size=2, dp_rank=1, dp_world_size=2)
    for workers in (0, 2):
        hf.num_workers = workers
        full = build_dataloader(hf, tok, **kw)
        it = iter(full)
        for _ in range(3):
            next(it)
        state = full.state_dict()
        expected = [next(it) for _ in range(6)]  # crosses into the next epoch
        resumed = build_dataloader(hf, tok, **kw)
        resumed.load_state_dict(state)
        it2 = iter(resumed)
        assert _same([next(it2) for _ in range(6)], expected), workers


def _docs_of(source, shard, num_shards):
    return [d for d in source.open(0, shard, num_shards, None)]


@pytest.mark.parametrize("n_files,n_shards", [(3, 2), (4, 2), (7, 3), (3, 8)])
def test_stream_shards_are_disjoint_and_cover_the_stream(tmp_path, n_files, n_shards):
    for f in range(n_files):
        (tmp_path / f"part{f}.jsonl").write_bytes(_jsonl(DOCS[f::n_files]))
    for shuffle in (False, True):
        src = LocalFileSource(str(tmp_path), shuffle_files=shuffle, seed=3)
        shards = [_docs_of(src, s, n_shards) for s in range(n_shards)]
        assert sorted(sum(shards, [])) == sorted(DOCS)  # every document exactly once
        per_file = len(DOCS) / n_files
        assert max(map(len, shards)) - min(map(len, shards)) <= per_file + 1
    # whole files round-robin; a remainder file is shared, and no shard reads more than one it shares
    plans = [assign_files(n_files, s, n_shards) for s in range(n_shards)]
    for plan in plans:
        assert len(plan) <= n_files // n_shards + 1
        assert sum(1 for _, sharers, _ in plan if sharers > 1) <= 1
    assert sorted(i for plan in plans for i, sharers, _ in plan if sharers == 1) == list(
        range(n_files // n_shards * n_shards)
    )


def test_synthetic_stream_shards_are_disjoint_and_cover():
    src = build_source(DataConfig(synthetic_known_people=20, synthetic_new_people=5, synthetic_documents=30))
    both = _docs_of(src, 0, 1)
    r0, r1 = _docs_of(src, 0, 2), _docs_of(src, 1, 2)
    assert r0 == both[0::2] and r1 == both[1::2]


def test_bad_documents_are_counted_and_skipped(tmp_path, tok, caplog):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        json.dumps({"other": "no text field"}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad utf8 \xff\xfe here"}',
        b'{"text": "lone surrogate \\ud800"}',
        b'{"text": "truncated json',
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": None}).encode(),
        b"",
        json.dumps({"text": "good two"}).encode(),
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = DataConfig(
        source=str(tmp_path / "mixed.jsonl"), shuffle_buffer=0, repeat=False, streams=1, num_workers=0
    )
    loader = build_dataloader(cfg, tok, seq_len=4, micro_batch_size=1, dp_rank=0, dp_world_size=1)
    with caplog.at_level(logging.WARNING, logger="titan_mem.data"):
        batches = list(loader)
    text = tok.decode(torch.cat([b["input_ids"][0] for b in batches]).tolist())
    assert "good one<|endoftext|>good" in text
    stats = loader.doc_stats()
    assert stats.good == 2
    assert stats.bad == {"missing_field": 2, "not_text": 1, "empty": 1, "invalid_utf8": 2, "invalid_json": 1}
    assert "skipping bad document" in caplog.text and "mixed.jsonl:4" in caplog.text


def test_bad_parquet_and_text_records(tmp_path):
    pq.write_table(pa.table({"text": ["ok", None, ""]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "q.parquet")
    (tmp_path / "t.txt").write_bytes(b"fine line\n\xff\xfe broken\n\nanother\n")
    src = LocalFileSource(str(tmp_path), text_split="line", shuffle_files=False, seed=0)
    docs = _docs_of(src, 0, 1)
    good = [d for d in docs if isinstance(d, str)]
    reasons = sorted(d.reason for d in docs if isinstance(d, BadDoc))
    assert good == ["ok", "fine line", "another"]
    assert reasons == ["empty", "invalid_utf8", "missing_field", "missing_field", "missing_field"]


def test_plain_text_paragraph_split(tmp_path):
    (tmp_path / "p.txt").write_text("para one\nline two\n\n\npara two\n\npara three\n")
    src = LocalFileSource(str(tmp_path / "p.txt"), text_split="paragraph", shuffle_files=False, seed=0)
    assert _docs_of(src, 0, 1) == ["para one\nline two", "para two", "para three"]
    resumed = src.open(0, 0, 1, {"file": 0, "record": 1, "seen": 0})
    assert list(resumed) == ["para two", "para three"]


def test_empty_source_fails_fast(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"other": 1}\n{"text": ""}\n')
    loader = build_dataloader(
        DataConfig(source=str(tmp_path / "bad.jsonl")),
        tok,
        seq_len=8,
        micro_batch_size=1,
        dp_rank=0,
        dp_world_size=1,
    )
    with pytest.raises(EmptySourceError, match="no usable documents"):
        next(iter(loader))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no data files"):
        build_source(DataConfig(source=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_source(DataConfig(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="no data files"):
        build_source(DataConfig(source=str(tmp_path / "*.parquet")))


def test_one_rank_without_documents_fails_fast(tmp_path, tok):
    (tmp_path / "one.jsonl").write_text('{"text": "only document"}\n')
    cfg = DataConfig(source=str(tmp_path / "one.jsonl"))
    loader = build_dataloader(cfg, tok, seq_len=8, micro_batch_size=1, dp_rank=1, dp_world_size=2)
    with pytest.raises(EmptySourceError, match="stream 1 of 2"):
        next(iter(loader))
