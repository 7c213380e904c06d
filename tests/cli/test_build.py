"""cli/build.py and the facts the API and the CLI share: one dummy-classes rule, one lr_steps default,
and the builders giving the Trainer's parts the config's values."""

from __future__ import annotations

import pytest
from conftest import run_cli

from bitrain.cli import build as B
from bitrain.cli import config as C
from bitrain.data import build_data
from bitrain.errors import UserError
from bitrain.train.schedules import DEFAULT_LR_STEPS, lr_at, make_schedule


def test_one_dummy_classes_rule_for_the_api_and_the_cli(tmp_path, capsys):
    small = {"dummy_shape": (1, 8, 8), "dummy_size": 16, "batch_size": 4}
    with pytest.raises(UserError, match="--dummy-classes must be at least 2, got 1"):
        build_data("dummy", dummy_classes=1, **small)
    assert build_data("dummy", dummy_classes=2, **small)[2].num_classes == 2
    args = (
        "train",
        "--cpu",
        "--dataset",
        "dummy",
        "--dummy-shape",
        "1,8,8",
        "--dummy-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "4",
    )
    capsys.readouterr()
    assert run_cli(*args, "--dummy-classes", "1", "--prefix", tmp_path / "one") == 2
    err = capsys.readouterr().err.strip()
    assert "--dummy-classes must be at least 2, got 1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "one").exists()  # refused before the run directory
    assert run_cli(*args, "--dummy-classes", "2", "--test-run", "--prefix", tmp_path / "two") == 0


def test_one_lr_steps_default_for_the_api_and_the_cli():
    cfg = C.from_layers({"lr_mode": "step", "epochs": 100})
    assert tuple(C.parse_floats("lr_steps", cfg.lr_steps)) == DEFAULT_LR_STEPS == (30, 60, 90)
    api = make_schedule(lr=0.1, mode="step", steps_per_epoch=2, epochs=100)
    cli = B.build_schedule(cfg.with_(lr=0.1), steps_per_epoch=2)
    assert [api(s) for s in range(0, 200, 7)] == [cli(s) for s in range(0, 200, 7)]
    assert lr_at(61 * 2, lr=1.0, mode="step", steps_per_epoch=2, epochs=100) == pytest.approx(0.01)


def test_builders_carry_the_config_into_the_parts(tmp_path):
    cfg = C.from_layers(
        {
            "label_smoothing": 0.1,
            "mixup": True,
            "mixup_alpha": 0.4,
            "distill_alpha": 0.5,
            "save_frequency": 3,
            "checkpoint_interval": 7,
            "interrupt_at": 2,
            "test_run": True,
            "bn_recalibrate": 4,
            "profile": True,
            "mode": "hybrid",
            "model": "lenet",
        }
    )
    loss = B.build_loss(cfg)
    assert (loss.label_smoothing, loss.mixup_alpha, loss.distill_alpha, loss.seed) == (0.1, 0.4, 0.5, 123)
    assert B.build_loss(cfg.with_(mixup=False)).mixup_alpha is None
    saver = B.build_saver(cfg, tmp_path, {"k": 1})
    assert saver.folder == tmp_path / "checkpoints" and saver.name == "lenet_1bit"
    assert (saver.save_frequency, saver.checkpoint_interval, saver.extra) == (3, 7, {"k": 1})
    stop = B.build_stop(cfg)
    assert stop.interrupt_at == 2 and stop.steps_per_epoch(range(50)) == 1
    options = B.build_loop_options(cfg, tmp_path)
    assert options.bn_recalibrate == 4 and options.profile_dir == tmp_path / "profile"
    assert B.build_placement(cfg, "cpu").compile  # BMXNet's --mode hybrid


def test_range_checks_the_api_needs_too_are_checked_once_for_the_cli(tmp_path, capsys):
    for flag, value in (("--bn-recalibrate", "-1"), ("--distill-temperature", "0"), ("--label-smoothing", "1")):
        capsys.readouterr()
        assert run_cli("train", "--cpu", "--epochs", "1", "--prefix", tmp_path / "x", flag, value) == 2
        assert flag in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
