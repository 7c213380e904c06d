"""``--logger mlflow``: an MLflow run through ``MlflowClient`` (no fluent global state).

The store: ``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite database in the run directory,
``sqlite:///RUN/mlflow.db``, whose experiments keep their artifacts beside it in ``RUN/mlruns``
(``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`` shows them). The experiment: ``experiment``,
else ``$MLFLOW_EXPERIMENT_NAME``, else ``bitrain``; the run is named after the run directory. Status:
FINISHED (exit 0), KILLED (exit 3: interrupted, resumable), FAILED otherwise; a resumed run reopens
the same MLflow run and sets it RUNNING again. What is logged: :mod:`bitrain.train.tracking`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitrain.train.tracking import TrackingLogger, quiet_logs

DEFAULT_EXPERIMENT = "bitrain"
STATUS = {0: "FINISHED", 3: "KILLED"}  # any other exit code: FAILED
MAX_PARAMS = 100  # per log_batch call (MLflow's limit)


def default_uri(run_dir: str | Path) -> str:
    """``sqlite:///`` + the absolute path of ``RUN/mlflow.db``."""
    return "sqlite:///" + (Path(run_dir).resolve() / "mlflow.db").as_posix()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri[len("sqlite:///") :])


class MLflowLogger(TrackingLogger):
    """Logs to one MLflow run (see the module's text for the store, the experiment and the run's name)."""

    name = "mlflow"

    def __init__(
        self,
        run_dir: str | Path,
        params: dict[str, Any],
        *,
        uri: str | None = None,
        experiment: str | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(params, say=say)
        self.run_dir = Path(run_dir)
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(run_dir)
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.client: Any = None

    def _start(self, run_id: str | None) -> str:
        from mlflow.tracking import MlflowClient

        with quiet_logs("mlflow", "alembic"):  # a new database's migrations log at INFO
            self.client = MlflowClient(tracking_uri=self.uri)
            resumed = run_id is not None and self._reopen(run_id)
            if not resumed:
                run_id = self._create()
        hint = f"; see it with: mlflow ui --backend-store-uri {self.uri}" if sqlite_path(self.uri) else ""
        what = "continuing" if resumed else "logging to"
        self._tell(f"MLflow: {what} run {run_id} of experiment {self.experiment!r} in {self.uri}{hint}")
        return run_id

    def _reopen(self, run_id: str) -> bool:
        """Run ``run_id`` set RUNNING again, with the parameters it lacks; False when the store has no such run."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            self._tell(f"MLflow: run {run_id} of the checkpoint is not in {self.uri}; logging to a new run")
            return False
        self.client.update_run(run_id, status="RUNNING")
        self._log_params(run_id, skip=set(run.data.params))
        return True

    def _create(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            db = sqlite_path(self.uri)
            where = (db.parent / "mlruns").resolve().as_uri() if db is not None else None
            exp_id = self.client.create_experiment(self.experiment, artifact_location=where)
        tags = {"bitrain.run_dir": str(self.run_dir.resolve())}
        run = self.client.create_run(exp_id, run_name=self.run_dir.name, tags=tags)
        self._log_params(run.info.run_id)
        return run.info.run_id

    def _log_params(self, run_id: str, skip: set[str] = frozenset()) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in self.params.items() if k not in skip]
        for i in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(run_id, params=params[i : i + MAX_PARAMS])

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def _set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def _log_files(self, files: dict[str, Path]) -> None:
        for name, path in files.items():
            folder = Path(name).parent.as_posix()
            self.client.log_artifact(self.run_id, str(path), artifact_path=None if folder == "." else folder)

    def _finish(self, exit_code: int) -> None:
        self.client.set_terminated(self.run_id, status=STATUS.get(exit_code, "FAILED"))
