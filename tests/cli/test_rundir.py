"""The run-directory lock: one bitrain run per --prefix at a time, never a stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bitrain
from bitrain.cli import rundir
from bitrain.cli.rundir import LOCK_NAME, lock_run_dir, prepare_run_dir
from bitrain.errors import UserError

# takes the lock on argv[1]; with argv[2] == "fork", forks a child that lives on; says "locked [CHILD PID]"; sleeps
HOLDER = """
import os, sys, time
from pathlib import Path
from bitrain.cli.rundir import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]))
child = os.fork() if sys.argv[2:] == ["fork"] else None
if child == 0:
    time.sleep(120)
    os._exit(0)
print("locked", child or "", flush=True)
time.sleep(120)
"""
# tries the lock on argv[1]: exit 0 when it got it, else 2 with the message on stderr
TRY = """
import sys
from pathlib import Path
from bitrain.cli.rundir import lock_run_dir
from bitrain.errors import UserError
try:
    lock_run_dir(Path(sys.argv[1])).close()
except UserError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def _env() -> dict[str, str]:
    root = str(Path(bitrain.__file__).parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=_env(), text=True, **kw)


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock on tmp_path/run (killed at the end of the test)."""
    procs, children = [], []

    def start(*extra: str) -> subprocess.Popen:
        p = _python(HOLDER, str(tmp_path / "run"), *extra, stdout=subprocess.PIPE)
        procs.append(p)
        said = p.stdout.readline().split()
        assert said[:1] == ["locked"]
        children.extend(int(c) for c in said[1:])
        p.child = int(said[1]) if said[1:] else None
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for c in children:
        try:
            os.kill(c, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _try_in_another_process(run: Path) -> tuple[int, str]:
    p = _python(TRY, str(run), stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=60)
    return p.returncode, err.strip()


def test_a_second_lock_fails_naming_the_holder(tmp_path, holder):
    run = tmp_path / "run"
    h = holder()
    assert (run / LOCK_NAME).read_text().split()[0] == str(h.pid)
    with pytest.raises(UserError) as e:
        lock_run_dir(run)
    assert str(e.value) == (
        f"--prefix {run} is in use by another bitrain run (pid {h.pid}); wait for it to end or choose another --prefix"
    )
    code, err = _try_in_another_process(run)
    assert code == 2 and f"in use by another bitrain run (pid {h.pid})" in err


@pytest.mark.parametrize("fork", [False, True], ids=["alone", "with-a-forked-child"])
def test_sigkill_of_the_holder_frees_the_lock(tmp_path, holder, fork):
    """The kernel drops the lock with the process (a forked child, as a DataLoader worker, does not keep it)."""
    run = tmp_path / "run"
    h = holder(*(["fork"] if fork else []))
    assert _try_in_another_process(run)[0] == 2
    os.kill(h.pid, signal.SIGKILL)
    h.wait()
    if fork:
        os.kill(h.child, 0)  # the child lives on, and shares the lock file's open file description
    with lock_run_dir(run) as lock:  # at once: no stale lock, nothing to clean up
        assert lock.locked and (run / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        assert _try_in_another_process(run)[0] == 2
    assert _try_in_another_process(run) == (0, "")  # released on close


def test_close_releases_and_is_idempotent(tmp_path):
    lock = lock_run_dir(tmp_path / "new" / "run")  # creates the folder
    assert lock.locked and (tmp_path / "new" / "run" / LOCK_NAME).is_file()
    lock.close()
    lock.close()
    assert (tmp_path / "new" / "run" / LOCK_NAME).read_text() == ""  # no holder named once free
    assert _try_in_another_process(tmp_path / "new" / "run") == (0, "")


def test_the_lock_file_is_not_a_run_for_prepare_run_dir(tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run):
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
        prepare_run_dir(run, resuming=False, overwrite=False, log_name="train.log")  # still fresh
        (run / "config.yaml").write_text("model: tiny_resnet_e\n")
        (run / "metrics.csv").write_text("split\n")
        with pytest.raises(UserError, match="already holds a run"):
            prepare_run_dir(run, resuming=False, overwrite=False, log_name="train.log")
        prepare_run_dir(run, resuming=False, overwrite=True, log_name="train.log")
        assert (run / LOCK_NAME).is_file() and not (run / "metrics.csv").exists()  # --overwrite leaves it
        assert _try_in_another_process(run)[0] == 2  # still held


def test_a_lock_dropped_without_close_is_released(tmp_path):
    """An error between taking the lock and the command's finally must not block the next run of
    the same process (bitrain's tests run many commands in one process)."""

    def command() -> int:
        lock = lock_run_dir(tmp_path / "run")  # noqa: F841 (held by the frame until the error is handled)
        raise UserError("something else went wrong")

    def cli() -> int:  # as bitrain.cli.main: a UserError is one line and exit 2
        try:
            return command()
        except UserError:
            return 2

    assert cli() == 2
    lock_run_dir(tmp_path / "run").close()


def test_without_fcntl_there_is_no_lock_and_no_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "fcntl", None)
    with lock_run_dir(tmp_path / "run") as a, lock_run_dir(tmp_path / "run") as b:
        assert not a.locked and not b.locked
    a.close()


def test_an_unwritable_prefix_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"--prefix .*file/run is not writable"):
        lock_run_dir(tmp_path / "file" / "run")


def test_the_lock_is_free_while_nobody_runs(tmp_path):
    """A holder that ended normally (no close) left nothing behind either."""
    p = _python(
        "import sys; from pathlib import Path; from bitrain.cli.rundir import lock_run_dir; "
        "lock_run_dir(Path(sys.argv[1]))",
        str(tmp_path / "run"),
    )
    assert p.wait(timeout=60) == 0
    t0 = time.monotonic()
    with lock_run_dir(tmp_path / "run") as lock:
        assert lock.locked and time.monotonic() - t0 < 1


def test_resume_auto_refuses_a_checkpoint_that_went_stale_before_the_lock(tmp_path, monkeypatch, capsys):
    """--resume auto reads the newest checkpoint, then takes the lock: a run that ended in between
    (it wrote a newer last.pt) must not be continued from the older one."""
    import shutil

    from conftest import run_cli

    from bitrain.cli import train as cli_train
    from bitrain.train import checkpoint as ckpt

    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    common = ("train", "--cpu", "--model", "lenet", "--test-run", "--prefix", str(run))
    assert run_cli(*common, "--epochs", "1") == 0
    shutil.copy(last, tmp_path / "older.pt")
    assert run_cli(*common, "--epochs", "2", "--resume", "auto") == 0
    shutil.copy(last, tmp_path / "newer.pt")
    shutil.copy(tmp_path / "older.pt", last)  # as the other run's files stood when this one read them
    newer_step = ckpt.load_checkpoint(tmp_path / "newer.pt")["trainer"]["step"]

    def lock_after_the_other_run_ends(run_dir):
        shutil.copy(tmp_path / "newer.pt", last)
        return rundir.lock_run_dir(run_dir)

    monkeypatch.setattr(cli_train, "lock_run_dir", lock_after_the_other_run_ends)
    capsys.readouterr()
    assert run_cli(*common, "--epochs", "3", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "changed while this run started" in err and "run the same command again" in err
    assert ckpt.load_checkpoint(last)["trainer"]["step"] == newer_step  # nothing overwritten
    assert _try_in_another_process(run)[0] == 0  # the lock was released
    monkeypatch.undo()
    assert run_cli(*common, "--epochs", "3", "--resume", "auto") == 0  # the rerun continues from the newest
    assert ckpt.load_checkpoint(last)["trainer"]["step"] > newer_step
