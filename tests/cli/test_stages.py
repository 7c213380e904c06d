"""Training in stages (issue 22): a float teacher stage, binary activations taught by it, then binary
weights too, on digits in one ``bitrain train --config``; resume after an interrupt inside a stage and
between two, a SIGKILL in the last stage, ``--stage NAME``, the bad stages refused before anything runs,
and the stages listed by ``--dry-run`` / ``bitrain summary``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import assert_same_weights, final_weights, read_rows, run_cli

import bitrain

SHARED = {
    "model": "tiny_resnet_e",
    "dataset": "digits",
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 0.01,
    "lr_mode": "cosine",
    "epochs": 1,
    "log_interval": 4,
    "bn_recalibrate": 2,
    "cpu": True,
}
STAGES = [
    {"name": "float", "bits": 32, "bits_a": 32},
    {"name": "binary_act", "bits": 32, "bits_a": 1, "teacher": "float"},
    {"name": "binary", "bits": 1, "bits_a": 1, "teacher": "float", "epochs": 2},
]


def _yaml(path: Path, stages: list[dict] | None = None, **shared) -> Path:
    path.write_text(yaml.safe_dump({**SHARED, **shared, "stages": stages or STAGES}, sort_keys=False))
    return path


def _with(name: str, **changes) -> list[dict]:
    """STAGES with ``changes`` in stage ``name``."""
    return [{**s, **changes} if s["name"] == name else dict(s) for s in STAGES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted three-stage run."""
    folder = tmp_path_factory.mktemp("stages")
    run = folder / "run"
    assert run_cli("train", "--config", _yaml(folder / "stages.yaml"), "--prefix", run) == 0
    return run


def test_three_stages_in_one_command(reference, tmp_path, capsys):
    run = reference
    for name in ("float", "binary_act", "binary"):
        assert (run / "stages" / name / "checkpoints" / "last.pt").is_file()
        assert (run / "stages" / name / "checkpoints" / "best.pt").is_file()
        assert (run / "stages" / name / "model.safetensors").is_file()
    assert_same_weights(final_weights(run), final_weights(run / "stages" / "binary"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert [s["name"] for s in saved["stages"]] == ["float", "binary_act", "binary"]
    rows = read_rows(run, "val")
    assert [r["stage"] for r in rows] == ["float", "binary_act", "binary", "binary"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # epochs and samples go on across stages
    samples = [int(r["samples"]) for r in rows]
    assert samples == sorted(samples) and samples[0] > 0 and len(set(samples)) == 4
    tags = _tb_scalars(run)  # TensorBoard's step: samples since the first stage began
    assert [step for step, _ in tags["accuracy/validation"]] == samples
    assert [v for _, v in tags["accuracy/validation"]] == pytest.approx([float(r["acc1"]) for r in rows])
    log = (run / "train.log").read_text()
    assert "[Stage 1/3 float]" in log and "[Stage 3/3 binary]" in log and "0 stage(s) after it" in log
    from bitrain.cli.export import export_checkpoint
    from bitrain.cli.plot import plot_runs, read_metrics

    assert read_metrics(run).stages == [(0.0, "float"), (1.0, "binary_act"), (2.0, "binary")]  # plot marks them
    assert plot_runs([run], tmp_path / "curves.png").stat().st_size > 0

    info = export_checkpoint(run / "stages" / "binary" / "checkpoints" / "last.pt", tmp_path / "m.safetensors")
    assert info["packed_layers"] > 0  # the final model is 1-bit


def _tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


@pytest.mark.parametrize("where", ["binary", "binary_act"])
def test_interrupted_then_resumed_is_bit_identical(reference, tmp_path, where):
    """--interrupt-at inside the last stage (after its first of two epochs), or at the end of the
    second stage (its checkpoint written, its model not yet): --resume auto ends where the
    uninterrupted run did, bit for bit, and metrics.csv holds each row once."""
    run = tmp_path / "run"
    config = _yaml(tmp_path / "s.yaml", _with(where, interrupt_at=1))
    assert run_cli("train", "--config", config, "--prefix", run) == 3
    finished = ["float", "binary_act"] if where == "binary" else ["float"]
    import json

    assert [r["name"] for r in json.loads((run / "stages" / "finished.json").read_text())["finished"]] == finished
    assert not (run / "model.safetensors").exists()
    assert run_cli("train", "--prefix", run, "--resume", "auto") == 0  # config.yaml holds the stages
    assert_same_weights(final_weights(run), final_weights(reference))
    strip = ("samples_per_sec", "epoch_time")
    rows = [{k: v for k, v in r.items() if k not in strip} for r in read_rows(run)]
    assert rows == [{k: v for k, v in r.items() if k not in strip} for r in read_rows(reference)]
    skip = ("training/epoch-time",)  # wall time
    ours, theirs = _tb_scalars(run), _tb_scalars(reference)
    assert {t: v for t, v in ours.items() if t not in skip} == {t: v for t, v in theirs.items() if t not in skip}


@pytest.mark.parametrize(
    ("sig", "watch", "code"),
    [
        (signal.SIGKILL, "binary/checkpoints/last.pt", -signal.SIGKILL),
        (signal.SIGTERM, "binary_act/checkpoints/last.pt", 3),
        (signal.SIGTERM, "float/model.safetensors", 3),
    ],
    ids=["sigkill-last-stage", "sigterm-second-stage", "sigterm-between-stages"],
)
def test_killed_inside_or_between_stages_resumes_bit_identical(reference, tmp_path, sig, watch, code):
    """A signal as soon as RUN/stages/``watch`` appears: a stage's first mid-epoch checkpoint (SIGTERM:
    the trainer saves and exits 3; SIGKILL: nothing more is written), or the first stage's final
    model (SIGTERM between two stages, or early in the second: exit 3); --resume auto ends as the
    uninterrupted run."""
    run = tmp_path / "run"
    config = _yaml(tmp_path / "s.yaml", checkpoint_interval=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CI="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(Path(bitrain.__file__).parents[1])]))
    cmd = [sys.executable, "-m", "bitrain", "train", "--config", str(config), "--prefix", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    target = run / "stages" / watch
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait()
    assert proc.returncode == code, "the run ended before the signal"
    assert run_cli("train", "--prefix", run, "--resume", "auto") == 0
    assert_same_weights(final_weights(run), final_weights(reference))
    assert [r["loss"] for r in read_rows(run, "val")] == [r["loss"] for r in read_rows(reference, "val")]


def test_stage_reruns_one_stage_from_the_one_before(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = _yaml(tmp_path / "s.yaml")
    assert run_cli("train", "--config", config, "--prefix", run, "--stage", "binary") == 0
    assert_same_weights(final_weights(run), final_weights(reference))  # the same start, the same seed
    assert len(read_rows(run)) == len(read_rows(reference))  # the rerun stage's old rows are gone
    # a stage whose stage before has not finished cannot start
    other = tmp_path / "other"
    assert run_cli("train", "--config", config, "--prefix", other, "--stage", "binary") == 2


BAD = {
    "unknown option": (_with("binary", bitz=1), "unknown option 'bitz'"),
    "later teacher": (_with("binary_act", teacher="binary"), "later stage"),
    "own teacher": (_with("float", teacher="float"), "this stage itself"),
    "no such teacher": (_with("binary", teacher="flaot"), "neither an earlier stage"),
    "duplicate": ([*STAGES, {"name": "float"}], "two stages are named 'float'"),
    "weights do not fit": (_with("binary", model="small_reactnet"), "weights do not fit"),
    "data set changed": (_with("binary", dataset="mnist"), "changes dataset"),
    "whole-run option": (_with("binary", prefix="x"), "is for the whole run"),
    "not a list": ({"name": "x"}, "must be a non-empty list"),
    "init_from in a later stage": (_with("binary", init_from="x.pt"), "init_from is for the first stage"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_stage_exits_2_with_one_line(case, tmp_path, capsys):
    stages, message = BAD[case]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SHARED, "stages": stages}, sort_keys=False))
    assert run_cli("train", "--config", path, "--prefix", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_stage_without_stages_is_refused(capsys):
    assert run_cli("train", "--stage", "float", "--dry-run") == 2
    assert "needs a --config" in capsys.readouterr().err


def test_dry_run_and_summary_list_every_stage(tmp_path, capsys):
    config = _yaml(tmp_path / "s.yaml")
    for command in (("train", "--dry-run"), ("summary",)):
        assert run_cli(*command, "--config", config) == 0
        out = capsys.readouterr().out
        assert "3 stages" in out
        lines = {line.split()[1]: line.split() for line in out.splitlines() if line.strip()[:1].isdigit()}
        assert lines["float"][3:6] == ["32", "32", "1"]
        assert lines["binary_act"][3:5] == ["32", "1"] and "stage float" in " ".join(lines["binary_act"])
        assert lines["binary"][3:6] == ["1", "1", "2"]


@pytest.mark.slow
def test_two_ranks_interrupted_in_the_last_stage_resume_bit_identical(tmp_path):
    """--cpu --gpus 0,1: two ranks run every stage (rank 0 writes); an interrupt in the last stage
    and --resume auto end where the uninterrupted two-rank run does."""
    ranks = ("--gpus", "0,1")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli("train", "--config", _yaml(tmp_path / "a.yaml"), *ranks, "--prefix", whole) == 0
    config = _yaml(tmp_path / "b.yaml", _with("binary", interrupt_at=1))
    assert run_cli("train", "--config", config, *ranks, "--prefix", cut) == 3
    assert run_cli("train", "--prefix", cut, "--resume", "auto", *ranks) == 0
    assert_same_weights(final_weights(cut), final_weights(whole))
    assert [r["loss"] for r in read_rows(cut, "val")] == [r["loss"] for r in read_rows(whole, "val")]


def test_resume_of_a_finished_run_and_of_a_run_without_stages(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert run_cli("train", "--prefix", run, "--resume", "auto") == 0
    assert "all 3 stages" in capsys.readouterr().out
    assert_same_weights(final_weights(run), final_weights(reference))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text("model: tiny_resnet_e\n")
    assert run_cli("train", "--config", _yaml(tmp_path / "s.yaml"), "--prefix", plain, "--resume", "auto") == 2
    assert "holds a run without stages" in capsys.readouterr().err
