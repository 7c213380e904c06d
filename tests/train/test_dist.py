"""Data parallel on the CPU: real multi-process runs (gloo, 2 ranks) through torch.distributed.run
and through ``bitrain train --cpu --gpus 0,1`` (bitrain.cli.launch), each as a subprocess with a timeout.

The parity runs are full precision (--bits 32 --bits-a 32) with --sync-bn: with BatchNorm, 2 ranks
at batch B only equal 1 rank at 2B when the batch statistics are taken over both ranks, and a
binary net turns float rounding differences (the order of the sums) into flipped signs. The
optimizer is SGD: Adam's first steps move every weight by about lr whatever its gradient's size,
so the rounding noise of near-zero gradients would decide their direction.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import final_weights, read_rows

from bitrain.cli.launch import exit_code_of

pytestmark = pytest.mark.slow

TIMEOUT_S = 240  # a hung rank fails the test instead of the suite
COMMON = [
    "--cpu",
    "--epochs",
    "2",
    "--bits",
    "32",
    "--bits-a",
    "32",
    "--optimizer",
    "sgd",
    "--lr",
    "0.1",
    "--log-interval",
    "10",
    "--seed",
    "7",
]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# Runs bitrain's CLI in a rank, plus two test probes: every rank saves its own final weights
# (rank{r}.safetensors), and FAIL_STEP makes rank 1 raise at that step.
PROBE = textwrap.dedent("""
    import os, sys
    from safetensors.torch import save_file
    import bitrain.train.trainer as T

    fit, step = T.Trainer.fit, T.Trainer.train_step

    def fit_and_dump(self):
        out = fit(self)
        weights = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        run_dir = self.saver.folder.parent  # the saver writes into RUN/checkpoints
        save_file(weights, str(run_dir / f"rank{self.dist.rank}.safetensors"))
        return out

    def failing_step(self, x, y):
        if self.dist.rank == 1 and self.state.step == int(os.environ["FAIL_STEP"]):
            raise RuntimeError(f"injected failure at step {self.state.step}")
        return step(self, x, y)

    T.Trainer.fit = fit_and_dump
    if "FAIL_STEP" in os.environ:
        T.Trainer.train_step = failing_step
    from bitrain.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _ok(p: subprocess.CompletedProcess, code: int = 0) -> None:
    assert p.returncode == code, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return path


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    _ok(_run(["-m", "bitrain", "train", *COMMON, "--batch-size", "64", "--prefix", run], run.parent))
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, probe) -> Path:
    run = tmp_path_factory.mktemp("two") / "run"
    _ok(_run([*TORCHRUN, probe, "train", *COMMON, "--sync-bn", "--batch-size", "32", "--prefix", run], run.parent))
    return run


def test_two_ranks_at_batch_b_match_one_rank_at_2b(one_rank, two_ranks):
    a, b = final_weights(one_rank), final_weights(two_ranks)
    assert a.keys() == b.keys()
    for k in a:  # float32 sums in another order: 1e-3 of the tensor's scale after 44 steps
        scale = a[k].double().abs().max().item()
        assert (b[k].double() - a[k].double()).abs().max().item() <= 1e-3 * scale + 1e-6, k
    rows_a, rows_b = read_rows(one_rank), read_rows(two_ranks)
    assert [(r["split"], r["epoch"], r["step"], r["samples"]) for r in rows_a] == [
        (r["split"], r["epoch"], r["step"], r["samples"]) for r in rows_b
    ]
    assert len(rows_a) == 2 * (2 + 2)  # per epoch: 2 log rows (22 steps, interval 10) + train + val
    for ra, rb in zip(rows_a, rows_b):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=2e-4)
        # accuracies are exact sample counts over both ranks: at most one borderline sample differs
        assert float(rb["acc1"]) == pytest.approx(float(ra["acc1"]), abs=1.5 / 1442)
        assert float(rb["lr"]) == pytest.approx(float(ra["lr"]), rel=1e-6)
    val = read_rows(two_ranks, "val")[-1]
    assert float(val["acc1"]) > 0.8  # it learned; and val covered all 355 samples over the 2 shards


def test_ranks_end_with_identical_weights(two_ranks):
    r0 = final_weights(two_ranks)  # written by rank 0 only
    for rank in (0, 1):
        from safetensors.torch import load_file

        mine = load_file(str(two_ranks / f"rank{rank}.safetensors"))
        assert mine.keys() == r0.keys()
        for k in r0:
            assert torch.equal(mine[k], r0[k]), f"rank {rank}: {k}"


def test_interrupt_at_and_resume_with_two_ranks_through_the_launcher(tmp_path, two_ranks):
    run = tmp_path / "run"
    args = ["-m", "bitrain", "train", *COMMON, "--gpus", "0,1", "--sync-bn", "--batch-size", "32", "--prefix", run]
    first = _run([*args, "--interrupt-at", "1"], tmp_path)
    _ok(first, 3)  # the ranks' exit code 3 is the run's
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "last.pt", "tiny_resnet_e_32bit_0000_acc_" + ckpts[2][-9:]], ckpts
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert payload["trainer"]["epoch"] == 1 and payload["trainer"]["step"] == 22
    assert payload["trainer"]["samples"] == 22 * 64  # global batch: 2 ranks x 32
    assert len(payload["rng"]["ranks"]) == 2
    assert not (run / "model.safetensors").exists()

    second = _run([*args, "--resume", "auto"], tmp_path)
    _ok(second)
    # the interrupted + resumed run ends where the uninterrupted one does, bit for bit
    a, b = final_weights(two_ranks), final_weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in read_rows(run, "val")] == [r["loss"] for r in read_rows(two_ranks, "val")]


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path, probe):
    t0 = time.monotonic()
    p = _run(
        [*TORCHRUN, probe, "train", *COMMON, "--epochs", "50", "--batch-size", "32", "--prefix", tmp_path / "run"],
        tmp_path,
        FAIL_STEP="5",
    )
    assert p.returncode != 0
    assert "injected failure at step 5" in p.stderr
    assert time.monotonic() - t0 < TIMEOUT_S  # no hang: rank 0 was stopped, not left waiting in an all-reduce


def test_bad_input_in_the_ranks_is_exit_2_through_the_launcher(tmp_path):
    p = _run(
        [
            "-m",
            "bitrain",
            "train",
            "--cpu",
            "--gpus",
            "0,1",
            "--dataset",
            "mnist",
            "--data-dir",
            tmp_path / "nothing-here",
            "--prefix",
            tmp_path / "run",
        ],
        tmp_path,
    )
    _ok(p, 2)
    assert "nothing-here" in p.stderr


# log interval 50 is longer than an epoch here (22 steps): the ranks must still agree to stop, at its end
@pytest.mark.parametrize("log_interval", ["2", "50"])
def test_sigterm_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path, log_interval):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bitrain",
            "train",
            *COMMON,
            "--epochs",
            "200",
            "--gpus",
            "0,1",
            "--batch-size",
            "32",
            "--log-interval",
            log_interval,
            "--prefix",
            str(run),
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ((run / "metrics.csv").exists() and len(read_rows(run)) >= 2):  # batch or epoch rows
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # as SLURM/Kubernetes would: to the launcher
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-3000:]
    payload = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # both ranks contributed their RNG state to the one checkpoint: they stopped together
    assert len(payload["rng"]["ranks"]) == 2
    assert payload["trainer"]["step"] >= 4 and payload["trainer"]["epoch"] < 200


@pytest.mark.parametrize(
    "codes,expected",
    [
        ({0: 3, 1: 3}, 3),
        ({0: 3, 1: -15}, 3),
        ({1: 2, 0: -15}, 2),
        ({1: 1, 0: -15}, 1),
        ({0: 1, 1: 3}, 1),
        ({1: -9}, 1),
        ({}, 0),
    ],
)
def test_run_exit_code_from_rank_exit_codes(codes, expected):
    assert exit_code_of(codes) == expected


def test_sync_batchnorm_conversion_keeps_parameters_keys_and_single_process_output():
    from bitrain.models import build_model
    from bitrain.train.dist import AllReduceBatchNorm, convert_sync_batchnorm

    torch.manual_seed(0)
    model = build_model("tiny_resnet_e", num_classes=10, in_channels=1, image_size=8, bits=32, bits_a=32)
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    x = torch.randn(16, 1, 8, 8)
    ref = model(x)
    converted = convert_sync_batchnorm(model, "cpu")
    assert converted is model
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, AllReduceBatchNorm) for m in bns)
    # the very same Parameter objects: an optimizer built before the conversion keeps training them
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    assert list(model.state_dict()) == keys_before
    torch.testing.assert_close(model(x), ref)  # no process group: plain BatchNorm


def test_without_sync_bn_every_rank_validates_rank_0s_model(tmp_path, probe):
    """No --sync-bn: each rank updates its own BatchNorm statistics, so before validating the ranks
    take rank 0's; the logged val top-1 is then exactly that of the saved model on all 355 images."""
    from bitrain.data import build_data
    from bitrain.models import build_model

    run = tmp_path / "run"
    _ok(
        _run(
            [
                *TORCHRUN,
                probe,
                "train",
                "--cpu",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--log-interval",
                "0",
                "--prefix",
                run,
            ],
            tmp_path,
        )
    )
    from safetensors.torch import load_file

    r0, r1 = load_file(str(run / "rank0.safetensors")), load_file(str(run / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # running statistics included
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    model = build_model(**ck["model_args"])
    model.load_state_dict(ck["model"])
    model.eval()
    _, val, _ = build_data("digits", batch_size=100)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in val)
    assert float(read_rows(run, "val")[-1]["acc1"]) == pytest.approx(correct / 355, abs=1e-9)


def test_distillation_with_two_ranks_matches_one_rank(tmp_path, one_rank, probe):
    """A teacher under DDP: each rank distils its shard; 2 ranks at B equal 1 rank at 2B, and the ranks agree."""
    kd = ["--teacher", one_rank, "--distill-alpha", "0.5"]
    single = tmp_path / "one"
    _ok(_run(["-m", "bitrain", "train", *COMMON, *kd, "--batch-size", "64", "--prefix", single], tmp_path))
    two = tmp_path / "two"
    _ok(_run([*TORCHRUN, probe, "train", *COMMON, *kd, "--sync-bn", "--batch-size", "32", "--prefix", two], tmp_path))
    a, b = final_weights(single), final_weights(two)
    for k in a:
        scale = a[k].double().abs().max().item()
        assert (b[k].double() - a[k].double()).abs().max().item() <= 1e-3 * scale + 1e-6, k
    from safetensors.torch import load_file

    r1 = load_file(str(two / "rank1.safetensors"))
    assert all(torch.equal(r1[k], b[k]) for k in b)


def test_accumulate_and_ema_with_two_ranks_match_one_rank(tmp_path, probe):
    """--accumulate 2 with --model-ema under DDP (no_sync on the window's first batch): 2 ranks at B match
    1 rank at 2B, the EMA (model.safetensors with --model-ema-eval) included; the ranks stay identical."""
    extra = ["--epochs", "1", "--accumulate", "2", "--model-ema", "0.9", "--model-ema-eval", "--sync-bn"]
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    _ok(_run(["-m", "bitrain", "train", *COMMON, *extra, "--batch-size", "64", "--prefix", one], tmp_path))
    _ok(_run([*TORCHRUN, probe, "train", *COMMON, *extra, "--batch-size", "32", "--prefix", two], tmp_path))
    a, b = final_weights(one), final_weights(two)
    for k in a:
        scale = a[k].double().abs().max().item()
        assert (b[k].double() - a[k].double()).abs().max().item() <= 1e-3 * scale + 1e-6, k
    rows = [(r["split"], r["step"], r["samples"]) for r in read_rows(two) if r["split"] != "batch"]
    assert rows == [(r["split"], r["step"], r["samples"]) for r in read_rows(one) if r["split"] != "batch"]
    assert rows[-1] == ("val_ema", "11", str(22 * 64))  # 22 batches in windows of 2: 11 optimizer steps
    from safetensors.torch import load_file

    r0, r1 = (load_file(str(two / f"rank{r}.safetensors")) for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_on_one_machine_train_exactly_like_two_local_ranks(tmp_path, two_ranks, rendezvous):
    """Multi-node as docs/performance.md writes it: two torchrun launchers (--nnodes 2, one process each,
    loopback only) sharing one --prefix end bit-identical to --nproc_per_node 2, with one set of files."""
    run, port = tmp_path / "run", _free_port()
    static = lambda r: ["--master-addr", "127.0.0.1", "--master-port", str(port), "--node_rank", str(r)]
    c10d = lambda r: ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "bitrain-test"]
    node = static if rendezvous == "static" else c10d
    args = ["train", *COMMON, "--sync-bn", "--batch-size", "32", "--prefix", run]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", *node(r)]
            + ["-m", "bitrain", *map(str, args)],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    a, b = final_weights(two_ranks), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in read_rows(run, "val")] == [r["loss"] for r in read_rows(two_ranks, "val")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (two_ranks / "checkpoints").iterdir()
    )
