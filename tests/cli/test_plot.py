"""bitrain plot: a real PNG of the expected size from metrics.csv, one run or several, clear errors."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from bitrain.cli.plot import DEFAULT_NAME, DPI, FIGSIZE, read_metrics
from bitrain.errors import UserError

HEADER = "split,epoch,step,samples,loss,acc1,acc5,lr,samples_per_sec,epoch_time\n"


def _write_run(folder: Path, rows: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(HEADER + "".join(r + "\n" for r in rows))
    return folder


def _fake_run(folder: Path, epochs: int = 3, spe: int = 10, scale: float = 1.0) -> Path:
    rows = []
    for e in range(epochs):
        for b in (5, 10):
            step = e * spe + b
            rows.append(
                f"batch,{e},{step},{step * 32},{2.0 / (step + 1):.4f},0.5,0.9,{0.1 * scale * (1 - step / 40):.5f},1000,"
            )
        step = (e + 1) * spe
        rows.append(
            f"train,{e},{step},{step * 32},{1.0 / (e + 1)},{0.5 + 0.1 * e},0.9,{0.1 * scale * (1 - step / 40):.5f},,1.5"
        )
        rows.append(
            f"val,{e},{step},{step * 32},{1.2 / (e + 1)},{0.45 + 0.1 * e},0.88,{0.1 * scale * (1 - step / 40):.5f},,"
        )
    return _write_run(folder, rows)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_read_metrics_curves(tmp_path):
    c = read_metrics(_fake_run(tmp_path / "r"))
    assert c.train["x"] == [1, 2, 3] and c.val["x"] == [1, 2, 3]
    assert c.train["loss"] == pytest.approx([1.0, 0.5, 1 / 3])
    assert c.val["acc1"] == pytest.approx([45.0, 55.0, 65.0])  # percent
    # lr at fractional epochs: log rows at steps 5, 10 of 10 per epoch -> 0.5, 1.0, ...
    assert c.lr["x"][:3] == pytest.approx([0.5, 1.0, 1.0])
    assert len(c.lr["x"]) == 9 and c.lr["lr"][0] == pytest.approx(0.1 * (1 - 5 / 40), abs=1e-5)


def test_one_run_png_in_the_run_dir(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert run_cli("plot", run) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == run / DEFAULT_NAME
    assert _png_size(out) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def test_several_runs_overlaid_and_out(tmp_path, capsys):
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", epochs=5, scale=0.5)
    target = tmp_path / "plots" / "cmp.png"
    assert run_cli("plot", a, b, "--out", target) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert _png_size(target) == (1500, 450)
    assert not (a / DEFAULT_NAME).exists()
    # two runs draw more than one: the file differs from the single-run plot
    single = tmp_path / "single.png"
    assert run_cli("plot", a, "--out", single) == 0
    assert single.read_bytes() != target.read_bytes()


def test_real_training_run(tmp_path, capsys):
    run = tmp_path / "real"
    assert (
        run_cli(
            "train",
            "--dataset",
            "dummy",
            "--dummy-shape",
            "1,8,8",
            "--dummy-size",
            "32",
            "--batch-size",
            "8",
            "--epochs",
            "2",
            "--test-run",
            "--cpu",
            "--prefix",
            run,
        )
        == 0
    )
    capsys.readouterr()
    assert run_cli("plot", run) == 0
    assert _png_size(run / DEFAULT_NAME) == (1500, 450)
    assert read_metrics(run).val["x"] == [1, 2]


def test_errors(tmp_path, capsys, monkeypatch):
    empty = _write_run(tmp_path / "empty", [])
    only_batches = _write_run(tmp_path / "batches", ["batch,0,5,160,1.0,0.5,0.9,0.1,100,"])
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "metrics.csv").write_text("a,b\n1,2\n")
    good = _fake_run(tmp_path / "good")
    cases = [
        ((tmp_path / "nope",), "no metrics.csv"),
        ((empty,), "no finished epoch"),
        ((only_batches,), "no finished epoch"),
        ((wrong,), "missing columns"),
        ((good, "--out", tmp_path / "x.pdf"), "ending in .png"),
    ]
    for args, msg in cases:
        capsys.readouterr()
        assert run_cli("plot", *args) == 2
        assert msg in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert run_cli("plot", good) == 2
    assert "pip install" in capsys.readouterr().err


def test_api_raises_user_error(tmp_path):
    from bitrain.cli.plot import plot_runs

    with pytest.raises(UserError):
        plot_runs([])


def test_time_axis_from_epoch_time(tmp_path, capsys):
    """--x time: minutes of training from each epoch's epoch_time (1.5 s a fake epoch), linear inside an
    epoch; two runs of other epoch times overlay on one time axis; a run without epoch_time is one line."""
    c = read_metrics(_fake_run(tmp_path / "r"))
    assert c.minutes == pytest.approx([0.025, 0.05, 0.075])  # 1.5 s, 3 s, 4.5 s
    assert c.to_minutes(c.val["x"]) == pytest.approx([0.025, 0.05, 0.075])
    assert c.to_minutes([0.5, 2.5, 3.5]) == pytest.approx([0.0125, 0.0625, 0.0875])  # past the end: the last epoch's
    rows = (tmp_path / "r" / "metrics.csv").read_text().replace(",,1.5\n", ",,6.0\n")
    slow = _write_run(tmp_path / "slow", rows.splitlines(keepends=True)[1:])
    assert read_metrics(slow).minutes == pytest.approx([0.1, 0.2, 0.3])
    target = tmp_path / "t.png"
    assert run_cli("plot", tmp_path / "r", slow, "--x", "time", "--out", target) == 0
    assert _png_size(target) == (1500, 450)
    by_epoch = tmp_path / "e.png"
    assert run_cli("plot", tmp_path / "r", slow, "--out", by_epoch) == 0
    assert target.read_bytes() != by_epoch.read_bytes()
    untimed = _write_run(tmp_path / "untimed", [r.replace(",,6.0", ",,") for r in rows.splitlines()[1:]])
    capsys.readouterr()
    assert run_cli("plot", untimed, "--x", "time", "--out", tmp_path / "u.png") == 2
    assert "no epoch_time" in capsys.readouterr().err and not (tmp_path / "u.png").exists()
