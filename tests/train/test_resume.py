"""Exact resume and preemption: mid-epoch checkpoints, resume that continues at the next batch and
ends bit-identical, and SIGTERM / SIGUSR1 / Ctrl-C on a real ``bitrain train`` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_weights, final_weights, read_rows, run_cli

import bitrain
from bitrain.data.loader import DeviceLoader
from bitrain.train import checkpoint as ckpt
from bitrain.train.trainer import Trainer

# digits: 1,442 train images / 256 = 5 steps per epoch; crop-flip and mixup so that the
# augmentation and mixup draws are part of what resume must reproduce
ARGS = [
    "--cpu",
    "--epochs",
    "2",
    "--batch-size",
    "256",
    "--log-interval",
    "2",
    "--augmentation",
    "crop-flip",
    "--mixup",
    "--label-smoothing",
    "--bn-recalibrate",  # 0: the spy below sees training batches only (test_kill resumes with recalibration)
    "0",
]
STEPS_PER_EPOCH = 5


@pytest.fixture
def train_rows(monkeypatch) -> list[list[int]]:
    """Sample indices of every train batch the loader produces (augment = reading the batch)."""
    seen: list[list[int]] = []
    real = DeviceLoader.augment

    def spy(self, rows):
        seen.append(rows[:, 0].tolist())
        return real(self, rows)

    monkeypatch.setattr(DeviceLoader, "augment", spy)
    return seen


def _pythonpath() -> str:
    """The bitrain this test imported, for the child process (a PYTHONPATH given by the caller first)."""
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(Path(bitrain.__file__).parents[1])]))


def _signal_after(monkeypatch, step: int, signum: int = signal.SIGUSR1) -> None:
    """Deliver ``signum`` to this process right after optimizer step ``step`` (1-based)."""
    real = Trainer.train_step

    def step_then_signal(self, x, y):
        out = real(self, x, y)
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    rows: list[list[int]] = []
    real = DeviceLoader.augment
    mp = pytest.MonkeyPatch()
    mp.setattr(DeviceLoader, "augment", lambda self, r: (rows.append(r[:, 0].tolist()), real(self, r))[1])
    run = tmp_path_factory.mktemp("resume") / "ref"
    try:
        assert run_cli("train", *ARGS, "--prefix", run) == 0
    finally:
        mp.undo()
    assert len(rows) == 2 * STEPS_PER_EPOCH
    return run, rows


@pytest.mark.parametrize("stop_step", [3, 7, 5])  # mid epoch 0, mid epoch 1, last batch of epoch 0
def test_signal_mid_epoch_then_resume_is_bit_identical(reference, tmp_path, monkeypatch, capsys, train_rows, stop_step):
    ref_dir, ref_rows = reference
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_after(m, stop_step)
        assert run_cli("train", *ARGS, "--prefix", run) == 3
    out = capsys.readouterr().out
    assert "received SIGUSR1" in out and f"resume with: bitrain train --prefix {run} --resume auto" in out
    state = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]
    assert (state["step"], state["epoch"], state["batch"]) == (stop_step, (stop_step - 1) // 5, (stop_step - 1) % 5 + 1)
    assert train_rows == ref_rows[:stop_step]
    train_rows.clear()

    assert run_cli("train", *ARGS, "--prefix", run, "--resume", "auto") == 0
    assert f"step {stop_step}" in capsys.readouterr().out
    # the resumed run reads exactly the batches that were not trained yet, in the same order
    assert train_rows == ref_rows[stop_step:]
    assert_same_weights(final_weights(run), final_weights(ref_dir))
    ref_last = ckpt.load_checkpoint(ref_dir / "checkpoints" / "last.pt")
    got_last = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    for key in ("optimizer", "train_metrics"):
        assert ckpt.checksum({key: got_last[key]}) == ckpt.checksum({key: ref_last[key]}), key
    assert got_last["trainer"]["best_acc"] == ref_last["trainer"]["best_acc"]


def test_checkpoint_interval_and_minutes_save_mid_epoch(tmp_path, monkeypatch):
    saved: list[tuple[int, int]] = []
    real = ckpt.save_last

    def spy(folder, payload, also=()):
        saved.append((payload["trainer"]["epoch"], payload["trainer"]["batch"]))
        return real(folder, payload, also)

    monkeypatch.setattr(ckpt, "save_last", spy)
    assert run_cli("train", *ARGS, "--epochs", "1", "--checkpoint-interval", "2", "--prefix", tmp_path / "a") == 0
    assert saved == [(0, 2), (0, 4), (1, 0)]  # every 2 steps, then the epoch's own checkpoint
    saved.clear()
    # minutes: a tiny interval means after every step (time measured since the last save)
    assert run_cli("train", *ARGS, "--epochs", "1", "--checkpoint-minutes", "1e-9", "--prefix", tmp_path / "b") == 0
    assert saved == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0)]


# ---------------------------------------------------------------- signals on a real process
def _start(run: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CI="1", PYTHONPATH=_pythonpath())
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bitrain",
            "train",
            "--cpu",
            "--epochs",
            "100",
            "--batch-size",
            "64",
            "--checkpoint-interval",
            "1",
            "--log-interval",
            "0",
            "--prefix",
            str(run),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        cwd=run.parent,
    )


def _wait_training(proc: subprocess.Popen, run: Path, timeout: float = 300) -> None:
    """Until the first mid-epoch checkpoint exists: the loop is running (handlers installed)."""
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_stops_at_step_boundary_with_exit_3(tmp_path, signum):
    run = tmp_path / "run"
    proc = _start(run)
    _wait_training(proc, run)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    name = signal.Signals(signum).name
    assert f"received {name}: stopped at epoch" in out
    assert f"resume with: bitrain train --prefix {run} --resume auto" in out
    assert "Traceback" not in err
    payload = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["trainer"]["step"] >= 1 and payload["trainer"]["epoch"] < 100
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp file left


def test_second_ctrl_c_raises_at_once_in_process(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C only sets the flag; a second one, before the step boundary, stops at once."""
    real = Trainer.train_step

    def double_ctrl_c(self, x, y):
        out = real(self, x, y)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled here: sets the flag, training goes on
            assert self._signals.received == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt right here
            raise AssertionError("the second Ctrl-C did not stop the run")
        return out

    monkeypatch.setattr(Trainer, "train_step", double_ctrl_c)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    assert run_cli("train", *ARGS, "--checkpoint-interval", "1", "--prefix", run) == 130
    cap = capsys.readouterr()
    assert "bitrain: interrupted" in cap.err and "resume with" not in cap.out
    # both presses came inside the third step, before its checkpoint: last.pt is the complete step-2 one
    assert ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_process_interrupt_raises_once_and_stop_flag_defers_to_it():
    from bitrain.train.preempt import ProcessInterrupt, StopFlag

    gate = ProcessInterrupt()
    with pytest.raises(KeyboardInterrupt):
        gate(signal.SIGINT, None)
    gate(signal.SIGINT, None)  # every later press: nothing
    fresh = ProcessInterrupt()
    flag = StopFlag()
    flag._old[signal.SIGINT] = fresh  # as installed by `bitrain` the program
    flag._handle(signal.SIGINT, None)
    assert flag.received == "SIGINT" and not fresh.fired  # first press: only the flag
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)  # second: the process-wide handler raises its one exception
    flag._handle(signal.SIGINT, None)  # third: swallowed, not a KeyboardInterrupt inside the first's handler
    assert fresh.fired


def test_program_ctrl_c_inside_the_interrupt_handler_does_not_escape(monkeypatch):
    """Presses keep coming while the command handles the first one: the program still returns its code."""
    from bitrain import cli

    def command(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
            raise AssertionError("the first Ctrl-C did not raise")
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGINT)  # with Python's default handler: a second exception here
            time.sleep(0.05)
            return 3

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setitem(cli.COMMANDS, "press", command)
    monkeypatch.setattr(sys, "argv", ["bitrain", "press"])
    try:
        assert cli.main() == 3
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # and at exit, a press cannot kill it
    finally:
        signal.signal(signal.SIGINT, before)


def test_run_program_turns_an_unhandled_ctrl_c_into_130(capsys):
    from bitrain.train.preempt import run_program

    def main():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        return 0

    before = signal.getsignal(signal.SIGINT)
    try:
        assert run_program(main, interrupted="bitrain: interrupted") == 130
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # after the program: ignored
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err == "bitrain: interrupted\n"


def test_two_ctrl_c_on_a_process_never_leave_a_broken_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    _wait_training(proc, run)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # keep pressing: every moment of the
        os.kill(proc.pid, signal.SIGINT)  # stop gets a second press (step, save, exit, shutdown)
        time.sleep(0.01)  # separate presses (identical pending signals merge into one)
    out, err = proc.communicate(timeout=300)
    # a second press before the step boundary or during the save: 130 at once; after the save: 3
    assert proc.returncode in (130, 3), err
    assert "Traceback" not in err
    if proc.returncode == 130:
        assert "bitrain: interrupted" in err
    for p in (run / "checkpoints").glob("*.pt"):  # whatever was published is complete
        ckpt.load_checkpoint(p)
    assert (run / "checkpoints" / "last.pt").is_file()


def _slurm_job(run: Path) -> subprocess.Popen:
    """The command of docs/performance.md's SLURM job, on digits: every start, the first and each requeued
    one, is the same ``--resume auto`` command line (23 steps per epoch at batch 64, a log line every 5)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CI="1", PYTHONPATH=_pythonpath())
    argv = ["--cpu", "--epochs", "3", "--batch-size", "64", "--log-interval", "5", "--augmentation", "crop-flip"]
    argv += ["--mixup", "--label-smoothing", "--prefix", str(run), "--resume", "auto"]
    return subprocess.Popen(
        [sys.executable, "-m", "bitrain", "train", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        cwd=run.parent,
    )


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.02)


def test_sigusr1_then_requeue_with_resume_auto_is_bit_identical(tmp_path):
    """SLURM's ``--signal=USR1@120 --requeue`` (docs/performance.md): SIGUSR1 once the job has trained a
    while stops it at a step boundary with exit 3 and a resumable checkpoint (and no model.safetensors, so
    the script requeues it); the requeued job, the same command, ends bit-identical to one never stopped."""
    ref = tmp_path / "ref"
    job = _slurm_job(ref)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    assert "--resume auto: nothing to resume" in err  # the first start of the job starts fresh

    run = tmp_path / "run"
    job = _slurm_job(run)
    _wait_for_line(job, run / "train.log", "Epoch[0] Batch [5]")  # 5 steps trained, 64 to go
    os.kill(job.pid, signal.SIGUSR1)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 3, err[-3000:]
    assert "received SIGUSR1: stopped at epoch 0 batch" in out and "Traceback" not in err
    state = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]
    assert state["epoch"] == 0 and 5 <= state["batch"] < 23  # mid-epoch
    assert not (run / "model.safetensors").exists()  # the SLURM script's test: not finished, requeue

    job = _slurm_job(run)  # the requeued job
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'last.pt'}: epoch 0, batch {state['batch']}" in out
    assert_same_weights(final_weights(run), final_weights(ref))
    columns = ("split", "epoch", "step", "samples", "loss", "acc1", "acc5", "lr")
    rows = [tuple(r[c] for c in columns) for r in read_rows(run) if r["split"] != "batch"]
    assert rows == [tuple(r[c] for c in columns) for r in read_rows(ref) if r["split"] != "batch"]


def test_accumulate_ema_cutmix_resume_bit_identical(tmp_path, monkeypatch):
    """--accumulate, --model-ema and --cutmix (with --mixup: timm's switch) resumed mid-epoch end as one run."""
    extra = ["--accumulate", "2", "--model-ema", "0.9", "--model-ema-warmup", "--cutmix", "1.0"]
    ref = tmp_path / "ref"
    assert run_cli("train", *ARGS, *extra, "--prefix", ref) == 0
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_after(m, 4)
        assert run_cli("train", *ARGS, *extra, "--prefix", run) == 3
    # 5 batches per epoch in windows of 2, 2, 1: 3 optimizer steps; step 4 is epoch 1's first
    state = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 4)
    assert run_cli("train", *ARGS, *extra, "--prefix", run, "--resume", "auto") == 0
    assert_same_weights(final_weights(run), final_weights(ref))
    got, want = (ckpt.load_checkpoint(r / "checkpoints" / "last.pt") for r in (run, ref))
    assert_same_weights(got["ema"]["model"], want["ema"]["model"])
    assert ckpt.checksum({"o": got["optimizer"]}) == ckpt.checksum({"o": want["optimizer"]})
    rows = [(r["split"], r["step"], r["acc1"]) for r in read_rows(run) if r["split"] != "batch"]
    assert rows == [(r["split"], r["step"], r["acc1"]) for r in read_rows(ref) if r["split"] != "batch"]
    assert [r["step"] for r in read_rows(ref, "val_ema")] == ["3", "6"]


def test_mid_epoch_checkpoint_refuses_another_accumulate(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_after(m, 2)
        assert run_cli("train", *ARGS, "--accumulate", "2", "--prefix", run) == 3
    before = (run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    assert run_cli("train", *ARGS, "--accumulate", "3", "--prefix", run, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "stopped inside epoch 0 with --accumulate 2; resume it with --accumulate 2" in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
