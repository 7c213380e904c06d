"""``bitrain bench``: output format, the interleaving, and that every runner does the same work
(not the speed: timings on a shared CPU are noise)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from bitrain.cli import bench, main
from bitrain.data import build_data
from bitrain.models import build_model
from bitrain.train.optim import build_optimizer

TINY = ["--steps", "2", "--rounds", "2", "--warmup", "1", "--batch-size", "16", "--threads", "1"]


def test_bench_prints_speeds_and_the_ratio_line(capsys):
    assert main(["bench", *TINY]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bitrain bench: tiny_resnet_e (1/1-bit) on digits 1x8x8, batch 16, float32")
    speeds = {
        m.group(1): float(m.group(2))
        for line in out
        if (m := re.fullmatch(r"(hand-written|trainer|lightning)\s+([0-9.]+) samples/sec \(median of 2; .*\)", line))
    }
    assert set(speeds) >= {"hand-written", "trainer"} and all(v > 0 for v in speeds.values())
    ratio = [line for line in out if line.startswith("ratio trainer/hand-written: ")]
    assert len(ratio) == 1 and re.fullmatch(r"ratio trainer/hand-written: \d+\.\d\d", ratio[0])
    assert float(ratio[0].split(": ")[1]) > 0
    assert ("lightning" in speeds) == any(line.startswith("ratio trainer/lightning: ") for line in out)


def test_bench_dummy_bf16_channels_last(capsys):
    assert (
        main(
            [
                "bench",
                *TINY,
                "--dataset",
                "dummy",
                "--image-size",
                "16",
                "--bits",
                "32",
                "--bits-a",
                "32",
                "--dtype",
                "bfloat16",
                "--channels-last",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "on dummy 3x16x16, batch 16, bfloat16, channels_last" in out
    assert re.search(r"^ratio trainer/hand-written: \d+\.\d\d$", out, re.M)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--steps", "0"], "--steps"),
        (["--device", "tpu9"], "--device"),
        (["--dtype", "float8"], "--dtype"),
        (["--model", "nosuch"], "nosuch"),
    ],
)
def test_bench_bad_input_is_exit_2(flags, needle, capsys):
    assert main(["bench", *TINY, *flags]) == 2
    assert needle in capsys.readouterr().err


def test_step_loader_runs_into_the_next_epochs():
    train, _, _ = build_data("digits", batch_size=512, device="cpu", seed=1)  # 2 batches per epoch
    steps = bench.StepLoader(train, 5)
    steps.set_epoch(0)
    batches = list(steps)
    assert len(steps) == 5 and len(batches) == 5 and steps.num_samples == 5 * 512
    assert all(x.shape == (512, 1, 8, 8) for x, _ in batches)
    assert not torch.equal(batches[0][1], batches[2][1])  # the next inner epoch is another shuffle


def test_measure_interleaves_after_one_warm_up_each():
    calls: list[tuple[str, int]] = []
    runners = [bench.Runner(n, lambda steps, n=n: calls.append((n, steps))) for n in ("a", "b")]
    speeds = bench.measure(runners, steps=3, rounds=2, warmup=1, batch_size=4, device=torch.device("cpu"))
    assert calls == [("a", 1), ("b", 1), ("a", 3), ("b", 3), ("a", 3), ("b", 3)]
    assert {k: len(v) for k, v in speeds.items()} == {"a": 2, "b": 2}


def test_hand_written_and_trainer_runners_train_the_same_way():
    torch.set_num_threads(1)
    train, _, info = build_data("digits", batch_size=32, device="cpu", seed=1)
    torch.manual_seed(0)
    base = build_model("tiny_resnet_e", num_classes=10, in_channels=1, image_size=8, bits=32, bits_a=32)
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts = [build_optimizer(m, "sgd", lr=0.05) for m in models]
    cpu = torch.device("cpu")
    hand = bench.hand_written(models[0], opts[0], train, cpu, None, log_interval=3)
    trainer = bench.trainer_runner(models[1], opts[1], train, cpu, None, 3, False, False, lr=0.05)
    for r in (hand, trainer):
        r.run(4)
        r.run(4)
    a, b = models[0].state_dict(), models[1].state_dict()
    assert any(not torch.equal(a[k], base.state_dict()[k]) for k in a)  # they trained
    for k in a:  # the same batches, the same updates: the same weights
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


def test_accuracy_benchmark_prints_one_row_per_recipe(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_accuracy.py"
    args = [sys.executable, str(script), "digits", "--out", str(tmp_path), "--extra", "--epochs 2 --cpu"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "recipe" and "best val" in table[0] and "published" in table[0]
    row = [c.strip() for c in table[2].split("|")[1:-1]]
    assert row[:3] == ["digits", "tiny_resnet_e", "1/1"] and row[6] == "2"  # 2 epochs
    best, final = (float(c.rstrip(" %")) for c in row[8:10])
    assert 50 < final <= best <= 100
    again = subprocess.run([*args[:5], "--reuse"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and [c.strip() for c in again.stdout.splitlines()[-1].split("|")][9:11] == row[8:10]
