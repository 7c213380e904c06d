"""Shared helpers: run the CLI in-process and read a run directory's results."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch


def run_cli(*args: str) -> int:
    from bitrain.cli import main

    return main([str(a) for a in args])


def read_rows(run_dir: Path, split: str | None = None) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if split is None or r["split"] == split]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def stop_after(trainer, batches: int) -> None:
    """Make ``trainer`` see a stop request (as from SIGTERM) once it has trained ``batches`` batches."""
    real, calls = trainer.train_step, []

    def step(x, y):
        out = real(x, y)
        calls.append(1)
        if len(calls) == batches:
            trainer._signals.received = "test"
        return out

    trainer.train_step = step


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors (batch 2, 8-32 px): a second OpenMP thread only
    adds barrier waits, which turn into seconds per op when the CPU is shared with other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``runtimes`` (OpenVINO, onnxruntime in this process) run after all others: once their
    thread pools have started, a later fork of the test process (DataLoader workers, subprocess.run)
    crashed it with a segmentation fault. The order within each group is kept."""
    items[:] = [i for i in items if not i.get_closest_marker("runtimes")] + [
        i for i in items if i.get_closest_marker("runtimes")
    ]
