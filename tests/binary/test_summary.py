"""bitrain.binary.summary: hand-counted figures on a small mixed-precision model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.binary.summary import network_dot, plot_network, summarize


class Tiny(nn.Module):
    """1x8x8 input: float stem, two binary convs (one strided, one grouped), a binary-weight /
    float-activation 1x1 conv, then a float classifier."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1, bias=True)
        self.bn0 = nn.BatchNorm2d(4)
        self.q1 = QConv2d(4, 8, 3, stride=2, padding=1, bits=1, bits_a=1)
        self.q2 = QConv2d(8, 8, 3, padding=1, groups=2, bits=1, bits_a=1)
        self.q3 = QConv2d(8, 8, 1, bits=1, bits_a=32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn0(self.conv0(x))
        x = self.q1(x)
        x = x + self.q2(x)  # a shortcut, for the graph edges
        x = self.relu(self.q3(x))
        return self.fc(self.pool(x).flatten(1))


def test_hand_counted_figures():
    s = summarize(Tiny(), (1, 8, 8))
    rows = {r.name: r for r in s.layers}
    assert [r.name for r in s.layers] == ["conv0", "bn0", "q1", "q2", "q3", "relu", "pool", "fc"]

    # conv0: 4x1x3x3 weight + 4 bias, float; output 4x8x8, each output 1*3*3 MACs
    assert rows["conv0"].weights_by_bits == {32: 4 * 1 * 3 * 3 + 4}
    assert rows["conv0"].output_shape == (4, 8, 8)
    assert rows["conv0"].macs_float == 4 * 8 * 8 * (1 * 3 * 3)
    # bn0: gamma, beta are parameters; running mean and var (4 each) are buffers; num_batches_tracked neither
    assert rows["bn0"].weights_by_bits == {32: 2 * 4} and rows["bn0"].buffers == 2 * 4
    assert rows["bn0"].memory_bytes == 4 * 4 * 4
    assert rows["bn0"].macs_float == rows["bn0"].macs_binary == 0
    # q1: 8x4x3x3 one-bit weights; stride 2 -> 8x4x4 outputs, 4*3*3 binary MACs each
    assert rows["q1"].input_bits == 1
    assert rows["q1"].weights_by_bits == {1: 8 * 4 * 3 * 3}
    assert rows["q1"].output_shape == (8, 4, 4)
    assert rows["q1"].macs_binary == 8 * 4 * 4 * (4 * 3 * 3)
    assert rows["q1"].memory_bytes == 8 * 4 * 3 * 3 / 8
    # q2: groups=2 -> each filter sees 8/2 channels
    assert rows["q2"].weights_by_bits == {1: 8 * (8 // 2) * 3 * 3}
    assert rows["q2"].macs_binary == 8 * 4 * 4 * ((8 // 2) * 3 * 3)
    # q3: 1-bit weights but 32-bit input -> float MACs
    assert rows["q3"].input_bits == 32
    assert rows["q3"].weights_by_bits == {1: 8 * 8}
    assert (rows["q3"].macs_binary, rows["q3"].macs_float) == (0, 8 * 4 * 4 * 8)
    # fc: 10x8 weight + 10 bias
    assert rows["fc"].weights_by_bits == {32: 10 * 8 + 10}
    assert rows["fc"].macs_float == 10 * 8
    assert rows["pool"].output_shape == (8, 1, 1)

    n_float = (36 + 4) + 8 + 90  # conv0, bn0 (gamma, beta), fc
    n_bin = 288 + 288 + 64  # q1, q2, q3
    assert s.weights_by_bits == {1: n_bin, 32: n_float}
    assert s.total_params == n_float + n_bin == 778  # parameters only, as torch and larq count them
    assert s.total_buffers == 8  # bn0's running statistics: in the size, not in the parameters
    assert s.total_params + s.total_buffers == sum(p.numel() for p in Tiny().state_dict().values()) - 1
    size = (n_float + 8) * 4 + n_bin / 8  # 584 + 80 bytes
    assert s.size_bytes == size == 664
    assert s.size_mb == pytest.approx(664 / 2**20)
    assert s.float32_bytes == 786 * 4
    assert s.compression_ratio == pytest.approx(3144 / 664)
    macs_bin = 4608 + 4608
    macs_float = 2304 + 1024 + 80
    assert (s.macs_binary, s.macs_float) == (macs_bin, macs_float)
    assert s.binary_mac_share == pytest.approx(9216 / (9216 + 3408))
    assert s.combined_flops == pytest.approx(9216 / 64 + 3408)  # = 3552


def test_format_and_dict():
    s = summarize(Tiny(), (1, 8, 8))
    text = s.format()
    for needle in (
        "q2",
        "QConv2d",
        "4x4",
        "Total params",
        "778",
        "MiB",
        "664 bytes",
        "Compression ratio",
        "4.73",
        "Combined FLOPs",
        "3,552",
        "73.00 % binary",
    ):
        assert needle in text, needle
    assert text == summarize(Tiny(), (1, 8, 8)).format()  # deterministic
    d = json.loads(json.dumps(s.to_dict()))  # JSON-ready
    assert d["totals"]["params"] == 778 and d["totals"]["buffers"] == 8
    assert d["totals"]["macs_binary"] == 9216
    assert d["layers"][2]["name"] == "q1" and d["layers"][2]["output_shape"] == [8, 4, 4]


def test_summary_leaves_model_untouched():
    m = Tiny().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    summarize(m, (1, 8, 8))
    assert m.training
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not m.q1._forward_hooks


def test_shared_module_counts_every_call():
    relu = nn.ReLU()
    lin = nn.Linear(4, 4, bias=False)
    m = nn.Sequential(lin, relu, lin, relu)  # same Linear called twice
    s = summarize(m, (4,))
    assert [r.name for r in s.layers] == ["0", "1"]
    assert s.layers[0].calls == 2 and s.layers[0].macs_float == 2 * 16
    assert s.total_params == 16


def test_k_bit_weights_take_k_over_32_of_a_float():
    from bitrain.binary.layers import QLinear

    m = nn.Sequential(QLinear(8, 6, bits=4, bits_a=4), QLinear(6, 3, bits=1, bits_a=32), nn.Linear(3, 3))
    s = summarize(m, (8,))
    assert s.layers[0].weights_by_bits == {4: 6 * 8}
    assert s.layers[0].memory_bytes == 6 * 8 * 4 / 8  # 4 bits each
    assert s.layers[1].weights_by_bits == {1: 3 * 6}  # a binary layer has no bias (BMXNet refuses one)
    assert s.layers[1].memory_bytes == 18 / 8
    assert s.layers[2].weights_by_bits == {32: 3 * 3 + 3}  # the float layer's bias is float
    assert (s.macs_binary, s.macs_float) == (0, 6 * 8 + 3 * 6 + 3 * 3)  # neither Q layer is 1-bit x 1-bit
    assert s.compression_ratio == pytest.approx((48 + 18 + 12) * 4 / (24 + 2.25 + 48))


def test_model_that_is_one_q_layer():
    s = summarize(QConv2d(2, 4, 3, padding=1, bits=1, bits_a=1), (2, 5, 5))
    assert [(r.name, r.type) for r in s.layers] == [("", "QConv2d")]  # its QActivation is folded in
    assert s.macs_binary == 4 * 5 * 5 * (2 * 9) and "(model)" in s.format()


def test_plot_network(tmp_path):
    msg = plot_network(Tiny(), (1, 8, 8), tmp_path / "net")
    txt = (tmp_path / "net.txt").read_text()
    assert "Compression ratio" in txt
    try:
        import shutil

        import graphviz  # noqa: F401

        has_graphviz = shutil.which("dot") is not None
    except ImportError:
        has_graphviz = False
    assert (tmp_path / "net.gv").exists() == has_graphviz
    assert ("skipped" in msg) != has_graphviz


def test_network_dot_edges():
    m = Tiny()
    dot = network_dot(m, summarize(m, (1, 8, 8)))
    # the shortcut: q1 feeds both q2 and q3 (through the add)
    for edge in ('"conv0" -> "bn0"', '"q1" -> "q2"', '"q1" -> "q3"', '"q2" -> "q3"', '"pool" -> "fc"'):
        assert edge in dot, edge
    assert dot.startswith("digraph")


def test_resnet18_e1_imagenet_figures():
    """ResNetE-18 at 224 px, 1000 classes, against hand counts of the architecture."""
    from bitrain.models import build_model

    s = summarize(build_model("resnet18_e1", num_classes=1000, image_size=224), (3, 224, 224))
    conv3 = 9  # 3x3 kernel
    # binary 3x3 convs: 4 per stage; the first of stages 2-4 goes c -> 2c at stride 2
    binary_3x3 = 4 * 64 * 64 * conv3 + sum(c * 2 * c * conv3 + 3 * (2 * c) ** 2 * conv3 for c in (64, 128, 256))
    binary_1x1 = 64 * 128 + 128 * 256 + 256 * 512  # binary downsample shortcuts (ResNetE default)
    assert s.weights_by_bits[1] == binary_3x3 + binary_1x1 == 11_157_504
    # binary MACs: every 3x3 conv of a stage has the same count, except the strided first one (half)
    stage1 = 4 * 56 * 56 * 64 * (64 * conv3)
    later = sum(hw * hw * c * (c * conv3) * 3.5 + hw * hw * c * (c // 2) for hw, c in ((28, 128), (14, 256), (7, 512)))
    assert s.macs_binary == stage1 + later == 1_695_547_392
    # float MACs: 7x7 stem (3 -> 64, stride 2 -> 112x112) + the 512 -> 1000 classifier
    assert s.macs_float == 112 * 112 * 64 * (3 * 7 * 7) + 512 * 1000 == 118_525_952
    assert s.combined_flops == pytest.approx(1_695_547_392 / 64 + 118_525_952)
    assert 12 < s.compression_ratio < 14  # float BN/stem/head keep it below 32
    assert s.binary_mac_share == pytest.approx(0.9347, abs=1e-4)


def test_meliusnet22_totals_count_parameters_not_statistics_and_print_mib():
    """Issue 11: the summary printed 6,973,352 (BatchNorm running statistics counted) and "MB"."""
    from bitrain.models import build_model

    s = summarize(build_model("meliusnet22", num_classes=1000, image_size=224), (3, 32, 32))
    assert s.total_params == 6_948_392 and s.total_buffers == 24_960  # 6,973,352 = both together
    text = s.format()
    assert "Total params                      6,948,392" in text and "6,973,352" not in text
    assert "MiB" in text and " MB" not in text
