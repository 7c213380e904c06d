"""bitrain export m.xml / m.onnx, then bitrain eval and predict of them; --engine on eval and predict."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import run_cli

pytest.importorskip("openvino", reason="the OpenVINO export needs the openvino package (bitrain[openvino])")
pytestmark = pytest.mark.runtimes  # conftest: run last (forking after these runtimes start can crash)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats") / "run"
    args = ("--dataset", "digits", "--model", "tiny_resnet_e", "--epochs", "1", "--test-run", "--cpu")
    assert run_cli("train", *args, "--log-interval", "0", "--prefix", d) == 0
    return d / "checkpoints" / "best.pt"


def _eval(capsys, *args) -> dict:
    assert run_cli("eval", *args, "--json") == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _same(a: dict, b: dict) -> None:
    assert (a["acc1"], a["acc5"], a["samples"]) == (b["acc1"], b["acc5"], b["samples"])
    assert abs(a["loss"] - b["loss"]) < 1e-5


def test_openvino_export_evals_as_the_checkpoint(ckpt, tmp_path, capsys):
    import openvino as ov

    assert run_cli("export", ckpt, tmp_path / "m.xml") == 0
    assert "4 BinaryConvolution" in capsys.readouterr().out
    ops = [n.get_type_name() for n in ov.Core().read_model(str(tmp_path / "m.xml")).get_ordered_ops()]
    assert ops.count("BinaryConvolution") == 4  # tiny_resnet_e's four 1-bit convs
    graph = ov.Core().read_model(str(tmp_path / "m.xml"))
    data = json.loads(graph.get_rt_info(["bitrain", "meta"]).astype(str))["data"]
    assert data["classes"] == [str(i) for i in range(10)] and data["image_size"] == 8 and len(data["mean"]) == 1
    assert json.loads(graph.get_rt_info(["bitrain", "model_args"]).astype(str))["name"] == "tiny_resnet_e"
    want = _eval(capsys, ckpt)
    _same(_eval(capsys, tmp_path / "m.xml"), want)
    for engine in ("openvino", "numba", "torch"):
        _same(_eval(capsys, ckpt, "--engine", engine), want)


def test_onnx_export_evals_as_the_checkpoint(ckpt, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="running the ONNX export needs onnxruntime (bitrain[onnx])")
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript (bitrain[onnx])")
    assert run_cli("export", ckpt, tmp_path / "m.bin", "--format", "onnx") == 0
    capsys.readouterr()
    (tmp_path / "m.bin").rename(tmp_path / "m.onnx")
    _same(_eval(capsys, tmp_path / "m.onnx"), _eval(capsys, ckpt))


def test_predict_an_ir_and_with_engine(ckpt, tmp_path, capsys):
    from PIL import Image

    from bitrain.data.build import load_digits_split

    _, _, x, _ = load_digits_split()
    for i in range(3):
        Image.fromarray(x[i][0]).save(tmp_path / f"{i}.png")
    assert run_cli("export", ckpt, tmp_path / "m.xml") == 0
    capsys.readouterr()
    docs = []
    for args in ((tmp_path / "m.xml",), (ckpt,), (ckpt, "--engine", "openvino")):
        assert run_cli("predict", args[0], *[tmp_path / f"{i}.png" for i in range(3)], *args[1:], "--json") == 0
        docs.append(json.loads(capsys.readouterr().out)["predictions"])
    classes = [[[t["class"] for t in p["top"]] for p in doc] for doc in docs]
    assert len(classes[0]) == 3 and classes[0] == classes[1] == classes[2]
    for a, b in zip(docs[0], docs[1]):  # the IR's probabilities are the checkpoint's, to float rounding
        assert all(abs(s["prob"] - t["prob"]) < 1e-5 for s, t in zip(a["top"], b["top"]))


def test_engine_mismatch_and_missing_openvino_are_one_line(ckpt, tmp_path, capsys, monkeypatch):
    assert run_cli("export", ckpt, tmp_path / "m.xml") == 0
    capsys.readouterr()
    assert run_cli("eval", tmp_path / "m.xml", "--engine", "numba") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs on openvino" in err, err
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert run_cli("export", ckpt, tmp_path / "n.xml") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'bitrain[openvino]'" in err, err
    assert not (tmp_path / "n.xml").exists()
