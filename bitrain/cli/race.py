"""The race of ``bitrain bench --inference``: every engine in a process of its own (``race_worker.py``),
one at a time, in interleaved rounds.

The workers load their models at the same time; then per batch size each in turn builds for it, warms up,
times one batch (which fixes its k, the batches of its turn: about ``slice_s``) and writes its logits of
the common input for the agreement check. Round r runs every engine's k batches in turn, the order rotated
by one each round and reversed every other round, so an engine's neighbours in time change; an engine
waiting for its turn blocks on its pipe. The CPU time of the waiting workers is read from ``/proc`` around
each turn: what an idle engine took from the one being timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import bitrain
from bitrain.cli.race_worker import ENGINES, batches_per_slice

Say = Callable[[str], None]


class WorkerError(RuntimeError):
    """A worker that refused a command, or died: its engine leaves the race with this reason."""


class Worker:
    """One engine's process and its pipe."""

    def __init__(self, name: str, spec: dict, folder: Path, env: dict):
        self.name, self.log = name, folder / f"{name}.log"
        self.started = time.perf_counter()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bitrain.cli.race_worker", json.dumps({**spec, "engine": name})],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
                bufsize=1,
            )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            tail = [s for s in self.log.read_text(errors="replace").splitlines() if s.strip()][-1:]
            raise WorkerError(f"its process exited with code {code}" + (f" ({tail[0][:300]})" if tail else ""))
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(reply.get("error", "failed"))
        return reply

    def ask(self, **cmd: Any) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # read() says why
        return self.read()

    def cpu_seconds(self) -> float:
        """The process's user + system CPU seconds so far (all its threads), 0 where /proc has none."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def worker_env(threads: int) -> dict:
    """The workers' environment: this bitrain importable, ``threads`` OpenMP threads. The wait policy is the
    user's or libgomp's default (spin briefly, then sleep): forcing PASSIVE made the OpenMP engines sleep
    between layers while OpenVINO's TBB workers spin (the packed engine 0.71x OpenVINO binary at batch 1
    with it, 0.82x without, a run each); waiting, libgomp's workers take about 0.1 s of CPU a run."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    root = str(Path(bitrain.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return env


def start(names: list[str], spec: dict, folder: Path, say: Say) -> tuple[dict[str, Worker], dict[str, dict]]:
    """(the workers that loaded their engine, per engine its status: info, or the reason it is skipped)."""
    env = worker_env(spec["threads"])
    pending = {n: Worker(n, spec, folder, env) for n in names}
    workers, status = {}, {}
    for name, w in pending.items():
        try:
            status[name] = {"status": "ran", "info": w.read()["info"]}
            workers[name] = w
            say(f"  {name}: loaded ({time.perf_counter() - w.started:.1f} s)")
        except WorkerError as e:
            status[name] = {"status": "skipped", "reason": str(e)}
            say(f"  {name}: skipped: {e}")
            w.close()
    return workers, status


def _drop(name: str, error: Exception, workers: dict, status: dict, say: Say, batch: int) -> None:
    status[name] = {"status": "skipped", "reason": f"failed at batch {batch}: {error}"}
    say(f"  {name}: dropped: failed at batch {batch}: {error}")
    workers.pop(name).close()


def agreement(logits: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per engine: its reference (the packed engine for the binary group, torch's float twin for the float
    group, else the group's first engine), the images whose argmax equals the reference's, and the max
    |logit difference| from it."""
    out = {}
    for group, first in (("binary", "packed"), ("float", "torch-float")):
        members = [n for n in logits if ENGINES[n].group == group]
        if not members:
            continue
        ref = first if first in members else members[0]
        for n in members:
            a, b = logits[n], logits[ref]
            out[n] = {
                "reference": ref,
                "argmax_equal": int((a.argmax(1) == b.argmax(1)).sum()),
                "images": int(a.shape[0]),
                "max_abs_logit_diff": float(np.abs(a - b).max()),
            }
    return out


def _prepare(batch: int, workers: dict, status: dict, opts: dict, say: Say) -> tuple[dict, dict]:
    """Per engine k for this batch size, and its logits of the common input."""
    ks, logits = {}, {}
    for name, w in list(workers.items()):
        try:
            r = w.ask(cmd="prepare", batch=batch, warmup=opts["warmup"])
        except WorkerError as e:
            _drop(name, e, workers, status, say, batch)
            continue
        status[name]["info"] = r["info"]
        ks[name] = batches_per_slice(r["seconds"], opts["slice_s"])
        logits[name] = np.load(r["logits"], allow_pickle=False)
        say(f"  batch {batch}: {name} ready: {r['seconds'] * 1e3:.1f} ms a batch, {ks[name]} per turn")
    return ks, logits


def _turn(name: str, workers: dict, k: int, idle: dict) -> float:
    """One engine's turn: its k batches' seconds; the other workers' CPU meanwhile is added to ``idle``."""
    others = {n: w.cpu_seconds() for n, w in workers.items() if n != name}
    seconds = workers[name].ask(cmd="time", k=k)["seconds"]
    for n, before in others.items():
        idle[n] = idle.get(n, 0.0) + workers[n].cpu_seconds() - before
    return seconds


def race_batch(batch: int, workers: dict, status: dict, opts: dict, say: Say) -> dict:
    """One batch size: per engine its k and seconds per round, the agreement, the idle CPU seconds."""
    ks, logits = _prepare(batch, workers, status, opts, say)
    seconds: dict[str, list[float]] = {n: [] for n in workers}
    idle: dict[str, float] = {}
    for r in range(opts["rounds"]):
        names = list(workers)
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order if r % 2 == 0 else order[::-1]:
            try:
                seconds[name].append(_turn(name, workers, ks[name], idle))
            except WorkerError as e:
                _drop(name, e, workers, status, say, batch)
        done = ", ".join(f"{n} {batch * ks[n] / seconds[n][-1]:.1f}" for n in workers if seconds[n])
        say(f"  batch {batch}: round {r + 1}/{opts['rounds']} (img/s): {done}")
    return {
        "ks": {n: ks[n] for n in workers},
        "seconds": {n: seconds[n] for n in workers},
        "agreement": {n: a for n, a in agreement(logits).items() if n in workers},
        "idle_cpu_s": {n: idle.get(n, 0.0) for n in workers},
    }


def run_race(names: list[str], batches: list[int], spec: dict, opts: dict, folder: Path, say: Say) -> dict:
    """Start the workers, race them at each batch size, close them. Returns status and per batch results."""
    say(f"starting {len(names)} engines, each in its own process ({spec['threads']} threads each)")
    load = [_load_average()]
    workers, status = start(names, spec, folder, say)
    try:
        results = {b: race_batch(b, workers, status, opts, say) for b in batches}
    finally:
        for w in workers.values():
            w.close()
    load.append(_load_average())
    return {"status": status, "batches": results, "load_average": {"start": load[0], "end": load[1]}}


def _load_average() -> list[float] | None:
    """The machine's load average over 1, 5 and 15 minutes (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None
