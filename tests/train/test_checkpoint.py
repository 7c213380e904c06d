"""Checkpoint safety: checksums, corrupt/truncated files, disk full and read-only saves, code that
would run on unpickling, checkpoints of another model, non-finite loss."""

from __future__ import annotations

import errno
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from bitrain import files
from bitrain.errors import UserError
from bitrain.train import checkpoint as ckpt

SMALL = ["--cpu", "--epochs", "1", "--batch-size", "256", "--log-interval", "0"]


def _payload(step: int, value: float = 1.0) -> dict:
    return {
        "model": {"w": torch.full((4, 3), value), "b": torch.arange(3.0)},
        "trainer": {"epoch": 0, "step": step},
        "config": {"lr": 0.1},
    }


class _Touch:
    """Unpickling this would create ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_save_load_roundtrip_with_checksum(tmp_path):
    path = tmp_path / "a.pt"
    ckpt.save_checkpoint(path, _payload(7, 2.5))
    raw = torch.load(path, weights_only=True)  # loadable with the safe loader as is
    assert raw["format"] == "bitrain" and raw["version"] == 1 and len(raw["checksum"]) == 32
    got = ckpt.load_checkpoint(path)
    assert torch.equal(got["model"]["w"], torch.full((4, 3), 2.5)) and got["trainer"]["step"] == 7
    assert ckpt.checksum(got) == got["checksum"]
    assert ckpt.checksum({**got, "model": {**got["model"], "b": torch.tensor([0.0, 1.0, 2.5])}}) != got["checksum"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left


def test_changed_tensor_byte_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "a.pt"
    payload = _payload(1)
    payload = {"format": "bitrain", "version": 1, **payload}
    payload["checksum"] = ckpt.checksum(payload)
    payload["model"]["w"][0, 0] = 1.0000001  # content changed after the checksum was taken
    torch.save(payload, path)
    with pytest.raises(UserError, match=r"a\.pt is corrupt \(checksum mismatch\)"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_is_a_user_error_naming_it(tmp_path, damage):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, _payload(3))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(2000), "empty": b""}[damage])
    with pytest.raises(UserError, match="last.pt is unreadable or unsafe"):
        ckpt.load_checkpoint(path)


def test_find_resumable_skips_bad_files_and_takes_the_newest_good(tmp_path):
    ckpt.save_last(tmp_path, _payload(10))
    ckpt.save_last(tmp_path, _payload(20))
    ckpt.save_checkpoint(tmp_path / "model_0000_acc_0.5000.pt", _payload(15))
    assert ckpt.find_resumable(tmp_path)[1]["trainer"]["step"] == 20
    last = tmp_path / ckpt.LAST
    last.write_bytes(last.read_bytes()[:-300])  # a torn write that somehow got published
    with pytest.warns(UserWarning, match="skipping checkpoint .*last.pt is unreadable"):
        path, payload = ckpt.find_resumable(tmp_path)
    assert path.name == "model_0000_acc_0.5000.pt" and payload["trainer"]["step"] == 15
    assert ckpt.find_resumable(tmp_path / "nothing") is None


def test_save_last_keeps_previous_and_publishes_extras_first(tmp_path):
    ckpt.save_last(tmp_path, _payload(1, 1.0))
    ckpt.save_last(tmp_path, _payload(2, 2.0), also=[tmp_path / "best.pt"])
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["trainer"]["step"] == 2
    assert ckpt.load_checkpoint(tmp_path / "last.prev.pt")["trainer"]["step"] == 1
    assert ckpt.load_checkpoint(tmp_path / "best.pt")["trainer"]["step"] == 2
    ckpt.save_last(tmp_path, _payload(3, 3.0))  # best.pt is not touched by later saves
    assert ckpt.load_checkpoint(tmp_path / "best.pt")["trainer"]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]


def test_death_just_before_last_moves_loses_nothing(tmp_path, monkeypatch):
    """The process dies after best.pt was published but before last.pt moved on: the old last.pt
    is intact and complete, and the leftover temp file is cleaned at the next start."""
    ckpt.save_last(tmp_path, _payload(1, 1.0))
    real_replace = os.replace

    def die_at_last(src, dst):
        if Path(dst).name == ckpt.LAST:
            raise SystemExit("killed")  # not an OSError: nothing in save_last may tidy up
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", die_at_last)
    with pytest.raises(SystemExit):
        ckpt.save_last(tmp_path, _payload(2, 2.0), also=[tmp_path / "best.pt"])
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "best.pt")["trainer"]["step"] == 2
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["trainer"]["step"] == 1
    assert ckpt.load_checkpoint(tmp_path / "last.prev.pt")["trainer"]["step"] == 1
    assert [p.name for p in tmp_path.glob(".last.pt.new-*")]
    ckpt.clean_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]
    assert ckpt.find_resumable(tmp_path)[0].name == "last.pt"


class _FullDisk:
    """A file whose writes stop after ``room`` bytes with ENOSPC, like a full disk."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(data[: self.room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_full(monkeypatch, room: int = 1000) -> None:
    real_open = open
    monkeypatch.setattr(files, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), room), raising=False)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_last(tmp_path, _payload(1, 1.0))
    before = (tmp_path / "last.pt").read_bytes()
    _disk_full(monkeypatch)
    with pytest.raises(
        ckpt.CheckpointWriteError, match="No space left on device; the previous checkpoint is intact"
    ) as e:
        ckpt.save_last(tmp_path, _payload(2, 2.0), also=[tmp_path / "best.pt"])
    assert e.value.errno == errno.ENOSPC
    assert (tmp_path / "last.pt").read_bytes() == before
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["trainer"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no half-written temp file, no best.pt


def test_read_only_folder_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_last(tmp_path, _payload(1, 1.0))

    def read_only(*args, **kwargs):  # chmod does not stop root, so the failure is injected
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files, "open", read_only, raising=False)
    with pytest.raises(ckpt.CheckpointWriteError, match="Read-only file system"):
        ckpt.save_last(tmp_path, _payload(2, 2.0))
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["trainer"]["step"] == 1


def test_disk_full_during_training_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = ckpt.save_checkpoint
    calls = {"n": 0}

    def fill_up_after_two(path, payload):
        calls["n"] += 1
        if calls["n"] > 2:
            _disk_full(monkeypatch, room=4096)
        real_save(path, payload)

    monkeypatch.setattr(ckpt, "save_checkpoint", fill_up_after_two)
    assert run_cli("train", *SMALL, "--checkpoint-interval", "1", "--prefix", run) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "previous checkpoint is intact" in err[0]
    monkeypatch.undo()
    assert ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_checkpoint_that_runs_code_on_load_is_refused(tmp_path, container, capsys):
    marker = tmp_path / "pwned"
    evil = {"format": "bitrain", "version": 1, "model": {"w": torch.ones(1)}, "x": _Touch(marker)}
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    if container == "torch":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    with pytest.raises(UserError, match="unreadable or unsafe"):
        ckpt.load_checkpoint(path)
    assert run_cli("train", *SMALL, "--resume", path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt is unreadable or unsafe" in err[0]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ckpt.find_resumable(path.parent) is None
    assert not marker.exists()


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert run_cli("train", *SMALL, "--prefix", run) == 0
    return run


def test_checkpoint_of_another_shape_exits_2_naming_the_keys(one_epoch, tmp_path, capsys):
    payload = ckpt.load_checkpoint(one_epoch / "checkpoints" / "last.pt")
    key = next(k for k, v in payload["model"].items() if v.dim() == 2)  # the classifier weight
    payload["model"][key] = torch.zeros(3, 5)
    other = tmp_path / "other.pt"
    ckpt.save_checkpoint(other, {k: v for k, v in payload.items() if k not in ("format", "version", "checksum")})
    assert run_cli("train", *SMALL, "--prefix", tmp_path / "run", "--resume", other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match this model/config" in err[0]
    assert key in err[0] and "torch.Size([3, 5])" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_explicit_corrupt_checkpoint_exits_2_and_auto_skips_it(one_epoch, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    last = run / "checkpoints" / "last.pt"
    good = ckpt.load_checkpoint(last)
    last.write_bytes(last.read_bytes()[:5000])
    assert run_cli("train", *SMALL, "--prefix", run, "--resume", last) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {last} is unreadable" in err[0]
    assert last.stat().st_size == 5000  # nothing touched
    # auto: the corrupt last.pt is skipped with a warning; best.pt (same step as the old last.pt) is used
    with pytest.warns(UserWarning, match="skipping checkpoint .*last.pt"):
        assert run_cli("train", *SMALL, "--prefix", run, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "best.pt" in out and f"step {good['trainer']['step']}" in out
    assert (run / "model.safetensors").is_file()


def test_non_finite_loss_exits_1_naming_the_step_and_keeps_the_last_good(tmp_path, capsys):
    run = tmp_path / "run"
    code = run_cli(
        "train",
        *SMALL,
        "--bits",
        "32",
        "--bits-a",
        "32",
        "--activation-method",
        "identity",
        "--optimizer",
        "sgd",
        "--momentum",
        "0",
        "--lr",
        "1e30",
        "--checkpoint-interval",
        "1",
        "--prefix",
        run,
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became non-finite at step" in err and "the last good checkpoint is kept" in err
    files = list((run / "checkpoints").glob("*.pt"))
    for p in files:  # every checkpoint left is loadable and holds finite weights
        model = ckpt.load_checkpoint(p)["model"]
        assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def test_skip_nonfinite_skips_and_counts(tmp_path, capsys):
    run = tmp_path / "run"
    code = run_cli(
        "train",
        *SMALL,
        "--bits",
        "32",
        "--bits-a",
        "32",
        "--activation-method",
        "identity",
        "--optimizer",
        "sgd",
        "--momentum",
        "0",
        "--lr",
        "1e30",
        "--skip-nonfinite",
        "--prefix",
        run,
    )
    out = capsys.readouterr().out
    assert code == 0 and "non-finite loss, step skipped" in out
    state = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]
    assert state["nonfinite_skipped"] >= 1 and state["step"] == 5


def test_every_load_in_the_package_is_pickle_free():
    """A source scan: torch.load always with weights_only=True, np.load never with pickles."""
    import re

    import bitrain

    root = Path(bitrain.__file__).parent
    calls = []
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"\b(torch\.load|np\.load|numpy\.load|pickle\.loads?)\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):  # the call's full argument text
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, m.group(1), text[m.end() : i - 1]))
    assert any(name == "checkpoint.py" for name, _, _ in calls)
    for name, fn, args in calls:
        if fn == "torch.load":
            assert "weights_only=True" in args, f"{name}: torch.load({args})"
        elif fn in ("np.load", "numpy.load"):
            assert "allow_pickle=False" in args, f"{name}: {fn}({args})"
        else:  # plain pickle runs code; CIFAR's reader subclasses Unpickler with an allow-list instead
            raise AssertionError(f"{name}: {fn}({args}) unpickles without restrictions")
