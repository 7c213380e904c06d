"""``--logger``: MLflow and W&B fed what metrics.csv holds, a resumed run continuing the same tracker
run, a run in stages in one tracker run, a failing tracker costing one warning, and the exit-2 lines
for an unknown or missing logger. The MLflow store is read with MLflow's own client; the W&B offline
files with W&B's own record definitions (its protobuf ``Record``)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import read_rows, run_cli

import bitrain
from bitrain.train import checkpoint as ckpt
from bitrain.train.trainer import Trainer

# digits: 1,442 train images / 256 = 5 steps per epoch, a log row every 2
ARGS = ["--cpu", "--batch-size", "256", "--log-interval", "2", "--bn-recalibrate", "2"]


@pytest.fixture
def mlflow_client():
    pytest.importorskip("mlflow", reason="--logger mlflow needs mlflow (the test extra has mlflow-skinny)")
    pytest.importorskip("sqlalchemy", reason="MLflow's SQLite store needs sqlalchemy (in the test extra)")
    pytest.importorskip("alembic", reason="MLflow's SQLite store needs alembic (in the test extra)")
    from mlflow.tracking import MlflowClient

    return lambda run: MlflowClient(tracking_uri=f"sqlite:///{(run / 'mlflow.db').resolve().as_posix()}")


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """No W&B login: no API key, no netrc entry, W&B's own folders in tmp_path."""
    pytest.importorskip("wandb", reason="--logger wandb needs wandb (in the test extra)")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def _only_run(client):
    exp = client.get_experiment_by_name("bitrain")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _csv(run: Path, split: str, column: str) -> list[tuple[int, float]]:
    return [(int(r["samples"]), float(r[column])) for r in read_rows(run, split)]


def test_mlflow_store_holds_params_metrics_and_artifacts(tmp_path, mlflow_client, capsys):
    run = tmp_path / "run"
    assert run_cli("train", *ARGS, "--epochs", "2", "--logger", "csv,tensorboard,mlflow", "--prefix", run) == 0
    out = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri sqlite:///{run.resolve()}/mlflow.db" in out
    client = mlflow_client(run)
    got = _only_run(client)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert got.data.params == {k: str(v) for k, v in config.items() if v is not None}
    rid = got.info.run_id
    for split, column in (("val", "acc1"), ("val", "loss"), ("train", "acc5"), ("batch", "loss"), ("batch", "lr")):
        assert _history(client, rid, f"{split}/{column}") == _csv(run, split, column), (split, column)
    assert len(_csv(run, "val", "acc1")) == 2 and len(_csv(run, "batch", "loss")) == 4
    assert [v for _, v in _history(client, rid, "epoch")] == [0.0, 1.0]
    assert got.data.metrics["best_acc1"] == max(v for _, v in _csv(run, "val", "acc1"))
    assert got.data.tags["best_checkpoint"] == str((run / "checkpoints" / "best.pt").resolve())
    names = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "checkpoints")}
    assert {"model.safetensors", "config.yaml", "checkpoints/best.pt"} <= names
    stored = Path(client.download_artifacts(rid, "model.safetensors", str(tmp_path / "dl")))
    assert stored.read_bytes() == (run / "model.safetensors").read_bytes()
    assert str(run.resolve() / "mlruns") in got.info.artifact_uri  # the artifacts beside the store
    assert (run / "metrics.csv").is_file() and (run / "tb").is_dir()  # the other loggers as before


def _signal_at(monkeypatch, step: int) -> None:
    """SIGUSR1 to this process right after optimizer step ``step`` (1-based): a mid-epoch stop."""
    real = Trainer.train_step

    def step_then_signal(self, x, y):
        out = real(self, x, y)
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)


@pytest.mark.parametrize("stop", ["interrupt-at", "signal"])
def test_mlflow_resumed_run_continues_the_same_run(tmp_path, mlflow_client, monkeypatch, stop):
    run = tmp_path / "run"
    argv = ["train", *ARGS, "--epochs", "3", "--logger", "csv,mlflow", "--prefix", run]
    with monkeypatch.context() as m:
        if stop == "signal":
            _signal_at(m, 7)  # inside epoch 1, after its first log row
            assert run_cli(*argv) == 3
        else:
            assert run_cli(*argv, "--interrupt-at", "1") == 3
    client = mlflow_client(run)
    first = _only_run(client)
    assert first.info.status == "KILLED"
    saved = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["callbacks"]["MLflowLogger"]
    assert saved == {"run_id": first.info.run_id}

    assert run_cli("train", "--prefix", run, "--resume", "auto") == 0  # the loggers come from the checkpoint
    got = _only_run(client)
    assert got.info.run_id == first.info.run_id and got.info.status == "FINISHED"
    for split, column in (("val", "acc1"), ("train", "loss"), ("batch", "loss")):
        history = _history(client, got.info.run_id, f"{split}/{column}")
        assert history == _csv(run, split, column), (split, column)
        assert len({s for s, _ in history}) == len(history)  # no step twice
    assert len(_csv(run, "val", "acc1")) == 3


def _wandb_records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``): LevelDB-log blocks of 32 KiB after a
    7-byte header, each record in chunks of (crc32, length, type) + data, parsed as W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, parts = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # the rest of the block is padding
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last chunk
            record = pb.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def _children() -> list[str]:
    """The command lines of this process's live children (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return found


def _wandb_history(folder: Path) -> list[dict]:
    rows = []
    for record in _wandb_records(next(folder.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def test_wandb_offline_run_holds_the_metrics_and_resume_keeps_its_id(tmp_path, wandb_offline, capsys):
    run = tmp_path / "run"
    argv = ["train", *ARGS, "--epochs", "2", "--logger", "csv,wandb", "--prefix", run]
    assert run_cli(*argv, "--interrupt-at", "1") == 3
    assert "offline (no W&B login)" in capsys.readouterr().out
    run_id = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["callbacks"]["WandbLogger"]["run_id"]
    assert run_cli("train", "--prefix", run, "--resume", "auto") == 0
    assert f"wandb sync {run / 'wandb'}/offline-run-*" in capsys.readouterr().out
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert [f.name.rsplit("-", 1)[1] for f in folders] == [run_id, run_id]  # one run, resumed
    rows = [r for f in folders for r in _wandb_history(f)]
    val = [(r["samples"], r["val/acc1"]) for r in rows if "val/acc1" in r]
    assert val == _csv(run, "val", "acc1")
    batch = [(r["samples"], r["batch/loss"]) for r in rows if "batch/loss" in r]
    assert batch == _csv(run, "batch", "loss")
    first = list(_wandb_records(next(folders[0].glob("run-*.wandb"))))
    runs = [r.run for r in first if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert runs[0].run_id == run_id and config["lr"] == 0.01 and config["dataset"] == "digits"
    last = list(_wandb_records(next(folders[1].glob("run-*.wandb"))))
    kinds = [r.WhichOneof("record_type") for r in last]
    assert "artifact" in kinds and "exit" in kinds
    artifact = next(r.artifact for r in last if r.WhichOneof("record_type") == "artifact")
    assert {e.path for e in artifact.manifest.contents} == {"model.safetensors", "config.yaml", "checkpoints/best.pt"}
    assert next(r.exit for r in last if r.WhichOneof("record_type") == "exit").exit_code == 0
    assert "WANDB_SERVICE" not in os.environ  # W&B's service stopped with the run, not left to atexit
    assert not [p for p in _children() if "wandb" in p]


def test_a_failing_mlflow_costs_one_warning_and_the_run_goes_on(tmp_path, mlflow_client, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    real, calls = MlflowClient.log_batch, []

    def locked_after_two(self, run_id, metrics=(), params=(), tags=()):
        if metrics:
            calls.append(1)
            if len(calls) > 2:
                raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(MlflowClient, "log_batch", locked_after_two)
    run = tmp_path / "run"
    assert run_cli("train", *ARGS, "--epochs", "2", "--logger", "csv,tensorboard,mlflow", "--prefix", run) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "--logger mlflow failed (MlflowException:" in warnings[0]
    assert "database is locked" in warnings[0] and "the run goes on" in warnings[0]
    assert (run / "train.log").read_text().count("--logger mlflow failed") == 1
    assert (run / "model.safetensors").is_file() and (run / "tb").is_dir()
    assert len(read_rows(run, "val")) == 2 and len(calls) == 3  # nothing more was tried
    client = mlflow_client(run)
    got = _only_run(client)  # what was logged before stays: epoch 0's two batch rows
    assert _history(client, got.info.run_id, "batch/loss") == _csv(run, "batch", "loss")[:2]
    assert got.info.status == "RUNNING"  # not even finished: the store was "locked"


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_logger_not_installed_is_exit_2_before_anything_runs(tmp_path, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, name, None)  # import mlflow -> ModuleNotFoundError
    run = tmp_path / "run"
    assert run_cli("train", *ARGS, "--epochs", "1", "--logger", f"csv,{name}", "--prefix", run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"bitrain: error: --logger {name} needs the {name} package, which is not installed: pip install 'bitrain[{name}]'"
    ]
    assert not run.exists()


def test_an_unknown_logger_is_exit_2_with_a_suggestion(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "--cpu", "--logger", "tensorboard,mlfow", "--prefix", run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--logger 'mlfow' is not a logger; did you mean 'mlflow'?" in err[0]
    assert run_cli("train", "--cpu", "--logger", "csv", "--write-summary", "--prefix", run) == 2
    assert "has no tensorboard" in capsys.readouterr().err
    assert not run.exists()


def test_csv_alone_writes_no_tensorboard_and_the_default_imports_no_tracker(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--cpu", "--test-run", "--epochs", "1", "--logger", "csv", "--prefix", run) == 0
    assert (run / "metrics.csv").is_file() and not (run / "tb").exists()
    code = (
        "import sys\nfrom bitrain.cli import main\n"
        f"rc = main(['train', '--cpu', '--test-run', '--epochs', '1', '--prefix', {str(tmp_path / 'default')!r}])\n"
        "sys.exit(rc or 10 * ('mlflow' in sys.modules) + 20 * ('wandb' in sys.modules))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(bitrain.__file__).parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == sorted(
        [".lock", "checkpoints", "config.yaml", "metrics.csv", "model.safetensors", "tb", "train.log"]
    )


def test_stages_log_to_one_mlflow_run(tmp_path, mlflow_client):
    stages = {
        "model": "tiny_resnet_e",
        "batch_size": 256,
        "epochs": 1,
        "log_interval": 2,
        "bn_recalibrate": 2,
        "cpu": True,
        "logger": "csv,mlflow",
        "stages": [{"name": "float", "bits": 32, "bits_a": 32}, {"name": "binary", "bits": 1, "bits_a": 1}],
    }
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump(stages, sort_keys=False))
    run = tmp_path / "run"
    assert run_cli("train", "--config", config, "--prefix", run) == 0
    client = mlflow_client(run)
    got = _only_run(client)
    assert got.info.status == "FINISHED" and got.data.tags["stage"] == "binary"
    assert got.data.params["stages"] == "float,binary" and got.data.params["bits"] == "32"
    assert got.data.params["binary.bits"] == "1" and "binary.lr" not in got.data.params  # only what changes
    rid = got.info.run_id
    assert _history(client, rid, "val/acc1") == _csv(run, "val", "acc1")
    assert [v for _, v in _history(client, rid, "epoch")] == [0.0, 1.0]  # epochs go on across stages
    assert [v for _, v in _history(client, rid, "stage")] == [0.0, 1.0]
    assert got.data.tags["best_checkpoint"] == str((run / "stages" / "binary" / "checkpoints" / "best.pt").resolve())
    names = {a.path for a in client.list_artifacts(rid)}
    assert {"model.safetensors", "config.yaml", "stages"} <= names


def test_a_stage_may_not_set_its_own_logger(tmp_path, capsys):
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump({"cpu": True, "stages": [{"name": "a", "logger": "csv"}]}))
    assert run_cli("train", "--config", config, "--prefix", tmp_path / "run") == 2
    assert "--logger is for the whole run (top level)" in capsys.readouterr().err


def test_the_trackers_files_are_removed_by_overwrite(tmp_path):
    from bitrain.cli.rundir import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    for name in ("mlflow.db", "mlruns/1/x", "wandb/offline-run-1/x"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    prepare_run_dir(run, resuming=False, overwrite=True, log_name="train.log")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_the_logger_option_and_its_default():
    from bitrain.cli.schema import FIELDS

    assert "tensorboard, csv, mlflow, wandb" in FIELDS["logger"].metadata["help"]
    assert FIELDS["logger"].default == "tensorboard,csv"
