"""Multi-rank behaviour with real torchrun + gloo on CPU: FSDP2 equivalence, exact resume, two-node launch."""

import json
import subprocess

import pytest
from conftest import REPO, _env, free_port, launch, losses, run_trainer
from conftest import ok as _ok

from titan_mem.checkpoint import step_dirs


def _torchrun_script(script, nproc, args):
    return launch([str(REPO / "tests" / "dist_scripts" / script), *args], nproc)


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
        _ok(_torchrun_script("fsdp_equivalence.py", nproc, [str(out), *args]))
        curves[nproc] = json.loads(out.read_text())
        assert len(curves[nproc]) == steps
    return curves


def _assert_curves_match(one: list[dict], two: list[dict]) -> None:
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (one, two)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), (one, two)


@pytest.mark.parametrize(
    "values",
    [
        [],  # dense AdamW on a table split over one memory-parallel group of 2
        ["--optimizer.memory_update=lazy", "--parallelism.memory_parallel_degree=1"],  # 2 replicas, lazy
    ],
    ids=["dense", "lazy_replicas"],
)
def test_fsdp_two_ranks_match_one_rank(tiny, tmp_path, values):
    """Micro-batches differ too (1 rank: 2 x 4 rows, 2 ranks: 2 x 2 rows each), and the batch's loss tokens
    are uneven over both, so a loss normalised per rank or per micro-batch would not match. Lazy value rows
    on 2 replicas: each rank's row-sparse gradient covers other rows, summed once per step."""
    curves = _equivalence_curves(
        [*tiny, *values],
        tmp_path,
        5,
        {1: ["--training.micro_batch_size=4"], 2: ["--training.micro_batch_size=2"]},
    )
    one, two = curves[1], curves[2]
    assert one[-1]["loss"] < one[0]["loss"] - 0.3, one  # the fixed batch is being learned
    _assert_curves_match(one, two)


def test_query_batchnorm_two_ranks_match_one_process():
    _ok(_torchrun_script("query_batchnorm.py", 2, []))


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


def test_resume_is_exact_two_ranks(tiny, tmp_path):
    tiny = [*tiny, "--lr_scheduler.decay_type=constant"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _ok(
        run_trainer(
            [*tiny, f"--job.dump_folder={straight}", "--training.steps=6", "--checkpoint.interval=100"],
            nproc=2,
        )
    )
    _ok(run_trainer([*tiny, f"--job.dump_folder={split}", "--training.steps=3"], nproc=2))
    _ok(run_trainer([*tiny, f"--job.dump_folder={split}", "--training.steps=6"], nproc=2))
    a, b = losses(straight), losses(split)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_resume_with_other_world_size_is_refused(tiny, tmp_path):
    _ok(run_trainer([*tiny, "--training.steps=1"], nproc=2))
    proc = run_trainer([*tiny, "--training.steps=2"], nproc=1)
    assert proc.returncode == 2
    assert "saved with 2 data-parallel ranks, resuming with 1" in proc.stderr


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
