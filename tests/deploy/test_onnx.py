"""bitrain.deploy.onnx_export: the export twin in ONNX, run by onnxruntime, the same outputs as the eval model."""

from __future__ import annotations

import sys

import pytest
import torch
from test_export import Digits, Net32, _randomize_bn

from bitrain.errors import UserError

pytest.importorskip("onnx", reason="the ONNX export needs onnx, onnxruntime and onnxscript (bitrain[onnx])")
pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript (bitrain[onnx])")
pytest.importorskip("onnxruntime", reason="running the ONNX export needs onnxruntime (bitrain[onnx])")
pytestmark = pytest.mark.runtimes  # conftest: run last (forking after these runtimes start can crash)

from bitrain.deploy.onnx_export import MISSING, OnnxModel, export_onnx, export_twin  # noqa: E402


def _roundtrip(model, x, tmp_path):
    model = model.eval()
    with torch.no_grad():
        expected = model(x)
        twin = export_twin(model)(x)  # the same thing in plain ops (float scales: rounding only)
        torch.testing.assert_close(twin, expected, rtol=1e-5, atol=2e-4)
    export_onnx(model, tmp_path / "m.onnx", input_shape=(1, *x.shape[1:]), model_args={"name": "t"}, meta={"k": 1})
    loaded = OnnxModel(tmp_path / "m.onnx", threads=1)
    assert loaded.metadata() == {"model_args": {"name": "t"}, "meta": {"k": 1}}
    return expected, loaded(x)  # a batch other than the example's: the batch is dynamic


@pytest.mark.parametrize("approximation", ["", "xnor"])
def test_digits_net_onnx_agrees_on_200_inputs(tmp_path, approximation):
    torch.manual_seed(0)
    model = _randomize_bn(Digits(approximation=approximation))
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected, got = _roundtrip(model, x, tmp_path)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-4)


def test_net32_and_tiny_resnet_e_onnx_agree(tmp_path):
    from bitrain.deploy.swaps import channels_last_stem
    from bitrain.models import build_model

    torch.manual_seed(0)
    tiny = _randomize_bn(build_model(name="tiny_resnet_e", num_classes=10, in_channels=1, image_size=8))
    channels_last_stem(tiny)  # the reader's swaps: the twin undoes them
    for model, x in (
        (_randomize_bn(Net32()), torch.randn(20, 3, 32, 32)),
        (tiny, torch.randn(200, 1, 8, 8)),
    ):
        expected, got = _roundtrip(model, x, tmp_path)
        assert torch.equal(got.argmax(1), expected.argmax(1))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-3)


def test_without_onnx_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UserError) as e:
        export_onnx(Digits().eval(), tmp_path / "m.onnx", input_shape=(1, 1, 8, 8), model_args={"name": "t"})
    assert str(e.value) == MISSING
