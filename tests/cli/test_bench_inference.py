"""``bitrain bench --inference`` (cli/bench_inference.py, race.py, race_worker.py, race_report.py): every
engine in its own process, interleaved rounds; the report's rows, ratios, agreement and skipped engines, and
``--layers`` (not the speed: timings on a shared CPU are noise).

Not marked ``runtimes``: OpenVINO and onnxruntime run in the worker processes only, never in this one, and
these tests start processes, which is safe only before a runtime's thread pools exist in this process."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics

import numpy as np
import pytest

from bitrain.cli import main
from bitrain.cli.race_worker import ENGINES

TINY = ["--model", "tiny_resnet_e", "--image-size", "8", "--in-channels", "1", "--num-classes", "10"]
FAST = ["--rounds", "2", "--slice-ms", "5", "--warmup", "2", "--threads", "1"]


def test_race_json_has_a_row_per_engine_with_paired_ratios_and_agreement(capsys):
    """All engines at batch sizes 1 and 3: positive img/s, the ratios are the medians of the per-round
    ratios the document itself lists, every engine's argmax equals its reference's."""
    available = [n for n, e in ENGINES.items() if e.needs is None or importlib.util.find_spec(e.needs)]
    assert main(["bench", "--inference", *TINY, *FAST, "--batch-size", "1,3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cpu"]["model_name"] and doc["versions"]["torch"] and doc["threads"] == 1
    assert {n for n, e in doc["engines"].items() if e["status"] == "ran"} == set(available)
    assert [b["batch"] for b in doc["batches"]] == [1, 3]
    for b in doc["batches"]:
        rows = b["rows"]
        assert list(rows) == available
        floats = [n for n in rows if ENGINES[n].group == "float"]
        best = [max(rows[n]["per_round_images_per_s"][r] for n in floats) for r in range(2)]
        assert b["strongest_float_images_per_s"] == pytest.approx(best)
        for name, row in rows.items():
            per_round = row["per_round_images_per_s"]
            assert len(per_round) == 2 and min(per_round) > 0 and row["images_per_s"] > 0
            assert row["x_strongest_float"] == pytest.approx(statistics.median(v / w for v, w in zip(per_round, best)))
            if "openvino-binary" in rows:
                ov = rows["openvino-binary"]["per_round_images_per_s"]
                assert row["x_openvino_binary"] == pytest.approx(
                    statistics.median(v / w for v, w in zip(per_round, ov))
                )
            a = row["agreement"]
            assert a["reference"] == ("packed" if ENGINES[name].group == "binary" else "torch-float")
            assert a["argmax_equal"] == a["images"] == b["batch"], name
        assert rows["torch-latent"]["agreement"]["max_abs_logit_diff"] == 0  # the packed engine is exact
    if "openvino-float" in available:
        assert doc["engines"]["openvino-float"]["info"]["precision"] in ("f32", "bf16", "f16")


def test_missing_package_is_a_skipped_engine(tmp_path, monkeypatch, capsys):
    """onnxruntime and openvino that do not import (simulated: modules on PYTHONPATH that raise) leave
    their engines skipped with the reason; the rest races, the ratios against them are '-'."""
    fake = tmp_path / "fake"
    fake.mkdir()
    for name in ("onnxruntime", "openvino"):
        (fake / f"{name}.py").write_text(f"raise ImportError('simulated: no {name} here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH")) if p))
    engines = "packed,onnxruntime-float,openvino-binary"
    assert main(["bench", "--inference", *TINY, *FAST, "--batch-size", "2", "--engines", engines]) == 0
    out = capsys.readouterr().out
    for name in ("onnxruntime", "openvino"):
        assert re.search(
            rf"^skipped: {name}-\S+ \(.*\): ImportError: {name} does not import \(simulated: no {name} here\)$",
            out,
            re.M,
        )
    assert re.search(r"^\| packed \| .* \| \d+\.\d \| \d+\.\d\d \| - \| - \| \d+ \| 2/2 = packed, max 0 \|$", out, re.M)
    assert not re.search(r"^\| (onnxruntime|openvino)", out, re.M)


def test_layers_and_the_packed_row(capsys):
    argv = ["bench", "--inference", *TINY, *FAST, "--batch-size", "1,3", "--layers", "--engines", "packed"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("bitrain bench --inference: tiny_resnet_e 1x8x8, 10 classes, 4 packed layers; 1 of 1 ")
    assert re.search(r"^cpu: .+; vector flags: ", out, re.M)
    assert re.search(r"^allocator \(in each engine's process\): allocator: ", out, re.M)
    assert re.search(
        r"^weights: 73,728 binary weights, 294,912 bytes as float32 -> 9,216 bytes packed \(32\.0x\)", out, re.M
    )
    for batch in (1, 3):
        assert re.search(rf"^\| packed \| bitrain packed engine .* \| {batch}/{batch} = packed, max 0 \|$", out, re.M)
        assert re.search(
            rf"^batch {batch}: layers ratio packed/float: \d+\.\d\d-\d+\.\d\d; the packed layers and units take "
            r"[0-9.]+ ms of the packed model's [0-9.]+ ms",
            out,
            re.M,
        )
    # each block runs as one fused unit: conv + BatchNorm + its shortcut, the next three on packed inputs
    units = re.findall(
        r"^  unit (\S+): QConv2d \(\d+, \d+, 3, 3\) \+ BatchNorm2d \+ (x|shortcut \(AvgPool2d, Conv2d, BatchNorm2d\)) "
        r"on \S+( \(packed by the unit before\))?: float [0-9.]+ ms, packed [0-9.]+ ms, ratio packed/float: \d+\.\d\d$",
        out,
        re.M,
    )
    before = " (packed by the unit before)"
    expected = [("2", "x", ""), ("3", "x", before), ("4", "shortcut (AvgPool2d, Conv2d, BatchNorm2d)", before)]
    assert units == (expected + [("5", "x", before)]) * 2
    assert not re.search(r"^  layer ", out, re.M)  # no binary layer outside a unit


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--batch-size", "1,0"], "--batch-size"),
        (["--rounds", "0"], "--rounds"),
        (["--kernel", "gpu"], "--kernel"),
        (["--engines", "packed,tensorrt"], "--engines"),
        (["--slice-ms", "0"], "--slice-ms"),
    ],
)
def test_bench_inference_bad_input_is_exit_2(flags, needle, capsys):
    assert main(["bench", "--inference", "--model", "tiny_resnet_e", "--image-size", "8", *flags]) == 2
    assert needle in capsys.readouterr().err


def test_inference_is_picked_wherever_the_flag_stands(capsys):
    """``--inference`` selects the packed benchmark and its own options, before or after them."""
    assert main(["bench", "--model", "tiny_resnet_e", "--image-size", "8", "--inference", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
    assert main(["bench", "--layers"]) == 2  # the training-loop benchmark has no --layers
    assert "--layers" in capsys.readouterr().err


class _FakeWorker:
    """A worker's pipe without the process: fixed seconds per batch, or a failure at the given turn."""

    def __init__(self, name, seconds, folder, fail_at=None):
        self.name, self.seconds, self.folder, self.fail_at, self.turns, self.closed = (
            name,
            seconds,
            folder,
            fail_at,
            0,
            False,
        )

    def ask(self, cmd, **kw):
        from bitrain.cli.race import WorkerError

        if cmd == "prepare":
            path = self.folder / f"{self.name}.npy"
            np.save(path, np.eye(3, dtype=np.float32)[: kw["batch"]])
            return {"seconds": self.seconds, "logits": str(path), "info": {}}
        self.turns += 1
        if self.turns == self.fail_at:
            raise WorkerError("its process exited with code -11")
        return {"seconds": self.seconds * kw["k"]}

    def cpu_seconds(self):
        return 0.0

    def close(self):
        self.closed = True


def test_rounds_rotate_and_a_failing_engine_is_dropped(tmp_path):
    """race_batch without processes: every engine gets a turn per round, k from its warm-up time; an
    engine whose worker fails leaves the race with the reason, the others keep all their rounds."""
    from bitrain.cli.race import race_batch

    workers = {
        "packed": _FakeWorker("packed", 0.01, tmp_path),
        "openvino-binary": _FakeWorker("openvino-binary", 0.02, tmp_path, fail_at=2),
        "torch-float": _FakeWorker("torch-float", 0.04, tmp_path),
    }
    fakes = dict(workers)
    status = {n: {"status": "ran", "info": {}} for n in workers}
    out = race_batch(2, workers, status, {"warmup": 2, "slice_s": 0.04, "rounds": 3}, lambda line: None)
    assert out["ks"] == {"packed": 4, "torch-float": 1}
    assert out["seconds"] == {"packed": [0.04] * 3, "torch-float": [0.04] * 3}
    assert status["openvino-binary"] == {
        "status": "skipped",
        "reason": "failed at batch 2: its process exited with code -11",
    }
    assert fakes["openvino-binary"].closed and "openvino-binary" not in workers
    assert out["agreement"]["packed"] == {
        "reference": "packed",
        "argmax_equal": 2,
        "images": 2,
        "max_abs_logit_diff": 0.0,
    }
