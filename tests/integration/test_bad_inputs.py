"""Bad inputs: one line naming the thing at fault, exit code 2, no traceback, nothing half-written."""

import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, _env, error_line, launch, run_trainer

from titan_mem.checkpoint import step_dirs


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--training.stepz=3"], ["training.stepz", "unknown key"]),
        (["--nosection.x=1"], ["nosection.x", "unknown section"]),
        (["--training.steps=many"], ["training.steps", "integer"]),
        (["--job.deterministic=maybe"], ["job.deterministic"]),
        (["--training.global_batch_size=5"], ["training.global_batch_size", "divisible"]),
        (["--model.flavor=huge"], ["model.flavor", "huge"]),
        (["--model.memory_layers=7"], ["model.memory_layers"]),
        (["--data.regime=nonsense"], ["data.regime"]),
    ],
)
def test_bad_config_values(tiny, args, needles):
    error_line(run_trainer([*tiny, *args]), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU on a machine without one")
def test_cuda_asked_on_a_machine_without_one(tiny):
    error_line(run_trainer([*tiny, "--training.device=cuda"]), "training.device=cuda")


def test_unwritable_dump_folder(tiny, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    error_line(run_trainer([*tiny, f"--job.dump_folder={blocker / 'run'}"]), str(blocker))


def test_missing_and_invalid_config_file(tmp_path):
    error_line(run_trainer([str(tmp_path / "nope.toml")]), "nope.toml", "not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 3\n")
    error_line(run_trainer([str(bad)]), "bad.toml", "TOML")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[training]\nsteps = 3\nbogus = 1\n")
    error_line(run_trainer([str(unknown)]), "training.bogus")
    typed = tmp_path / "typed.toml"
    typed.write_text('[training]\nsteps = "three"\n')
    error_line(run_trainer([str(typed)]), "training.steps")


@pytest.fixture
def saved_run(tiny, tmp_path):
    proc = run_trainer([*tiny, "--training.steps=1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / "run" / "checkpoints" / "step-1"


def test_corrupt_checkpoint(tiny, saved_run, tmp_path):
    bad = tmp_path / "corrupt" / "step-1"
    shutil.copytree(saved_run, bad)
    (bad / ".metadata").write_bytes(b"not a pickle")
    error_line(
        run_trainer([*tiny, f"--job.dump_folder={tmp_path / 'ft'}", f"--checkpoint.initial_load_path={bad}"]),
        str(bad),
        "unreadable",
    )
    for f in bad.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:10])
    (bad / ".metadata").write_bytes((saved_run / ".metadata").read_bytes())
    error_line(
        run_trainer(
            [*tiny, f"--job.dump_folder={tmp_path / 'ft2'}", f"--checkpoint.initial_load_path={bad}"]
        ),
        str(bad),
    )


def _file_size_limit_1mib():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_outputs_that_cannot_be_written(tiny, saved_run, tmp_path):
    """A save past `ulimit -f` (to torch's writer this looks like a full disk: "unexpected pos 704 vs
    598"), and tools asked to write under a file or into /proc: one line each naming the path and the
    cause, the previous checkpoint intact, nothing half-written left. (A real full disk, a 1 MiB tmpfs,
    gives "disk full: No space left on device": docs/benchmarks.md has no use for it, the README shows it.)"""
    proc = subprocess.run(
        [sys.executable, "-m", "titan_mem.train", *tiny, "--training.steps=2"],
        cwd=REPO, env=_env(None), capture_output=True, text=True, timeout=300,
        preexec_fn=_file_size_limit_1mib,
    )  # fmt: skip
    error_line(proc, "step-2.partial", "saving step 2 failed", "ulimit -f")
    folder = saved_run.parent
    assert sorted(step_dirs(folder)) == [1] and not (folder / "step-2.partial").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    to_file = launch(
        [str(REPO / "tools" / "convert_checkpoint.py"), "to-file", str(saved_run), str(blocker / "o.pt")]
    )
    error_line(to_file, f"{blocker} is a file, not a folder")
    counts = launch(
        [str(REPO / "tools" / "background_counts.py"), "train_configs/debug_model.toml", *tiny,
         f"--checkpoint={saved_run}", "--batch-size=4", "--seq-len=32", "--out=/proc/bg.safetensors"]
    )  # fmt: skip
    error_line(counts, "/proc/bg.safetensors", "cannot be written")


def test_checkpoint_of_another_shape(tiny, saved_run, tmp_path):
    args = [*tiny, f"--job.dump_folder={tmp_path / 'other'}", f"--checkpoint.initial_load_path={saved_run}"]
    error_line(run_trainer([*args, "--model.dim=96"]), str(saved_run), "shape")
    error_line(run_trainer([*args, "--model.memory_layers=0"]), str(saved_run))
    # Checkpoints holding tensors this model lacks: a deeper model, and Memory+ into plain PKM.
    error_line(
        run_trainer([*args, "--model.n_layers=1", "--model.memory_layers=[]"]), str(saved_run), "lacks"
    )
    error_line(run_trainer([*args, "--model.memory_plus=false"]), str(saved_run), "gate_proj")


def test_missing_checkpoint_path_and_step(tiny, saved_run, tmp_path):
    missing = tmp_path / "nowhere" / "step-9"
    error_line(
        run_trainer(
            [*tiny, f"--job.dump_folder={tmp_path / 'x'}", f"--checkpoint.initial_load_path={missing}"]
        ),
        str(missing),
    )
    error_line(run_trainer([*tiny, "--checkpoint.load_step=7"]), "checkpoint.load_step=7")


def test_help_lists_every_option():
    proc = run_trainer(["--help"])
    assert proc.returncode == 0
    for key in ("--training.mode", "--model.memory_n_keys", "--data.source", "--checkpoint.keep_latest_k"):
        assert key in proc.stdout
    assert (REPO / "run_train.sh").stat().st_mode & 0o111


@pytest.mark.heavy
def test_multi_rank_launch_refuses_before_starting_workers(tiny, tmp_path):
    """run_train.sh checks the config for the whole job first: one line, exit 2, no torchrun report."""

    def launch_sh(nproc, *args):
        return subprocess.run(
            ["./run_train.sh", "train_configs/debug_model.toml", *tiny, *args],
            cwd=REPO,
            env=_env({"NGPU": str(nproc)}),
            capture_output=True,
            text=True,
            timeout=120,
        )

    # tiny: global batch 4, micro-batch 2: 3 ranks cannot split it
    error_line(launch_sh(3), "training.global_batch_size", "ranks (3)")
    missing = tmp_path / "no_such_run" / "step-3"
    proc = launch_sh(2, "--training.mode=full_finetune", f"--checkpoint.initial_load_path={missing}")
    error_line(proc, "checkpoint.initial_load_path", str(missing))
    error_line(launch_sh(2, "--training.mode=lora_finetune"), "checkpoint.initial_load_path")
    error_line(launch_sh(2, "--training.mode=sparse_finetune"), "checkpoint.initial_load_path")
    # A shard of a 2-rank checkpoint truncated (a copy cut short): named before any worker starts.
    run = tmp_path / "two_ranks"
    assert run_trainer([*tiny, f"--job.dump_folder={run}", "--training.steps=1"], nproc=2).returncode == 0
    shard = run / "checkpoints" / "step-1" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = launch_sh(2, f"--job.dump_folder={run}", "--training.steps=2")
    error_line(proc, f"{shard}: truncated")
    # A stream count the ranks cannot share, and one the global batch cannot be split over.
    error_line(launch_sh(2, "--data.streams=1"), "data.streams=1", "multiple of the 2 data-parallel")
    error_line(launch_sh(1, "--data.streams=8"), "data.streams=8", "global batch of 4")


@pytest.mark.parametrize(
    "env,needle",
    [({"NGPU": "abc"}, "NGPU=abc"), ({"NGPU": "0"}, "NGPU=0"), ({"NODE_RANK": "2"}, "NODE_RANK=2")],
)
def test_run_train_sh_launch_variables(env, needle):
    proc = subprocess.run(
        ["bash", "run_train.sh", "--training.steps=1"],
        cwd=REPO,
        env=_env({"PYTHON": sys.executable, **env}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    error_line(proc, needle)
