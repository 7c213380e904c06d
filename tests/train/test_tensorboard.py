"""TensorBoard ``training/lr``: written at each epoch start (BMXNet's track_lr), once per step,
also across a resume (after --interrupt-at, and after a SIGKILL past an epoch-end or mid-epoch checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

import bitrain
from bitrain.train.schedules import lr_at

STEPS = 1442 // 64  # digits at the default batch size: 22 steps per epoch, under the log interval of 50
EPOCH_STARTS = [0, STEPS * 64]  # global_step = samples seen
EXPECTED_LR = [lr_at(e * STEPS, lr=0.01, mode="cosine", steps_per_epoch=STEPS, epochs=2) for e in range(2)]


def _lr_events(run: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars("training/lr")]


def _assert_one_lr_per_epoch(run: Path) -> None:
    events = _lr_events(run)
    assert [step for step, _ in events] == EPOCH_STARTS
    assert [v for _, v in events] == pytest.approx(EXPECTED_LR, rel=1e-6)


def test_lr_is_written_at_each_epoch_start_of_the_default_run(tmp_path):
    assert EXPECTED_LR == pytest.approx([0.01, 0.005])
    assert run_cli("train", "--epochs", "2", "--cpu", "--prefix", tmp_path / "run") == 0
    _assert_one_lr_per_epoch(tmp_path / "run")


def test_lr_once_per_step_after_interrupt_at_and_resume(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--epochs", "2", "--cpu", "--prefix", run, "--interrupt-at", "1") == 3
    assert [step for step, _ in _lr_events(run)] == [0]  # stopped before epoch 1 began
    assert run_cli("train", "--cpu", "--prefix", run, "--resume", "auto") == 0
    _assert_one_lr_per_epoch(run)


_KILL_AT_BATCH_5_OF_EPOCH_1 = """
import os, signal, sys
from bitrain.train.trainer import Trainer
step = Trainer.train_step
def train_step(self, x, y):
    if self.state.epoch == 1 and self.state.batch == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, x, y)
Trainer.train_step = train_step
from bitrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("checkpoint_interval", ["0", "25"], ids=["epoch-end-checkpoint", "mid-epoch-checkpoint"])
def test_lr_once_per_step_after_sigkill_and_resume(tmp_path, checkpoint_interval):
    """Killed in epoch 1 after it logged its lr: the resumed run does not write that lr again."""
    run = tmp_path / "run"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(bitrain.__file__).parents[1]), os.environ.get("PYTHONPATH")])
        ),
    )
    env.pop("WORLD_SIZE", None)
    args = ["train", "--epochs", "2", "--cpu", "--prefix", str(run), "--checkpoint-interval", checkpoint_interval]
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT_BATCH_5_OF_EPOCH_1, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr
    assert [step for step, _ in _lr_events(run)] == EPOCH_STARTS  # epoch 1's lr reached the disk
    assert run_cli("train", "--cpu", "--prefix", run, "--resume", "auto") == 0
    _assert_one_lr_per_epoch(run)
