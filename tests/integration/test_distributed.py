"""Multi-rank behaviour over gloo on CPU: FSDP2 equivalence, exact resume (ranks forked from pytest, see
launchers.py), and real torchrun launches: two nodes meeting at one rendezvous."""

import json
import subprocess

import pytest
from conftest import REPO, _env, free_port, losses, run_dist_script, run_tool, run_trainer
from conftest import ok as _ok

from titan_mem.checkpoint import step_dirs


def _equivalence_curves(tiny, tmp_path, steps: int, per_nproc: dict[int, list[str]]) -> dict[int, list[dict]]:
    """Loss and grad-norm curves of fsdp_equivalence.py on each rank count, with that count's extra args."""
    curves = {}
    for nproc, extra in per_nproc.items():
        out = tmp_path / f"curve{nproc}.json"
        args = [
            *tiny,
            f"--job.dump_folder={tmp_path / f'r{nproc}'}",
            f"--training.steps={steps}",
            "--training.global_batch_size=8",
            "--checkpoint.enable=false",
            *extra,
        ]
        _ok(run_dist_script("fsdp_equivalence.py", nproc, [str(out), *args]))
        curves[nproc] = json.loads(out.read_text())
        assert len(curves[nproc]) == steps
    return curves


def _assert_curves_match(one: list[dict], two: list[dict]) -> None:
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (one, two)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), (one, two)


@pytest.mark.parametrize(
    "values,two_rank_values",
    [
        ([], []),  # dense AdamW on a table split over one memory-parallel group of 2
        (
            ["--optimizer.memory_update=lazy", "--parallelism.memory_parallel_degree=1"],
            [],
        ),  # 2 replicas, lazy
        ([], ["--parallelism.data_parallel_replicate_degree=2"]),  # HSDP: 2 replicas of a 1-rank FSDP group
        (["--training.activation_checkpoint=full"], []),  # the recompute reruns the split table's all-to-alls
    ],
    ids=["dense", "lazy_replicas", "hsdp", "ac_memory_parallel"],
)
def test_fsdp_two_ranks_match_one_rank(tiny, tmp_path, values, two_rank_values):
    """Micro-batches differ too (1 rank: 2 x 4 rows, 2 ranks: 2 x 2 rows each), and the batch's loss tokens
    are uneven over both, so a loss normalised per rank or per micro-batch would not match. Lazy value rows
    on 2 replicas: each rank's row-sparse gradient covers other rows, summed once per step. HSDP: the
    gradients are all-reduced across the replicas (summed, like the reduce-scatter)."""
    curves = _equivalence_curves(
        [*tiny, *values],
        tmp_path,
        5,
        {1: ["--training.micro_batch_size=4"], 2: ["--training.micro_batch_size=2", *two_rank_values]},
    )
    one, two = curves[1], curves[2]
    assert one[-1]["loss"] < one[0]["loss"] - 0.3, one  # the fixed batch is being learned
    _assert_curves_match(one, two)


def test_query_batchnorm_two_ranks_match_one_process():
    _ok(run_dist_script("query_batchnorm.py", 2, []))


def test_fsdp_two_ranks_match_one_rank_with_query_batchnorm(tiny, tmp_path):
    """Batch-norm statistics span all ranks. They are per micro-batch, so both runs use one micro-batch
    per step (the whole global batch: 8 rows on 1 rank, 4 per rank on 2); with gradient accumulation the
    1-rank statistics would cover other rows than the 2-rank ones, whatever the synchronisation. Per-rank
    statistics fail this by about 1e-3 in the loss."""
    bn = ["--model.memory_query_norm=batchnorm", "--optimizer.lr=0.03"]  # big steps: statistics matter
    curves = _equivalence_curves(
        tiny,
        tmp_path,
        3,
        {1: [*bn, "--training.micro_batch_size=8"], 2: [*bn, "--training.micro_batch_size=4"]},
    )
    _assert_curves_match(curves[1], curves[2])


@pytest.mark.heavy
def test_resume_is_exact_two_ranks_and_a_resize_continues(tiny, tmp_path):
    """3+3 steps on 2 ranks equal 6 straight, bit for bit. Saved on 2 ranks, resumed on 1, then on 2 again:
    every step reads the same documents as the straight run (data.streams), the optimizer and schedule are
    resharded by DCP, so the losses follow the straight run within 1e-5 (FSDP sums in another order).
    A constant schedule, since each launch's training.steps sets where a decay ends."""
    tiny = [*tiny, "--lr_scheduler.decay_type=constant"]
    straight, split, resized = tmp_path / "straight", tmp_path / "split", tmp_path / "resized"
    _ok(run_trainer([*tiny, f"--job.dump_folder={straight}", "--training.steps=6"], nproc=2))
    _ok(run_trainer([*tiny, f"--job.dump_folder={split}", "--training.steps=3"], nproc=2))
    _ok(run_trainer([*tiny, f"--job.dump_folder={split}", "--training.steps=6"], nproc=2))
    a, b = losses(straight), losses(split)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
    for steps, nproc in ((2, 2), (4, 1), (6, 2)):
        background = ["--checkpoint.async_mode=async", "--checkpoint.interval=1"]  # step 1 on 2 ranks too
        args = [*tiny, f"--job.dump_folder={resized}", f"--training.steps={steps}", *background]
        _ok(run_trainer(args, nproc=nproc))
    c = losses(resized)
    assert sorted(c) == list(range(1, 7))
    assert all(abs(a[s] - c[s]) <= 1e-5 for s in a), (a, c)
    assert len(set(a.values())) == 6  # the batches differ step to step: a check that could fail


def test_two_nodes_rendezvous_and_train_together(tiny, tmp_path):
    """Two `run_train.sh` launches (NNODES=2, NODE_RANK=0|1) meet at one c10d endpoint on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    procs = []
    for node_rank in (0, 1):
        env = _env(
            {
                "NNODES": "2",
                "NODE_RANK": str(node_rank),
                "NGPU": "1",
                "RDZV_ENDPOINT": endpoint,
                "RDZV_ID": f"test{node_rank * 0}",
            }
        )
        procs.append(
            subprocess.Popen(
                [
                    "./run_train.sh",
                    "train_configs/debug_model.toml",
                    *tiny,
                    "--training.steps=3",
                    f"--job.dump_folder={run}",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert "2 rank(s)" in "".join(outs)
    assert sorted(losses(run)) == [1, 2, 3]
    assert sorted(step_dirs(run / "checkpoints")) == [3]


def _local_corpus(path):
    """20 short documents: resume lands mid-epoch and the 8 steps cross an epoch boundary."""
    import random

    rng = random.Random(0)
    words = "river stone market garden teacher window silver morning harbor letter winter copper".split()
    with path.open("w") as f:
        for i in range(20):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            f.write(json.dumps({"text": f"Document {i}. {text}."}) + "\n")
    return path


def test_resume_mid_epoch_on_local_files_is_exact_1_and_2_ranks(tiny, tmp_path):
    corpus = _local_corpus(tmp_path / "corpus.jsonl")
    data = [f"--data.source={corpus}", "--data.shuffle_buffer=16", "--lr_scheduler.decay_type=constant"]
    for nproc in (1, 2):
        straight, split = tmp_path / f"straight{nproc}", tmp_path / f"split{nproc}"
        args = [*tiny, *data]
        _ok(
            run_trainer(
                [*args, f"--job.dump_folder={straight}", "--training.steps=8", "--checkpoint.interval=100"],
                nproc=nproc,
            )
        )
        _ok(run_trainer([*args, f"--job.dump_folder={split}", "--training.steps=5"], nproc=nproc))
        _ok(run_trainer([*args, f"--job.dump_folder={split}", "--training.steps=8"], nproc=nproc))
        a, b = losses(straight), losses(split)
        assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)], nproc


def test_bf16_mixed_precision_on_two_ranks_tracks_fp32(tiny, tmp_path):
    """FSDP2 bf16 parameters (fp32 reduce and master weights) over gloo: the losses stay within 0.01 nats
    of the fp32 run over 8 steps (measured: 0.002 at most over 10), and differ from it, so bf16 ran."""
    curves = {}
    for name, extra in (("fp32", []), ("bf16", ["--training.cpu_mixed_precision=true"])):
        args = [
            *tiny,
            f"--job.dump_folder={tmp_path / name}",
            "--training.steps=8",
            "--checkpoint.enable=false",
        ]
        _ok(run_trainer([*args, "--lr_scheduler.decay_type=constant", *extra], nproc=2))
        curves[name] = losses(tmp_path / name)
    gaps = [abs(curves["fp32"][s] - curves["bf16"][s]) for s in range(1, 9)]
    assert max(gaps) <= 0.01, curves
    assert max(gaps) > 1e-5, curves  # identical curves would mean the bf16 policy never applied


def test_gradient_sync_on_the_last_micro_batch_only_cuts_reduce_scatter_bytes(tmp_path):
    """tools/bench_comm_volume.py counts every collective of a real 2-rank step with 4 micro-batches:
    syncing only after the last one reduce-scatters 4x fewer bytes, exactly what the parameter count
    predicts, and leaves the parameter all-gathers alone."""
    out = tmp_path / "comm.json"
    _ok(run_tool("bench_comm_volume.py", ["--gpus=8", f"--out={out}"]))
    report = json.loads(out.read_text())
    every, last = (
        report["measured_tiny_2_ranks_gloo"][k] for k in ("sync_every_micro_batch", "sync_last_micro_batch")
    )
    assert every["micro_batches"] == last["micro_batches"] == 4
    rs = [r["bytes"]["_reduce_scatter_base"] for r in (every, last)]
    assert rs[0] == 4 * rs[1] > 0
    assert rs == [every["predicted_reduce_scatter"], last["predicted_reduce_scatter"]]
    assert every["bytes"]["_allgather_base"] == last["bytes"]["_allgather_base"]
    (row,) = report["modelled_pretrain_1b"]
    assert row["sync_every_micro_batch_gib"] > row["sync_last_micro_batch_gib"]


def test_hf_data_files_resolved_once_and_shared_by_two_ranks(tiny, tmp_path):
    """A HF builder source: rank 0 lists the data files and broadcasts them, every stream opens its own
    (2 ranks train on it); a hub name that cannot be reached fails on every rank with rank 0's one line,
    before the model is built."""
    files = []
    for i in range(3):
        path = tmp_path / f"part{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"document {i}.{j} " * 20}) + "\n" for j in range(40)))
        files.append(str(path))
    hf = ["--data.source=json", "--data.source_type=hf", f"--data.hf_data_files={','.join(files)}"]
    _ok(run_trainer([*tiny, *hf, "--training.steps=2"], nproc=2))
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    offline = run_trainer(
        [*tiny, f"--job.dump_folder={tmp_path / 'offline'}", "--data.source=someorg/no-such-dataset"],
        nproc=2,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert offline.returncode != 0
    # both ranks print rank 0's line (counted, not split into lines: two processes' writes can interleave)
    refusal = "error: data.source: cannot open HF dataset hf:someorg/no-such-dataset: ConnectionError"
    assert offline.stderr.count(refusal) == 2, offline.stderr[-2000:]
    assert "model debug:" not in offline.stdout  # refused before the model was built
