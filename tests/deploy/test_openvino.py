"""bitrain.deploy.openvino: every 1-bit conv one BinaryConvolution, the same outputs as the eval model."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_export import Digits, Net32, _randomize_bn

from bitrain.binary.layers import QConv2d
from bitrain.errors import UserError

ov = pytest.importorskip("openvino", reason="the OpenVINO export needs the openvino package (bitrain[openvino])")
pytestmark = pytest.mark.runtimes  # conftest: run last (forking after these runtimes start can crash)

from bitrain.deploy.openvino import (  # noqa: E402
    MISSING,
    OpenVINOModel,
    build_graph,
    count_ops,
    export_openvino,
    load_openvino,
)


def _nasty(shape, seed=0) -> torch.Tensor:
    """Normal values with exact zeros, -0.0 and subnormals (det_sign: all of those but -1e-39 are +1)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[0, :, 0, :2] = 0.0
    x[-1, :, 1, :2] = -0.0
    x[:, :, 2, 0] = 1e-39
    x[:, :, 2, 1] = -1e-39
    return x


def _compare(model: nn.Module, x: torch.Tensor, tmp_path=None):
    """(expected, got, graph): the eval model and its IR (saved and read back when tmp_path is given)."""
    model = model.eval()
    with torch.no_grad():
        expected = model(x)
    if tmp_path is None:
        graph = build_graph(model, x.shape)
    else:
        export_openvino(model, tmp_path / "m.xml", input_shape=x.shape, model_args={"name": "t"}, meta={"k": 1})
        graph = ov.Core().read_model(str(tmp_path / "m.xml"))
    return expected, OpenVINOModel(graph, threads=1)(x), graph


LAYERS = {
    "3x3": dict(c=32, kernel_size=3, padding=1),
    "1x1": dict(c=32, kernel_size=1),
    "strided": dict(c=32, kernel_size=3, stride=2, padding=1),
    "strided_1x1": dict(c=16, kernel_size=1, stride=2),
    "channels_20": dict(c=20, kernel_size=3, padding=1),  # in_channels % 8 != 0 (the CPU kernel's bug)
    "channels_3_strided": dict(c=3, kernel_size=3, stride=2, padding=1),
    "dilated": dict(c=16, kernel_size=3, padding=2, dilation=2),
    "asymmetric": dict(c=16, kernel_size=(3, 1), stride=2, padding=(1, 0)),
    "pad_plus_one": dict(c=16, kernel_size=3, padding=1, pad_value=1.0, no_offset=True),  # QuickNet
    "pad_zero": dict(c=12, kernel_size=3, padding=1, pad_value=0.0),
    "no_offset": dict(c=16, kernel_size=3, padding=1, no_offset=True),
    "binet": dict(c=16, kernel_size=3, padding=1, approximation="binet"),
    "xnor": dict(c=16, kernel_size=3, padding=1, approximation="xnor"),
    "approx_sign": dict(c=16, kernel_size=3, padding=1, activation_method="approx_sign"),
    "magnitude_aware": dict(c=16, kernel_size=3, padding=1, weight_quantization="magnitude_aware_sign"),
    "dorefa_weights": dict(c=16, kernel_size=3, padding=1, weight_quantization="dorefa"),
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_one_binary_conv_is_one_binary_convolution_and_exact(case):
    kw = dict(LAYERS[case])
    c = kw.pop("c")
    torch.manual_seed(3)
    layer = QConv2d(c, 24, bits=1, bits_a=1, **kw)
    x = _nasty((3, c, 9, 9))
    expected, got, graph = _compare(layer, x)
    assert count_ops(graph).get("BinaryConvolution") == 1
    scaled = layer.approximation != "" or kw.get("weight_quantization") == "magnitude_aware_sign"
    if scaled:  # float scales: rounding only
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # integer dot products, offset, pad: exact
        assert torch.equal(got, expected)


def test_float_input_and_grouped_binary_convs_run_as_float_convs():
    """bits_a=32 (binary weights, float input) and groups > 1: float ops with the quantized weights."""
    for layer in (QConv2d(16, 16, 3, padding=1, bits=1, bits_a=32), QConv2d(16, 16, 3, padding=1, groups=4, bits=1)):
        expected, got, graph = _compare(layer, _nasty((2, 16, 7, 7)))
        assert "BinaryConvolution" not in count_ops(graph)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("approximation,no_offset", [("", False), ("", True), ("binet", False), ("xnor", False)])
def test_digits_net_agrees_on_200_inputs(tmp_path, approximation, no_offset):
    torch.manual_seed(0)
    model = _randomize_bn(Digits(approximation=approximation, no_offset=no_offset))
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected, got, graph = _compare(model, x, tmp_path)
    assert count_ops(graph).get("BinaryConvolution") == 2  # q1, q2 (the QLinear is a MatMul)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-4)


def test_net32_residuals_groups_dilation_agree():
    """Net32 (the packed export's test net): 4 BinaryConvolution (b3 grouped, b6 float input: float convs);
    its residual sums before a binarization are where OpenVINO's fused binarization went wrong."""
    torch.manual_seed(0)
    model = _randomize_bn(Net32())
    x = torch.randn(50, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected, got, graph = _compare(model, x)
    assert count_ops(graph).get("BinaryConvolution") == 4
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)


def test_tiny_resnet_e_agrees_and_reads_back(tmp_path):
    from bitrain.deploy.swaps import channels_last_stem
    from bitrain.models import build_model

    torch.manual_seed(0)
    model = _randomize_bn(build_model(name="tiny_resnet_e", num_classes=10, in_channels=1, image_size=8))
    channels_last_stem(model)  # as the reader hands it over
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected, got, graph = _compare(model, x, tmp_path)
    n_binary = sum(isinstance(m, QConv2d) and m.bits == 1 for m in model.modules())
    assert count_ops(graph).get("BinaryConvolution") == n_binary == 4
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-3)
    loaded, meta = load_openvino(tmp_path / "m.xml")
    assert meta == {"model_args": {"name": "t"}, "meta": {"k": 1}}
    for n in (1, 7):  # the static IR is reshaped for each batch size
        assert torch.equal(loaded(x[:n]).argmax(1), expected[:n].argmax(1))


def test_unsupported_layers_are_refused_naming_them():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = QConv2d(8, 8, 3, padding=1, bits=1, bits_a=4)
            self.up = nn.Upsample(scale_factor=2)

        def forward(self, x):
            return self.up(self.q(x))

    with pytest.raises(UserError, match=r"layer model\.q: input quantizer .* at 4 bits"):
        build_graph(Odd().eval(), (1, 8, 4, 4))

    class Gather(nn.Module):
        def forward(self, x):
            return x.transpose(2, 3)

    with pytest.raises(UserError, match=r"model \(Gather\): call_method transpose has no OpenVINO mapping"):
        build_graph(Gather(), (1, 1, 4, 4))
    with pytest.raises(UserError, match=r"model\.1: module Upsample has no OpenVINO mapping"):
        build_graph(nn.Sequential(nn.Conv2d(1, 8, 1), nn.Upsample(scale_factor=2)).eval(), (1, 1, 4, 4))


def test_without_openvino_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(UserError) as e:
        export_openvino(Digits().eval(), tmp_path / "m.xml", input_shape=(1, 1, 8, 8), model_args={"name": "t"})
    assert str(e.value) == MISSING and "pip install 'bitrain[openvino]'" in MISSING


@pytest.mark.parametrize(
    "name",
    [
        "resnet18_e1",
        "birealnet18",
        "reactnet18",
        "small_reactnet",
        "resnet50_v1",
        "densenet28",
        "realtobinarynet",
        "quicknet",
    ],
)
def test_zoo_models_agree(name):
    """Zoo nets at 32 px (BatchNorm statistics set): every argmax equal, one BinaryConvolution per 1-bit
    conv with sign inputs and no groups."""
    from bitrain.deploy.ov_layers import binary_conv_ok
    from bitrain.deploy.swaps import channels_last_stem
    from bitrain.models import build_model

    torch.manual_seed(0)
    model = build_model(name=name, num_classes=10, in_channels=3, image_size=32)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    channels_last_stem(model)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected, got, graph = _compare(model, x)
    binary = sum(binary_conv_ok(m) for m in model.modules())
    assert count_ops(graph).get("BinaryConvolution", 0) == binary
    assert binary > 0 or name == "resnet50_v1"  # its bottleneck convs binarise weights only (float inputs)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # float rounding may flip the sign of a value within ~1e-6 of 0 (then that sample's logits move a little)
    close = ((got - expected).abs() <= 1e-4 * expected.abs().max()).all(1)
    assert close.sum() >= len(x) - 1, (got - expected).abs().max(1).values


def test_traced_pad_pool_sigmoid_where_and_new_axes():
    """The calls a zoo forward makes outside modules (QuickNet's same max-pool, Real-to-Binary's gate,
    the bottleneck's ReLU by where): mapped with the same values; other pads and indexing refused."""

    class Sliced(nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 1, 1, 1))[:, :, 1:, 1:]

    class Reflect(nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 1, 1, 1), mode="reflect")

    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"indexing with slice\(1, None, None\)"):
        build_graph(Sliced(), x.shape)
    with pytest.raises(UserError, match=r"F.pad 'reflect' \[1, 1, 1, 1\] is not supported"):
        build_graph(Reflect(), x.shape)

    class Mapped(nn.Module):
        def forward(self, x):
            y = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, 1)
            gate = torch.sigmoid(y.mean(dim=(2, 3)))[:, :, None, None]
            return torch.where(y > 0, y, 0.0) * gate + F.pad(x, (1, 0, 2, 0), value=0.5).mean(dim=(2, 3), keepdim=True)

    with torch.no_grad():
        expected = Mapped()(x)
    got = OpenVINOModel(build_graph(Mapped(), x.shape), threads=1)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
