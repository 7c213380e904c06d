"""``bitrain train --gpus 0,1,...``: one training process per device through torch.distributed's
own launcher (the elastic agent behind ``torchrun``), so a run started this way behaves exactly
like ``torchrun --standalone --nproc_per_node N -m bitrain train ...``.

Each rank runs ``python -m bitrain train <the same argv>``; torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) tells it its place, and ``--gpus`` maps LOCAL_RANK to a
device. ``--cpu --gpus 0,1`` starts two CPU ranks (gloo): the way the tests exercise the
multi-process path on machines without a GPU.

Exit code of the run: 0 when every rank finished; 2 when a rank reported bad usage, config, data
or checkpoint; 3 when the ranks were interrupted (``--interrupt-at``, SIGTERM, SIGUSR1, Ctrl-C)
and wrote their resumable checkpoint; 1 otherwise. When one rank fails the agent stops the others
(SIGTERM, then SIGKILL after ``SHUTDOWN_TIMEOUT_S``), so a crash never leaves the run hanging.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Sequence

# Seconds the agent waits, after a failure or a signal, for the other ranks to end (they finish
# the step in progress and write their checkpoint) before it kills them.
SHUTDOWN_TIMEOUT_S = 120
# Signals the agent forwards to the ranks. SIGINT is left out on purpose: Ctrl-C in a terminal
# already reaches every rank of the process group, and a second, forwarded SIGINT would turn the
# ranks' graceful stop into an immediate KeyboardInterrupt.
FORWARDED_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT,SIGUSR1"


def exit_code_of(failures: dict[int, int]) -> int:
    """The run's exit code from the failed ranks' exit codes ({global rank: code}; a negative code
    is the signal that ended the rank). 2 wins, then 3 when every failure is 3 or the agent's stop
    after one, else 1."""
    codes = list(failures.values())
    if not codes:
        return 0
    if 2 in codes:
        return 2
    if 3 in codes and all(c == 3 or c < 0 for c in codes):
        return 3
    return 1


def _describe(failures: dict[int, int]) -> str:
    def one(code: int) -> str:
        if code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    return ", ".join(f"rank {r}: {one(c)}" for r, c in sorted(failures.items()))


def launch_ranks(argv: Sequence[str], nproc: int) -> int:
    """Run ``bitrain train argv`` as ``nproc`` local ranks under torch.distributed's elastic agent
    (standalone rendezvous on a free local port, no restarts); returns the run's exit code."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if "OMP_NUM_THREADS" not in os.environ:
        # as torchrun: N ranks on one machine share its cores instead of each taking all of them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"bitrain-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone
        max_restarts=0,
        monitor_interval=0.1,
        signals_to_handle=FORWARDED_SIGNALS,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    entry_args = ("-m", "bitrain", "train", *argv)
    try:
        elastic_launch(config, sys.executable)(*entry_args)
    except ChildFailedError as e:
        failures = {rank: f.exitcode for rank, f in e.failures.items()}
        code = exit_code_of(failures)
        if code == 1:
            print(
                f"bitrain: the distributed run failed ({_describe(failures)}); the first failing "
                "rank's traceback is above",
                file=sys.stderr,
            )
        return code
    except (SignalException, KeyboardInterrupt) as e:
        # the agent forwarded the stop to the ranks and waited for them to checkpoint and end
        name = getattr(e, "sigval", None)
        print(
            f"bitrain: launcher received {getattr(name, 'name', 'SIGINT')}; the ranks were asked to "
            "checkpoint and stop",
            file=sys.stderr,
        )
        return 3
    return 0
