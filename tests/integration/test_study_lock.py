"""One study per output folder, no folder deleted under a live run, and no job outliving a stopped study:
a second study on the same `out` is refused (exit 2, one line naming the folder and the holder) while the
first holds `<out>/.study.lock`; a dry run only says so; an arm folder whose run lock a live process holds
is not deleted; SIGTERM / SIGINT to the runner stop its jobs' process groups (SIGKILL after the grace) and
exit 143 / 130 with one line, recording nothing of the stopped arm. No training: seconds each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_study_runner import MICRO

from titan_mem.components.run_control import RunLock
from titan_mem.study import __main__ as study_main
from titan_mem.study.lock import STUDY_LOCK, StudyLock, lock_holder, remove_stale_run
from titan_mem.study.runner import Job, _run_jobs, run_study
from titan_mem.study.spec import Arm, StudyError, load_study
from titan_mem.study.stages import Command, Layout, layout_of
from titan_mem.study.stop import StudyInterrupted

REPO = Path(__file__).resolve().parents[2]
# another process holding a lock file as RunLock does (flock + "pid N on HOST since T")
HOLD = (
    "import fcntl, os, socket, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    "fcntl.flock(fd, fcntl.LOCK_EX); "
    "os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode(), 0); "
    "print('held', flush=True); time.sleep(120)"
)


def _study(tmp_path: Path) -> Path:
    path = tmp_path / "micro.toml"
    path.write_text(MICRO.replace("{out}", str(tmp_path / "out")))
    return path


def _hold(path: Path) -> subprocess.Popen:
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["study", *argv])
    rc = study_main.main()
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_second_study_on_the_same_out_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    path, out = _study(tmp_path), tmp_path / "out"
    holder = _hold(out / STUDY_LOCK)  # the first study, in another process
    try:
        rc, stdout, err = _cli(monkeypatch, capsys, str(path))
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {out}: another study is running on this folder (pid {holder.pid} on ")
        assert sorted(p.name for p in out.iterdir()) == [STUDY_LOCK]  # nothing deleted, nothing written
        # a dry run does not need the lock: it checks, prints the plan and says a run would be refused
        rc, stdout, err = _cli(monkeypatch, capsys, str(path), "--dry-run")
        assert rc == 0 and err == ""
        assert f"# note: a study is running on {out} (pid {holder.pid} on " in stdout
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(out / STUDY_LOCK) is None  # the kernel dropped it with its process
    with StudyLock(out):
        pass


def test_the_lock_is_per_open_file_and_released_at_the_end(tmp_path):
    out = tmp_path / "out"
    with StudyLock(out) as first:
        with pytest.raises(StudyError, match=f"{out}: another study .* \\(pid {os.getpid()} on "):
            StudyLock(out).acquire()
        assert lock_holder(first.path).startswith(f"pid {os.getpid()} on ")
    assert lock_holder(out / STUDY_LOCK) is None
    StudyLock(out).acquire()


def test_an_arm_folder_a_live_run_holds_is_not_deleted(tmp_path, monkeypatch):
    layout = Layout(tmp_path / "out")
    arm = Arm("full", "full_finetune", (("lr", 0.1),), seed=0)
    folder = layout.arm_dir(arm)
    trainer = RunLock(folder)  # the arm's trainer (e.g. orphaned by a runner killed with SIGKILL)
    trainer.acquire()
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    refused = remove_stale_run(folder)
    assert refused is not None and refused.startswith(f"{folder}: a live run holds this arm folder (pid ")
    marker = tmp_path / "ran"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    job = Job(Command("arm", argv, folder / "train.log"), done=lambda: False, arm=arm)
    lines: list[str] = []
    failed = _run_jobs(layout, [job], 1, None, 1, lines.append)
    assert failed == {job: refused} and not marker.exists()  # the job failed with that line, never ran
    assert (folder / "metrics.jsonl").is_file() and not (folder / "train.log").exists()
    trainer.release()
    assert remove_stale_run(folder) is None and not folder.exists()  # free: a stale folder goes


def test_a_study_refuses_up_front_when_a_live_run_holds_an_arm_to_redo(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_study(_study(tmp_path))
    folder = layout_of(spec).arm_dir(spec.arms[0])
    holder = _hold(folder / ".run.lock")
    try:
        held = f"^{folder}: a live run holds this arm folder \\(pid {holder.pid} "
        with pytest.raises(StudyError, match=held):
            run_study(spec, log=lambda _: None)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [STUDY_LOCK, "default"]  # nothing ran
    assert lock_holder(tmp_path / "out" / STUDY_LOCK) is None


def test_an_interrupted_study_is_one_line_and_its_signal_exit_code(monkeypatch, capsys):
    def stopped(argv):
        raise StudyInterrupted(signal.SIGTERM, ["arm a", "arm b"])

    monkeypatch.setattr(study_main, "run", stopped)
    assert study_main.main() == 143
    assert capsys.readouterr().err == (
        "error: study interrupted by SIGTERM: stopped 2 running job(s) (arm a, arm b); "
        "rerun the study to resume\n"
    )


RUNNER = """
import sys
from pathlib import Path
from titan_mem.study import stop
from titan_mem.study.runner import Job, _run_jobs
from titan_mem.study.spec import Arm
from titan_mem.study.stages import Command, Layout

tmp, child, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
stop.GRACE_S = 1.0
layout = Layout(tmp / "out")
arm = Arm("full", "full_finetune", (("lr", 0.1),), seed=0)
jobs = [
    Job(Command("arm", [sys.executable, "-c", child, str(tmp), mode], tmp / "arm.log"), lambda: 0, arm=arm),
    Job(Command("after", [sys.executable, "-c", "print(1)"], tmp / "after.log"), lambda: False, ["arm"]),
]
try:
    _run_jobs(layout, jobs, 1, None, 1, print)
except stop.StudyInterrupted as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
"""
# a job like a trainer: a child of its own, and on SIGTERM a clean exit 0 ("saved"); or deaf to SIGINT
CHILD = """
import os, signal, subprocess, sys, time
from pathlib import Path
grand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
if sys.argv[2] == "exit0":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
else:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
(Path(sys.argv[1]) / "pids").write_text(f"{os.getpid()} {grand.pid}")
time.sleep(120)
"""


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """The process is gone (or a zombie waiting for init)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig, mode", [(signal.SIGTERM, "exit0"), (signal.SIGINT, "deaf")])
def test_a_signal_stops_every_job_and_the_study(tmp_path, sig, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path), CHILD, mode], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        pids = tmp_path / "pids"
        end = time.monotonic() + 120
        while not (pids.is_file() and pids.read_text()) and runner.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        assert pids.is_file(), runner.communicate(timeout=10)
        child, grand = map(int, pids.read_text().split())
        runner.send_signal(sig)
        stdout, stderr = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 128 + sig, stdout + stderr
    name = signal.Signals(sig).name
    assert stderr.splitlines()[-1] == (
        f"error: study interrupted by {name}: stopped 1 running job(s) (arm); rerun the study to resume"
    )
    assert _gone(child) and _gone(grand)  # the job's whole process group, even the one deaf to SIGINT
    assert not (tmp_path / "out").exists()  # the stopped arm (exit 0 on SIGTERM) recorded nothing
    assert not (tmp_path / "after.log").exists()  # and no job started after the signal
