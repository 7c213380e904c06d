"""Kill harness: SIGKILL ``bitrain train`` at random moments, resume with ``--resume auto``, and
require weights bit-identical to an uninterrupted run and no unreadable checkpoint, ever.

Kill moments come from a seeded RNG (``BITRAIN_KILL_SEED`` changes the seed, ``BITRAIN_KILL_POINTS``
the number of kills; 20 by default). Three kinds of moment:

- ``time``:  a random delay after the process starts, 5-80 % of the reference run's wall time
  (often during start-up, before any checkpoint);
- ``saved``: right after the n-th checkpoint of this process was published, plus a random delay;
- ``write``: as soon as a checkpoint temp file appears (a write is in progress).

The runs are tiny (digits, 2 epochs of 11 steps, a checkpoint after every step); process start-up
is the main cost, so the kills are chained: one run dir is killed again and again (10 times, or
until a resume runs to the end first), then resumed to its end and compared; then the next chain.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_rows
from safetensors.torch import load_file

import bitrain
from bitrain.train.checkpoint import load_checkpoint

SEED = int(os.environ.get("BITRAIN_KILL_SEED", "20240611"))
KILLS = int(os.environ.get("BITRAIN_KILL_POINTS", "20"))
PER_CHAIN = 10  # kills before a chain is resumed to its end and compared (each chain: one more training)
ARGS = [
    "train",
    "--cpu",
    "--epochs",
    "2",
    "--batch-size",
    "128",
    "--checkpoint-interval",
    "1",
    "--save-frequency",
    "1",
    "--log-interval",
    "4",
    "--resume",
    "auto",
]
TIMEOUT = 600  # seconds per process: the CI machine may be shared and slow


def _pythonpath() -> str:
    """The bitrain this test imported, for the child process (a PYTHONPATH given by the caller first)."""
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(Path(bitrain.__file__).parents[1])]))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", CI="1")
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = _pythonpath()
    return env


def _spawn(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bitrain", *ARGS, "--prefix", str(run_dir)],
        cwd=run_dir.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )


def _published(ckpt_dir: Path) -> list[Path]:
    """Checkpoints a reader may use (temp files start with a dot and never end in .pt)."""
    return sorted(p for p in ckpt_dir.glob("*.pt") if not p.name.startswith("."))


def _last_id(ckpt_dir: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(ckpt_dir / "last.pt")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _writing(ckpt_dir: Path) -> bool:
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return False
    return any(n.startswith(".") and (".tmp-" in n or ".new-" in n) for n in names)


def _kill_when(proc: subprocess.Popen, ckpt_dir: Path, kind: str, arg: float, delay: float) -> bool:
    """Wait for the moment, SIGKILL; False when the process ended on its own first."""
    start, seen, last = time.monotonic(), 0, _last_id(ckpt_dir)
    while proc.poll() is None:
        if time.monotonic() - start > TIMEOUT:
            proc.kill()
            pytest.fail("bitrain train did not finish in time")
        if kind == "time" and time.monotonic() - start >= arg:
            break
        if kind == "write" and _writing(ckpt_dir):
            seen += 1
            if seen >= arg:
                break
        if kind == "saved":
            now = _last_id(ckpt_dir)
            if now != last:
                seen, last = seen + 1, now
                if seen >= arg:
                    time.sleep(delay)
                    break
        time.sleep(0.001)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _check_readable(ckpt_dir: Path, had_checkpoint: bool) -> bool:
    """Every published checkpoint loads (checksum verified); last.pt never goes missing once written."""
    files = _published(ckpt_dir)
    for p in files:
        load_checkpoint(p)  # raises UserError on a truncated or corrupt file
    if had_checkpoint:
        assert (ckpt_dir / "last.pt").is_file(), f"last.pt missing after a kill; have {[p.name for p in files]}"
    return bool(files)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err.decode()[-2000:]}"


def _same_result(run: Path, ref_dir: Path, ref: dict[str, torch.Tensor]) -> None:
    """Final weights bit-identical; best and numbered checkpoints all there, at the same points."""
    got = load_file(str(run / "model.safetensors"))
    assert got.keys() == ref.keys()
    diff = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not diff, f"{run.name}: tensors differ from the uninterrupted run: {diff[:5]}"
    timing = ("samples_per_sec", "epoch_time")  # the only columns a kill may change
    rows = [[v for k, v in r.items() if k not in timing] for r in read_rows(run)]
    assert rows == [[v for k, v in r.items() if k not in timing] for r in read_rows(ref_dir)], "metrics.csv differs"
    names = [p.name for p in _published(run / "checkpoints") if p.name != "last.prev.pt"]
    assert names == [p.name for p in _published(ref_dir / "checkpoints") if p.name != "last.prev.pt"]
    for name in names:
        a = load_checkpoint(run / "checkpoints" / name)
        b = load_checkpoint(ref_dir / "checkpoints" / name)
        assert (a["trainer"]["step"], a["trainer"]["best_acc"]) == (b["trainer"]["step"], b["trainer"]["best_acc"]), (
            name
        )
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"]), name


def _plan(rng: random.Random, n: int) -> list[tuple[str, float, float]]:
    kinds = rng.choices(["time", "saved", "write"], weights=[2, 4, 4], k=n)
    plan = []
    for kind in kinds:
        if kind == "time":  # a fraction of the reference run's wall time: the moment always comes
            plan.append(("time", rng.uniform(0.05, 0.8), 0.0))
        elif kind == "saved":
            plan.append(("saved", rng.randint(1, 4), rng.uniform(0.0, 0.05)))
        else:
            plan.append(("write", rng.randint(1, 4), 0.0))
    return plan


@pytest.mark.timeout(1200)
def test_sigkill_anywhere_resumes_bit_identical(tmp_path: Path) -> None:
    ref_dir = tmp_path / "ref"
    t0 = time.monotonic()
    _finish(_spawn(ref_dir))
    ref_seconds = time.monotonic() - t0  # scales the "time" kill points to this machine's speed
    ref = load_file(str(ref_dir / "model.safetensors"))

    rng = random.Random(SEED)
    chain, run, kills, in_chain, compared, kinds = 0, tmp_path / "chain0", 0, 0, 0, {}
    had_ckpt = False

    def end_chain(proc: subprocess.Popen) -> None:
        nonlocal chain, run, in_chain, compared, had_ckpt
        _finish(proc)
        _check_readable(run / "checkpoints", had_ckpt)
        _same_result(run, ref_dir, ref)
        compared += 1
        chain, in_chain, had_ckpt = chain + 1, 0, False
        run = tmp_path / f"chain{chain}"

    for kind, arg, delay in _plan(rng, KILLS):
        for _attempt in range(2):
            proc = _spawn(run)
            moment = arg * ref_seconds if kind == "time" else arg
            if _kill_when(proc, run / "checkpoints", kind, moment, delay):
                kills, in_chain = kills + 1, in_chain + 1
                kinds[kind] = kinds.get(kind, 0) + 1
                had_ckpt = _check_readable(run / "checkpoints", had_ckpt) or had_ckpt
                break
            end_chain(proc)  # it ended before the kill moment: the chain is done
        else:  # a fresh chain always has the moment: it never came
            pytest.fail(f"kill moment {kind} {moment} never came in a whole run (no checkpoint write seen?)")
        if in_chain == PER_CHAIN:
            end_chain(_spawn(run))  # resume this chain to its end, compare, start the next
    if in_chain:
        end_chain(_spawn(run))
    print(f"kill harness: seed {SEED}, {kills} kills {kinds}, {compared} resumed runs compared")
    assert kills == KILLS and compared >= KILLS // PER_CHAIN
