"""Bad inputs: one line naming the thing at fault, exit code 2, no traceback, nothing half-written."""

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, _env, run_trainer


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


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
    _one_line_error(run_trainer([*tiny, *args]), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU on a machine without one")
def test_cuda_asked_on_a_machine_without_one(tiny):
    _one_line_error(run_trainer([*tiny, "--training.device=cuda"]), "training.device=cuda")


def test_unwritable_dump_folder(tiny, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _one_line_error(run_trainer([*tiny, f"--job.dump_folder={blocker / 'run'}"]), str(blocker))


def test_missing_and_invalid_config_file(tmp_path):
    _one_line_error(run_trainer([str(tmp_path / "nope.toml")]), "nope.toml", "not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 3\n")
    _one_line_error(run_trainer([str(bad)]), "bad.toml", "TOML")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[training]\nsteps = 3\nbogus = 1\n")
    _one_line_error(run_trainer([str(unknown)]), "training.bogus")
    typed = tmp_path / "typed.toml"
    typed.write_text('[training]\nsteps = "three"\n')
    _one_line_error(run_trainer([str(typed)]), "training.steps")


@pytest.fixture
def saved_run(tiny, tmp_path):
    proc = run_trainer([*tiny, "--training.steps=1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / "run" / "checkpoints" / "step-1"


def test_corrupt_checkpoint(tiny, saved_run, tmp_path):
    bad = tmp_path / "corrupt" / "step-1"
    shutil.copytree(saved_run, bad)
    (bad / ".metadata").write_bytes(b"not a pickle")
    _one_line_error(
        run_trainer([*tiny, f"--job.dump_folder={tmp_path / 'ft'}", f"--checkpoint.initial_load_path={bad}"]),
        str(bad),
        "unreadable",
    )
    for f in bad.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:10])
    (bad / ".metadata").write_bytes((saved_run / ".metadata").read_bytes())
    _one_line_error(
        run_trainer(
            [*tiny, f"--job.dump_folder={tmp_path / 'ft2'}", f"--checkpoint.initial_load_path={bad}"]
        ),
        str(bad),
    )


def test_checkpoint_of_another_shape(tiny, saved_run, tmp_path):
    args = [*tiny, f"--job.dump_folder={tmp_path / 'other'}", f"--checkpoint.initial_load_path={saved_run}"]
    _one_line_error(run_trainer([*args, "--model.dim=96"]), str(saved_run), "shape")
    _one_line_error(run_trainer([*args, "--model.memory_layers=0"]), str(saved_run))
    # Checkpoints holding tensors this model lacks: a deeper model, and Memory+ into plain PKM.
    _one_line_error(
        run_trainer([*args, "--model.n_layers=1", "--model.memory_layers=[]"]), str(saved_run), "lacks"
    )
    _one_line_error(run_trainer([*args, "--model.memory_plus=false"]), str(saved_run), "gate_proj")


def test_missing_checkpoint_path_and_step(tiny, saved_run, tmp_path):
    missing = tmp_path / "nowhere" / "step-9"
    _one_line_error(
        run_trainer(
            [*tiny, f"--job.dump_folder={tmp_path / 'x'}", f"--checkpoint.initial_load_path={missing}"]
        ),
        str(missing),
    )
    _one_line_error(run_trainer([*tiny, "--checkpoint.load_step=7"]), "checkpoint.load_step=7")


def test_help_lists_every_option():
    proc = run_trainer(["--help"])
    assert proc.returncode == 0
    for key in ("--training.mode", "--model.memory_n_keys", "--data.source", "--checkpoint.keep_latest_k"):
        assert key in proc.stdout
    assert (REPO / "run_train.sh").stat().st_mode & 0o111


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
    _one_line_error(launch_sh(3), "training.global_batch_size", "ranks (3)")
    missing = tmp_path / "no_such_run" / "step-3"
    proc = launch_sh(2, "--training.mode=full_finetune", f"--checkpoint.initial_load_path={missing}")
    _one_line_error(proc, "checkpoint.initial_load_path", str(missing))
    _one_line_error(launch_sh(2, "--training.mode=lora_finetune"), "checkpoint.initial_load_path")
    _one_line_error(launch_sh(2, "--training.mode=sparse_finetune"), "checkpoint.initial_load_path")
    # Resuming a 1-rank run's checkpoint on 2 ranks: refused before the workers start.
    run = tmp_path / "one_rank"
    assert run_trainer([*tiny, f"--job.dump_folder={run}", "--training.steps=1"]).returncode == 0
    proc = launch_sh(2, f"--job.dump_folder={run}", "--training.steps=2")
    _one_line_error(proc, "step-1", "saved with 1 data-parallel ranks, resuming with 2")


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
    _one_line_error(proc, needle)
