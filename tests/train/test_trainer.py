"""End-to-end behaviour of ``bitrain train``: files, metrics, checkpoints, determinism, resume."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import assert_same_weights, final_weights, read_rows, run_cli

SMALL = ("--epochs", "2", "--batch-size", "64", "--log-interval", "5")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("small") / "run"
    assert (
        run_cli(
            "train",
            "--prefix",
            run,
            *SMALL,
            "--save-frequency",
            "1",
            "--write-summary",
            "--progress",
            run.parent / "progress.txt",
        )
        == 0
    )
    return run


def test_default_run_reaches_97_percent(tmp_path):
    """`bitrain train` with no options: binary net on digits, >= 97 % validation top-1."""
    assert run_cli("train", "--prefix", tmp_path / "run") == 0
    val = read_rows(tmp_path / "run", "val")
    best = max(float(r["acc1"]) for r in val)
    assert best >= 0.97, best


def test_run_directory_contract(small_run):
    for name in (
        "config.yaml",
        "train.log",
        "metrics.csv",
        "model.safetensors",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (small_run / name).is_file(), name
    numbered = sorted(p.name for p in (small_run / "checkpoints").glob("tiny_resnet_e_1bit_*_acc_*.pt"))
    assert [n[:26] for n in numbered] == ["tiny_resnet_e_1bit_0000_ac", "tiny_resnet_e_1bit_0001_ac"]
    log = (small_run / "train.log").read_text()
    assert "Epoch[0] Batch [5]" in log and "Speed:" in log and "samples/sec" in log
    assert "[Epoch 1] time cost:" in log and "[Epoch 1] validation: accuracy=" in log
    assert "top_k_accuracy_5=" in log and "lr=" in log
    progress = (small_run.parent / "progress.txt").read_text()
    assert progress.startswith("Epoch ETA: ") and ", Train ETA: " in progress


def test_checkpoint_loads_weights_only_and_holds_everything(small_run):
    ck = torch.load(small_run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["format"] == "bitrain" and ck["version"] == 1
    assert {"model", "optimizer", "scaler", "trainer", "rng", "config", "model_args", "checksum"} <= ck.keys()
    assert ck["trainer"]["epoch"] == 2 and ck["trainer"]["batch"] == 0
    assert ck["trainer"]["step"] == 2 * (1442 // 64)
    assert ck["model_args"]["name"] == "tiny_resnet_e"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])


def test_metrics_csv_rows_and_exact_validation(small_run):
    rows = read_rows(small_run)
    assert set(rows[0]) == {
        "split",
        "epoch",
        "step",
        "samples",
        "loss",
        "acc1",
        "acc5",
        "lr",
        "samples_per_sec",
        "epoch_time",
    }
    train, val = read_rows(small_run, "train"), read_rows(small_run, "val")
    assert [r["epoch"] for r in train] == ["0", "1"] and [r["epoch"] for r in val] == ["0", "1"]
    assert all(0 <= float(r["acc1"]) <= float(r["acc5"]) <= 1 for r in train + val)
    assert int(train[-1]["samples"]) == 2 * (1442 // 64) * 64
    # the logged validation top-1 equals an independent count over the whole val split
    from bitrain.data import build_data
    from bitrain.models import build_model

    ck = torch.load(small_run / "checkpoints" / "last.pt", weights_only=True)
    model = build_model(**ck["model_args"])
    model.load_state_dict(ck["model"])
    model.eval()
    _, val_loader, info = build_data("digits", batch_size=64)
    correct = n = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += int((model(x).argmax(1) == y).sum())
            n += len(y)
    assert n == info.num_val == 355
    assert float(val[-1]["acc1"]) == pytest.approx(correct / n, abs=1e-9)


def test_tensorboard_tags_and_samples_as_global_step(small_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(small_run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for metric in ("accuracy", "top_k_accuracy_5", "loss"):
        for split in ("batch", "training", "validation"):
            assert f"{metric}/{split}" in tags
    assert {"training/lr", "training/epoch", "training/epoch-time"} <= tags
    steps = [e.step for e in ea.Scalars("accuracy/training")]
    assert steps == [22 * 64, 44 * 64]  # samples seen, not iterations
    hist = set(ea.Tags()["histograms"])
    name = next(iter(h for h in hist if not h.endswith("-grad")))
    assert f"{name}-grad" in hist
    assert len(ea.Histograms(name)) == 3  # before training and after each of 2 epochs


def test_same_seed_same_weights_and_config_repeats_the_run(small_run, tmp_path):
    assert run_cli("train", "--prefix", tmp_path / "again", *SMALL) == 0
    assert_same_weights(final_weights(small_run), final_weights(tmp_path / "again"))
    assert run_cli("train", "--config", small_run / "config.yaml", "--prefix", tmp_path / "from_yaml") == 0
    assert_same_weights(final_weights(small_run), final_weights(tmp_path / "from_yaml"))


def test_interrupt_at_exits_3_and_resume_is_bit_identical(small_run, tmp_path):
    run = tmp_path / "interrupted"
    assert run_cli("train", "--prefix", run, *SMALL, "--interrupt-at", "1") == 3
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["trainer"]["epoch"] == 1
    assert list((run / "checkpoints").glob("tiny_resnet_e_1bit_0000_acc_*.pt"))  # forced numbered save
    assert not (run / "model.safetensors").exists()
    assert run_cli("train", "--prefix", run, "--resume", "auto") == 0  # config comes from the checkpoint
    assert_same_weights(final_weights(small_run), final_weights(run))
    assert [r["epoch"] for r in read_rows(run, "val")] == ["0", "1"]


def test_test_run_trains_one_batch_per_epoch(tmp_path):
    assert run_cli("train", "--prefix", tmp_path / "t", "--test-run", "--epochs", "3", "--batch-size", "16") == 0
    train = read_rows(tmp_path / "t", "train")
    assert [int(r["samples"]) for r in train] == [16, 32, 48]


def test_dry_run_prints_summary_and_writes_nothing(tmp_path, capsys):
    assert run_cli("train", "--dry-run", "--prefix", tmp_path / "d") == 0
    out = capsys.readouterr().out
    assert "Combined FLOPs" in out
    assert not (tmp_path / "d").exists()


def test_warmup_lr_is_honoured(tmp_path):
    run = tmp_path / "w"
    assert (
        run_cli(
            "train",
            "--prefix",
            run,
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--log-interval",
            "1",
            "--warmup-epochs",
            "1",
            "--warmup-lr",
            "0.001",
            "--lr",
            "0.01",
            "--lr-mode",
            "step",
        )
        == 0
    )
    lrs = [float(r["lr"]) for r in read_rows(run, "batch")]
    # the row after batch b logs the lr used for step b-1: warmup from 0.001 up to 0.01
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[10] == pytest.approx(0.001 + 0.009 * 10 / 22)
    assert lrs[30] == pytest.approx(0.01)


def test_run_dir_of_another_run_is_refused(small_run, capsys):
    before = sorted(p.name for p in small_run.rglob("*"))
    assert run_cli("train", "--prefix", small_run, "--epochs", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0]
    assert sorted(p.name for p in small_run.rglob("*")) == before


def test_mixup_and_label_smoothing_train(tmp_path):
    run = tmp_path / "m"
    assert (
        run_cli(
            "train",
            "--prefix",
            run,
            "--test-run",
            "--epochs",
            "2",
            "--mixup",
            "--label-smoothing",
            "--optimizer",
            "sgd",
            "--wd",
            "1e-4",
        )
        == 0
    )
    assert all(math.isfinite(float(r["loss"])) for r in read_rows(run, "train"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["mixup"] is True and cfg["label_smoothing"] == 0.1


def test_profile_writes_a_trace(tmp_path):
    run = tmp_path / "p"
    assert run_cli("train", "--prefix", run, "--test-run", "--epochs", "1", "--profile") == 0
    traces = list((run / "profile").glob("*.json*"))
    assert traces and traces[0].stat().st_size > 1000


def test_live_progress_bar_on_a_terminal(tmp_path):
    """On a terminal the progress bar shows; log lines still reach train.log."""
    import io

    from rich.console import Console

    from bitrain.train.callbacks import ConsoleLogger, ProgressETA

    bar = ProgressETA(
        tmp_path / "eta.txt", live=True, console=Console(file=io.StringIO(), force_terminal=True, width=100)
    )
    log = ConsoleLogger(tmp_path / "train.log", console=bar.console)
    bar.on_fit_start({"epochs": 2, "start_epoch": 0})
    bar.on_epoch_start(0)
    for b in range(5):
        bar.on_step(0, b, 5)
    log.on_message("hello")
    bar.bar.refresh()
    screen = bar.console.file.getvalue()
    bar.close()
    log.close()
    assert "Epoch 1/2" in screen and "5/5" in screen and "hello" in screen
    assert "hello" in (tmp_path / "train.log").read_text()
    assert (tmp_path / "eta.txt").read_text().startswith("Epoch ETA: ")


def test_bop_run_resumes_bit_identical(tmp_path):
    """larq's Bop through the CLI: binary weights flip, the rest by Adam; resume is exact."""
    args = ("--epochs", "3", "--batch-size", "64", "--optimizer", "bop", "--log-interval", "0")
    assert run_cli("train", "--prefix", tmp_path / "full", *args) == 0
    assert run_cli("train", "--prefix", tmp_path / "cut", *args, "--interrupt-at", "2") == 3
    assert run_cli("train", "--prefix", tmp_path / "cut", "--resume", "auto") == 0
    full = final_weights(tmp_path / "full")
    assert_same_weights(full, final_weights(tmp_path / "cut"))
    binary = full["2.body.0.weight"]  # a QConv2d's latent weights: Bop keeps them at exactly +-1
    assert set(binary.unique().tolist()) <= {-1.0, 1.0}
    assert max(float(r["acc1"]) for r in read_rows(tmp_path / "full", "val")) > 0.9


def test_resume_cuts_what_was_logged_after_the_checkpoint(small_run, tmp_path):
    """A run killed after its checkpoint logged more rows and events; the resumed run shows each once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "cut"
    assert run_cli("train", "--prefix", run, *SMALL, "--interrupt-at", "1") == 3
    with open(run / "metrics.csv", "a") as f:  # what the killed process wrote after last.pt
        f.write("batch,1,27,1728,9.9,0.1,0.2,0.01,100.0,\n")
    w = SummaryWriter(str(run / "tb"))
    w.add_scalar("accuracy/batch", 0.123, global_step=1728)
    w.close()
    assert run_cli("train", "--prefix", run, "--resume", "auto") == 0
    rows = read_rows(run)
    assert [(r["split"], r["step"]) for r in rows] == [(r["split"], r["step"]) for r in read_rows(small_run)]
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    steps = [e.step for e in ea.Scalars("accuracy/batch")]
    assert len(steps) == len(set(steps)) and 0.123 not in [round(e.value, 3) for e in ea.Scalars("accuracy/batch")]


def test_python_api_with_an_optimizer_object(tmp_path):
    """Trainer(model, build_optimizer(model, "adam", ...), ...) with the bitrain loaders: trains, writes
    last.pt, no CLI involved; an optimizer name is refused with the way to build one."""
    from bitrain import CheckpointSaver, Trainer, build_data, build_model, build_optimizer, make_schedule

    train, val, info = build_data("digits", batch_size=64)
    model = build_model(
        "tiny_resnet_e", num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size
    )
    with pytest.raises(TypeError, match="build_optimizer"):
        Trainer(model, "adam", train, val, epochs=3)
    schedule = make_schedule(lr=0.01, mode="step", steps_per_epoch=len(train), epochs=3)
    saver = CheckpointSaver(tmp_path / "checkpoints")
    trainer = Trainer(
        model, build_optimizer(model, "adam", lr=0.01), train, val, epochs=3, schedule=schedule, saver=saver
    )
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.0, 0.0]
    result = trainer.fit()
    assert result["best_acc"] > 0.8 and trainer.state.step == 3 * len(train)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
