"""Bad input: each case exits 2 with one line on stderr naming the option or file (and the valid
values), no traceback, and leaves an existing run directory byte for byte as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

import bitrain
from bitrain.train import checkpoint as ckpt


def _pythonpath() -> str:
    """The bitrain this test imported, for the child process (a PYTHONPATH given by the caller first)."""
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(Path(bitrain.__file__).parents[1])]))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A finished run of another model (lenet) in the folder every bad command points at."""
    run = tmp_path_factory.mktemp("bad") / "run"
    assert run_cli("train", "--cpu", "--model", "lenet", "--test-run", "--epochs", "1", "--prefix", run) == 0
    return run


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
        return path

    return write


def _one_line_error(capsys, code: int, *needles: str) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert code == 2, cap.err
    assert len(err) == 1 and err[0].startswith("bitrain"), err
    assert "Traceback" not in cap.err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


CASES = {
    "unknown flag": (["--lr-mod", "cosine"], ["unrecognized arguments: --lr-mod", "did you mean '--lr-mode'"]),
    "flag abbreviation": (["--epoch", "3"], ["unrecognized arguments: --epoch", "did you mean '--epochs'"]),
    "wrong type": (["--epochs", "two"], ["--epochs must be an integer, got 'two'"]),
    "wrong float": (["--lr", "fast"], ["--lr must be a number, got 'fast'"]),
    "negative lr": (["--lr", "-1"], ["--lr must be positive"]),
    "momentum range": (["--momentum", "1.5"], ["--momentum must be in [0, 1)"]),
    "zero batch": (["--batch-size", "0"], ["--batch-size must be at least 1"]),
    "bad choice": (["--lr-mode", "exp"], ["--lr-mode 'exp' is not valid; choose from: step, poly, cosine, linear"]),
    "bad bits": (["--bits", "9"], ["--bits 9 is not valid; choose from: 1, 2"]),
    "k-bit with a 1-bit quantizer": (["--bits", "2"], ["--bits 2 needs a k-bit --weight-quantization"]),
    "abc": (["--approximation", "abc"], ["--approximation abc is not supported"]),
    "unknown dataset": (["--dataset", "cifar11"], ["--dataset 'cifar11' is not valid; choose from: digits"]),
    "unknown model": (
        ["--model", "resnet18_x"],
        ["unknown model 'resnet18_x'", "did you mean", "valid: binary_alexnet, birealnet18"],
    ),
    "unknown activation quantizer": (["--activation-method", "sgn"], ["'sgn' is unknown; valid: ", "det_sign"]),
    "unknown weight quantizer": (["--weight-quantization", "foo"], ["'foo' is unknown; valid: ", "ste_sign"]),
    "batch larger than data": (["--batch-size", "5000"], ["--batch-size 5000 is larger than the train split", "1442"]),
    "missing data dir": (
        ["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"],
        ["mnist files not found", "/nonexistent/mnist"],
    ),
    "missing checkpoint": (["--resume", "/nonexistent/last.pt"], ["checkpoint /nonexistent/last.pt does not exist"]),
    "missing config": (["--config", "/nonexistent/c.yaml"], ["--config /nonexistent/c.yaml does not exist"]),
    "bad gpus": (["--gpus", "0,x"], ["--gpus must be comma-separated integers"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_flag_exits_2_with_one_line_and_keeps_the_run_dir(name, old_run, capsys):
    argv, needles = CASES[name]
    before = _snapshot(old_run)
    code = run_cli("train", "--cpu", "--epochs", "1", *argv, "--prefix", old_run, "--overwrite")
    _one_line_error(capsys, code, *needles)
    assert _snapshot(old_run) == before


def test_empty_data_dir_and_empty_data_set(tmp_path, old_run, capsys):
    before = _snapshot(old_run)
    (tmp_path / "empty").mkdir()
    code = run_cli("train", "--cpu", "--dataset", "cifar10", "--data-dir", tmp_path / "empty", "--prefix", old_run)
    _one_line_error(capsys, code, "cifar10 files not found", str(tmp_path / "empty"))
    for split in ("train/cat", "val/cat"):  # a class tree without a single image
        (tmp_path / "tree" / split).mkdir(parents=True)
    code = run_cli("train", "--cpu", "--dataset", "imagefolder", "--data-dir", tmp_path / "tree", "--prefix", old_run)
    _one_line_error(capsys, code, f"--data-dir {tmp_path / 'tree'}: no images")
    assert _snapshot(old_run) == before


def test_config_file_errors(yaml_file, old_run, capsys):
    before = _snapshot(old_run)
    cases = [
        ("lr_mdoe: cosine\n", ["unknown option 'lr_mdoe'", "did you mean 'lr_mode'"]),
        ("epochs: [1, 2]\n", ["--epochs must be an integer"]),
        ("lr: -0.5\n", ["--lr must be positive"]),
        ("epochs: 3\n  lr: [\n", ["is not valid YAML"]),
        ("- just\n- a list\n", ["must hold a mapping of option: value"]),
    ]
    for text, needles in cases:
        code = run_cli("train", "--cpu", "--config", yaml_file(text), "--prefix", old_run)
        _one_line_error(capsys, code, *needles)
    assert _snapshot(old_run) == before


def test_run_dir_of_another_model_is_refused_then_resumed_or_overwritten(old_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    before = _snapshot(run)
    code = run_cli("train", "--cpu", "--test-run", "--epochs", "1", "--prefix", run)
    _one_line_error(capsys, code, f"--prefix {run} already holds a run (model lenet)", "--resume auto", "--overwrite")
    assert _snapshot(run) == before
    # resuming it with another model: refused naming the keys, nothing written
    code = run_cli("train", "--cpu", "--resume", "auto", "--model", "tiny_resnet_e", "--prefix", run)
    _one_line_error(capsys, code, "does not match this model/config", "Missing key(s)")
    assert _snapshot(run) == before
    # resuming it as it is: the lenet run is already finished, so it only re-exports
    assert run_cli("train", "--cpu", "--resume", "auto", "--prefix", run) == 0
    assert "resumed from" in capsys.readouterr().out
    assert ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["model_args"]["name"] == "lenet"
    # --overwrite starts over there with the new model
    assert run_cli("train", "--cpu", "--test-run", "--epochs", "1", "--prefix", run, "--overwrite") == 0
    assert ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["model_args"]["name"] == "tiny_resnet_e"


def test_resume_auto_with_nothing_to_resume_starts_fresh(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "--cpu", "--test-run", "--epochs", "1", "--resume", "auto", "--prefix", run) == 0
    cap = capsys.readouterr()
    assert f"--resume auto: nothing to resume in {run}; starting fresh" in cap.err
    assert (run / "checkpoints" / "last.pt").is_file()
    code = run_cli("train", "--cpu", "--resume", "auto")
    _one_line_error(capsys, code, "--resume auto needs --prefix")


def test_unknown_command_and_real_process_output(tmp_path):
    """Through a real process: exit 2, one stderr line, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=_pythonpath())
    for argv, needle in (
        (["trian"], "unknown command 'trian'; did you mean 'train'?"),
        (["train", "--lr-mod", "cosine"], "did you mean '--lr-mode'?"),
        (["train", "--cpu", "--resume", str(tmp_path / "x.pt")], "does not exist"),
    ):
        p = subprocess.run(
            [sys.executable, "-m", "bitrain", *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
        )
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr
        assert not (tmp_path / "runs").exists()


def test_prefix_that_cannot_be_created_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = run_cli("train", "--cpu", "--test-run", "--epochs", "1", "--prefix", blocker / "run")
    _one_line_error(capsys, code, f"--prefix {blocker / 'run'} is not writable")
    assert blocker.read_text() == "not a folder"
