"""The trackers' base (bitrain/train/tracking.py) with a backend that records: what it is fed, the resume
state, and one warning (then silence) when the backend raises. No MLflow or W&B needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitrain.train.tracking import TrackingLogger, row_metrics


class Recorder(TrackingLogger):
    name = "recorder"

    def __init__(self, fail_on: str | None = None, **kw) -> None:
        super().__init__({"lr": 0.1, "model": None}, **kw)
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def _call(self, *what) -> None:
        self.calls.append(what)
        if what[0] == self.fail_on:
            raise OSError(28, "No space left on device")

    def _start(self, run_id):
        self._call("start", run_id, dict(self.params))
        return run_id or "new-run"

    def _log_metrics(self, metrics, step):
        self._call("metrics", metrics, step)

    def _set_tag(self, key, value):
        self._call("tag", key, value)

    def _log_files(self, files):
        self._call("files", sorted(files))

    def _finish(self, exit_code):
        self._call("finish", exit_code)

    def _abandon(self):
        self.calls.append(("abandon",))


ROW = {"split": "val", "epoch": 0, "step": 5, "samples": 1280, "loss": 1.5, "acc1": 0.75, "acc5": 0.9, "lr": 0.01}


def test_row_metrics_are_the_csv_columns_under_the_split():
    batch = {**ROW, "split": "batch", "samples_per_sec": 100.0, "epoch_time": None}
    assert row_metrics(batch) == {
        "batch/loss": 1.5,
        "batch/acc1": 0.75,
        "batch/acc5": 0.9,
        "batch/lr": 0.01,
        "batch/samples_per_sec": 100.0,
    }


def test_a_run_is_fed_params_rows_epochs_files_and_its_exit_code(tmp_path):
    t = Recorder()
    t.on_message("not logged")  # messages do not open the run
    assert t.calls == []
    t.on_fit_start({})
    t.on_row(ROW)
    t.on_epoch_end(0, 1.0, 1280)
    t.on_fit_end({"best_acc": 0.75})
    (tmp_path / "model.safetensors").write_bytes(b"w")
    (tmp_path / "best.pt").write_bytes(b"c")
    files = {"model.safetensors": tmp_path / "model.safetensors", "checkpoints/best.pt": tmp_path / "best.pt"}
    t.on_run_end(0, {**files, "missing.yaml": tmp_path / "missing.yaml"})
    t.close()
    assert t.calls == [
        ("start", None, {"lr": 0.1}),  # None values are left out
        ("metrics", {"val/loss": 1.5, "val/acc1": 0.75, "val/acc5": 0.9, "val/lr": 0.01}, 1280),
        ("metrics", {"epoch": 0.0}, 1280),
        ("metrics", {"best_acc1": 0.75}, 1280),
        ("files", ["checkpoints/best.pt", "model.safetensors"]),  # only the files that exist
        ("tag", "best_checkpoint", str((tmp_path / "best.pt").resolve())),
        ("finish", 0),
    ]
    assert t.state_dict() == {"run_id": "new-run"}


def test_a_resumed_run_reopens_its_run_and_an_interrupted_one_finishes_with_its_code():
    t = Recorder()
    t.load_state_dict({"run_id": "abc"})
    t.set_stage("binary", 2, epoch_offset=3)  # a run in stages: a tag once open, epochs go on
    t.on_fit_start({})
    t.on_epoch_end(0, 1.0, 99)
    t.on_run_end(3, {"model.safetensors": Path("/nonexistent")})
    assert t.calls == [
        ("start", "abc", {"lr": 0.1}),
        ("tag", "stage", "binary"),
        ("metrics", {"epoch": 3.0, "stage": 2.0}, 99),
        ("finish", 3),  # no files after an interruption
    ]
    t.load_state_dict({"run_id": "other"})  # once open, a later stage's state changes nothing
    assert t.state_dict() == {"run_id": "abc"}


def test_close_without_run_end_finishes_by_whether_fit_ended():
    done, stopped = Recorder(), Recorder()
    for t in (done, stopped):
        t.on_fit_start({})
    done.on_fit_end({"best_acc": 0.5})
    done.close(), stopped.close()
    assert done.calls[-1] == ("finish", 0) and stopped.calls[-1] == ("finish", 1)
    unopened = Recorder()
    unopened.close()
    assert unopened.calls == []  # nothing opened, nothing finished


@pytest.mark.parametrize("fail_on", ["start", "metrics"])
def test_a_failing_backend_costs_one_warning_then_is_off(fail_on, capsys):
    said: list[str] = []
    t = Recorder(fail_on=fail_on, say=said.append)
    t.on_fit_start({})
    for _ in range(3):
        t.on_row(ROW)
        t.on_epoch_end(0, 1.0, 1280)
    t.on_run_end(0, {})
    t.close()
    assert len(said) == 1 and said[0].startswith("warning: --logger recorder failed (OSError:")
    assert "No space left on device" in said[0] and "the run goes on" in said[0]
    assert t.calls[-1] == ("abandon",) and sum(c[0] == fail_on for c in t.calls) == 1
    # without a say, the one warning goes to stderr
    quiet = Recorder(fail_on="metrics")
    quiet.on_row(ROW), quiet.on_row(ROW)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("bitrain: warning: --logger recorder failed")
