"""``--logger wandb``: a Weights & Biases run, its files under ``RUN/wandb``.

Without a W&B login (no ``$WANDB_API_KEY``, no ``wandb login`` entry in the netrc file) and without
``$WANDB_MODE``, the run is offline: ``RUN/wandb/offline-run-*`` holds it, and
``wandb sync RUN/wandb/offline-run-*`` uploads it later (a resumed run's folders in order, as one
run). Project: ``project``, else ``$WANDB_PROJECT``, else ``bitrain``; the run is named after the run
directory. The x axis of every metric is ``samples`` (``define_metric``), as TensorBoard's step. The
run's files are one ``model`` artifact, ``model-RUNID`` (Lightning's name), whose files are read from
the run directory when it is uploaded (not copied). What is logged: :mod:`bitrain.train.tracking`.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bitrain.train.tracking import TrackingLogger

DEFAULT_PROJECT = "bitrain"


def logged_in(wandb: Any) -> bool:
    """Whether W&B has credentials: ``$WANDB_API_KEY`` (or an identity token file), or the netrc
    entry ``wandb login`` writes for the W&B host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    hosts = {urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url).hostname, "api.wandb.ai"}
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    return any(h and entries.authenticators(h) for h in hosts)


class WandbLogger(TrackingLogger):
    """Logs to one W&B run (see the module's text for the offline mode, the project and the run's name)."""

    name = "wandb"

    def __init__(
        self,
        run_dir: str | Path,
        params: dict[str, Any],
        *,
        project: str | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(params, say=say)
        self.run_dir = Path(run_dir)
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.run: Any = None

    def _start(self, run_id: str | None) -> str:
        import wandb

        offline = not os.environ.get("WANDB_MODE") and not logged_in(wandb)
        self.run = wandb.init(
            project=self.project,
            name=self.run_dir.name,
            id=run_id,
            resume="allow" if run_id else None,
            dir=str(self.run_dir),
            mode="offline" if offline else None,
            config=None if run_id else self.params,  # a resumed run has them
            settings=wandb.Settings(console="off", silent=True),  # bitrain's console stays bitrain's
        )
        self.run.define_metric("samples")
        self.run.define_metric("*", step_metric="samples")
        what = "continuing" if run_id else "logging to"
        if offline:
            where = Path(self.run.settings.sync_dir)
            self._tell(
                f"W&B: {what} run {self.run.id} offline (no W&B login) in {where}; upload it with: "
                f"wandb sync {where.parent}/offline-run-*"
            )
        else:
            self._tell(f"W&B: {what} run {self.run.id} of project {self.project!r}")
        return self.run.id

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "samples": step})

    def _set_tag(self, key: str, value: str) -> None:
        self.run.summary[key] = value

    def _log_files(self, files: dict[str, Path]) -> None:
        import wandb

        artifact = wandb.Artifact(f"model-{self.run.id}", type="model")  # Lightning's name for it
        for name, path in files.items():
            artifact.add_file(str(path), name=name, policy="immutable")  # referenced until the upload, not copied
        self.run.log_artifact(artifact)

    def _finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
        self._teardown(exit_code)

    def _abandon(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)
            self._teardown(1)

    @staticmethod
    def _teardown(exit_code: int) -> None:
        """Stop W&B's service process now. Left to W&B's atexit hook, the process's exit waits on it, and
        its token stays in os.environ for every subprocess started after the run (a test process that
        went on to start others was killed by SIGSEGV in that wait)."""
        import wandb

        wandb.teardown(exit_code)
