"""bitrain.deploy.conv (numba's xnor-popcount) against float convolutions of +-1 tensors, and both
packed kernels (numba, torch reference) against the float-latent models they were exported from."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary import quantizers as quant
from bitrain.binary.layers import QConv2d, QLinear
from bitrain.deploy import conv, epilogue, packed, packing
from bitrain.deploy.epilogue import batchnorm_affine
from bitrain.deploy.export import export_packed
from bitrain.deploy.load import load_packed
from bitrain.deploy.packed import PackedQLayer, resolve_kernel, use_kernel
from bitrain.deploy.reference import pack_signs
from bitrain.deploy.swaps import channels_last_stem
from bitrain.errors import UserError
from bitrain.models import build_model

# the quantizers whose forward is exactly _sign: the numba kernel takes their sign while packing
SIGN_FORWARD = tuple(record.name for record in quant.SPECS if record.sign_forward)
needs_numba = pytest.mark.skipif(not packing.available(), reason=f"numba is not installed ({packing.IMPORT_ERROR})")


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.copysign(torch.ones(()), x + 0.0)  # quantizers._sign: 0 and -0.0 -> +1


def _with_zeros(x: torch.Tensor) -> torch.Tensor:
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[3::11] = -0.0
    return x


# (batch, channels, h, w, out, kernel, stride, padding, dilation, groups)
SHAPES = {
    "3x3/2 pad 1, fan_in 333": (2, 37, 9, 11, 13, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "groups 2, 35 channels each": (1, 70, 5, 6, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "1x1/2 pad 0, fan_in 130": (3, 130, 7, 7, 20, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    "3x3 pad 0, fan_in 576": (2, 64, 6, 5, 96, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    "3x1 dilation 2, pad (1, 0), groups 4": (1, 16, 9, 9, 8, (3, 1), (1, 1), (1, 0), (2, 2), 4),
    "2x2 pad 1, 200 channels": (2, 200, 4, 4, 5, (2, 2), (1, 1), (1, 1), (1, 1), 1),
    "tiny map, 100 outputs in blocks": (1, 40, 3, 3, 100, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    # rows of 21 and 27 outputs: two 8 x 8 transposed blocks across, three down, and the rest one by one
    "wide rows, 8x8 blocks and remainders": (2, 70, 11, 21, 27, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "wide rows, groups 2, 3x3/2": (1, 128, 6, 37, 48, (3, 3), (2, 2), (1, 1), (1, 1), 2),
}


@needs_numba
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_xnor_conv_is_the_float_conv_of_the_signs(case):
    n, c, h, w, o, k, stride, pad, dil, groups = SHAPES[case]
    g = torch.Generator().manual_seed(len(case))
    x = _with_zeros(torch.randn(n, c, h, w, generator=g))
    weight = torch.randn(o, c // groups, *k, generator=g)
    words = packing.pack_weights(pack_signs((weight >= 0).reshape(o, -1)), list(weight.shape), groups)
    # QConv2d's semantics: the +-1 input padded with -1
    padded = F.pad(_sign(x), (pad[1], pad[1], pad[0], pad[0]), value=-1.0)
    expected = F.conv2d(padded, _sign(weight), None, stride, 0, dil, groups)
    geometry = dict(kernel_size=k, stride=stride, padding=pad, dilation=dil, fan_in=weight[0].numel())
    dot = conv.xnor_conv(x, words, count=False, **geometry)
    assert dot.dtype == torch.float32 and dot.is_contiguous()
    assert torch.equal(dot, expected)
    count = conv.xnor_conv(x, words, count=True, **geometry)
    assert torch.equal(count, (expected + weight[0].numel()) / 2)


@needs_numba
def test_xnor_conv_on_random_geometries():
    """Shapes no one chose: groups, odd channel counts, kernels 1-5, strides 1-3, dilation, padding up to 3,
    channels_last and strided inputs, against the float conv of the signs."""
    rng, gen = random.Random(17), torch.Generator().manual_seed(18)
    for _ in range(60):
        groups, cg, og = (
            rng.choice([1, 1, 2, 3]),
            rng.choice([3, 31, 64, 65, 129]),
            rng.choice([1, 7, 8, 9, 16, 33, 48]),
        )
        k = (rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 3, 5]))
        stride = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3]))
        dil = (rng.choice([1, 2]), rng.choice([1, 2])) if rng.random() < 0.3 else (1, 1)
        pad = (rng.randint(0, 3), rng.randint(0, 3))
        h = rng.randint(max(1, dil[0] * (k[0] - 1) + 1 - 2 * pad[0]), 14)
        w = rng.randint(max(1, dil[1] * (k[1] - 1) + 1 - 2 * pad[1]), 30)
        x = _with_zeros(torch.randn(rng.choice([1, 2, 3]), cg * groups, h, 2 * w, generator=gen))[..., ::2]  # strided
        if rng.random() < 0.3:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(og * groups, cg, *k, generator=gen)
        words = packing.pack_weights(pack_signs((weight >= 0).reshape(og * groups, -1)), list(weight.shape), groups)
        padded = F.pad(_sign(x), (pad[1], pad[1], pad[0], pad[0]), value=-1.0)
        expected = F.conv2d(padded, _sign(weight), None, stride, 0, dil, groups)
        geometry = dict(kernel_size=k, stride=stride, padding=pad, dilation=dil, fan_in=weight[0].numel())
        assert torch.equal(conv.xnor_conv(x, words, count=False, **geometry), expected), (x.shape, geometry, groups)


@needs_numba
def test_xnor_linear_and_the_packing_bits():
    g = torch.Generator().manual_seed(5)
    x, w = _with_zeros(torch.randn(5, 131, generator=g)), torch.randn(11, 131, generator=g)
    words = packing.pack_weights(pack_signs(w >= 0), [11, 131])
    dot = conv.xnor_conv(x.reshape(5, 131, 1, 1), words, fan_in=131, count=False).reshape(5, 11)
    assert torch.equal(dot, _sign(x) @ _sign(w).T)
    # the fused sign: 0, -0.0, tiny and infinite values, NaN keeps its sign bit (copysign(1, NaN) is +-1)
    probe = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0, float("inf"), -float("inf"), float("nan")])
    bits = packing.pack_activations(probe.reshape(1, -1, 1, 1))
    expected = sum(1 << i for i, v in enumerate(_sign(probe).tolist()) if v > 0)
    assert bits.shape == (1, 1, 1, 1) and int(bits[0, 0, 0, 0]) == expected == 0b101111100
    padded = packing.pack_activations(torch.ones(1, 65, 2, 1), padding=(1, 2))
    assert padded.shape == (1, 4, 5, 2) and padded[0, 1, 2].tolist() == [2**64 - 1, 1]  # 64 + 1 channels
    assert padded[0, 0].tolist() == [[0, 0]] * 5  # the border: all bits 0, i.e. -1


def test_fused_sign_quantizers_are_that_sign():
    """The numba path takes sign(x) while packing for SIGN_FORWARD, without running the quantizer:
    each must give exactly _sign (0 and -0.0 -> +1). Other +-1 quantizers (a 0 -> -1 heaviside, a
    callable) run first and are packed from their output."""
    probe = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert SIGN_FORWARD == ("det_sign", "approx_sign", "swish_sign")  # QuantizerSpec.sign_forward
    for name in SIGN_FORWARD:
        record = quant.spec(name)
        assert record is not None and record.plus_minus_one and 1 in record.bits, name
        assert torch.equal(quant.get_quantizer(name, 1)(probe.clone()), _sign(probe)), name
    assert QConv2d(2, 2, 1, activation_method="det_sign").act.method in SIGN_FORWARD


def _calibrated(model: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """BatchNorm statistics from noise images and random affine terms (some scales negative)."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *shape, generator=g))
        for m in norms:
            if m.affine:
                m.weight.copy_(torch.randn(m.num_features, generator=g) + 0.5)
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
    return model.eval()


MODELS = {  # name -> (in_channels, image_size, batch)
    "lenet": (1, 28, 6),
    "tiny_resnet_e": (1, 8, 16),
    "resnet18_e1": (3, 64, 2),  # 64 px: the ImageNet stem (StemConv2d, ChannelsLastMaxPool2d: channels_last)
}


@needs_numba
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_models_packed_equal_float_with_both_kernels(tmp_path, name):
    c, size, batch = MODELS[name]
    args = dict(name=name, num_classes=10, in_channels=c, image_size=size)
    torch.manual_seed(3)
    model = build_model(**args)
    channels_last_stem(model)  # the float model as the engine runs it: its stem through channels_last
    model = _calibrated(model, (c, size, size), seed=4)
    x = torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    export_packed(model, tmp_path / "m.safetensors", model_args=args)
    fused = []
    for kernel in ("numba", "torch"):
        loaded = load_packed(tmp_path / "m.safetensors", build_model, kernel=kernel)
        layers = [m for m in loaded.modules() if isinstance(m, PackedQLayer)]
        fused += [m for m in layers if m.kernel == "numba"]
        assert layers and {m.kernel for m in layers} == {kernel}
        with torch.no_grad():
            got = loaded(x)
        # plain binary nets: the same integer counts, then the same float layers: bit-identical logits
        assert torch.equal(got, expected), (kernel, (got - expected).abs().max())
    if name != "lenet":  # ResNetE: every binary conv is followed by its BatchNorm, now in the epilogue
        assert fused and all(m.norm is not None and m._affine is not None for m in fused)
        if torch.backends.cpu.get_cpu_capability() == "AVX512":  # torch's BatchNorm is an FMA there
            assert {m._affine[1][2] for m in fused} == {1}


@needs_numba
@pytest.mark.parametrize("pad_value", [0.0, 1.0])
def test_zero_and_plus_one_padding_run_in_the_kernel(tmp_path, pad_value):
    """larq's zero padding and QuickNet's +1: the kernel pads -1 and a border term adds the difference."""

    def factory(name="padded"):
        torch.manual_seed(11)
        return nn.Sequential(
            nn.Conv2d(3, 40, 3, padding=1, bias=False),
            nn.BatchNorm2d(40),
            QConv2d(40, 70, 3, stride=2, padding=1, pad_value=pad_value),
            nn.BatchNorm2d(70),
            QConv2d(70, 70, (3, 1), padding=(1, 0), groups=2, pad_value=pad_value),
            nn.BatchNorm2d(70),
            nn.Flatten(1),
            QLinear(70 * 5 * 5, 10),
        )

    model = _calibrated(factory(), (3, 9, 9), seed=12)
    x = torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        expected = model(x)
    export_packed(model, tmp_path / "p.safetensors", model_args={"name": "padded"})
    for kernel in ("numba", "torch"):
        loaded = load_packed(tmp_path / "p.safetensors", factory, kernel=kernel)
        assert loaded[2].numba_inputs and not loaded[2].settings.xnor_inputs
        for size in (9, 9, 11):  # the border term is cached per input size
            inputs = x if size == 9 else torch.randn(2, 3, size, size)
            with torch.no_grad():
                got, want = loaded[:6](inputs), model[:6](inputs)
            assert torch.equal(got, want), (kernel, size)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected), kernel


class Scaled(nn.Module):
    """Binary convs and a binary linear with binet / xnor scaling, and a +-1 activation that is not
    the fused sign (a threshold at 0.25, 0 -> -1), between BatchNorms."""

    def __init__(self, approximation: str):
        super().__init__()
        q = dict(bits=1, bits_a=1, approximation=approximation)
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24))
        self.q1 = nn.Sequential(QConv2d(24, 70, 3, stride=2, padding=1, **q), nn.BatchNorm2d(70))
        step = lambda x: torch.where(x > 0.25, 1.0, -1.0)  # noqa: E731
        self.q2 = nn.Sequential(
            QConv2d(70, 70, 3, padding=1, groups=2, activation_method=step, **q), nn.BatchNorm2d(70)
        )
        self.ql = QLinear(70 * 4 * 4, 10, **q)

    def forward(self, x):
        x = self.stem(x)
        x = self.q1(x)
        x = x + self.q2(x)
        return self.ql(x.flatten(1))


@needs_numba
@pytest.mark.parametrize("approximation", ["", "binet", "xnor"])
def test_scaled_layers_and_a_plain_step_activation(tmp_path, approximation):
    torch.manual_seed(6)
    model = _calibrated(Scaled(approximation), (3, 8, 8), seed=7)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(x)
    export_packed(model, tmp_path / "s.safetensors", model_args={"name": "scaled"})
    outputs = {}
    for kernel in ("numba", "torch"):
        loaded = load_packed(tmp_path / "s.safetensors", lambda name: Scaled(approximation), kernel=kernel)
        assert loaded.q2[0].fused_sign is False and loaded.q1[0].fused_sign is True
        with torch.no_grad():
            outputs[kernel] = loaded(x)
    # both kernels give the same integer dots and then the same float ops: identical to each other
    assert torch.equal(outputs["numba"], outputs["torch"])
    # against the float-latent model: within float rounding (the float conv sums +-alpha in another order)
    torch.testing.assert_close(outputs["numba"], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(outputs["numba"].argmax(1), expected.argmax(1))


def test_kernel_choice_and_the_one_fallback_line(tmp_path, monkeypatch, capsys):
    args = dict(name="tiny_resnet_e", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(9)
    model = _calibrated(build_model(**args), (1, 8, 8), seed=10)
    export_packed(model, tmp_path / "t.safetensors", model_args=args)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setenv("BITRAIN_KERNEL", "torch")  # the documented switch
    loaded = load_packed(tmp_path / "t.safetensors", build_model)
    assert {m.kernel for m in loaded.modules() if isinstance(m, PackedQLayer)} == {"torch"}
    monkeypatch.setenv("BITRAIN_KERNEL", "fastest")
    with pytest.raises(UserError, match="BITRAIN_KERNEL=fastest .*valid: auto, numba, torch"):
        resolve_kernel()
    with pytest.raises(UserError, match="kernel='gpu'"):
        resolve_kernel("gpu")
    monkeypatch.delenv("BITRAIN_KERNEL")
    capsys.readouterr()
    # without numba: auto falls back to the reference with one line on stderr, once per process
    monkeypatch.setattr(packing, "numba", None)
    monkeypatch.setattr(packed, "_NOTED", [])
    for _ in range(2):
        loaded = load_packed(tmp_path / "t.safetensors", build_model)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected)
    assert use_kernel(loaded, "auto") == "torch"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "numba is not installed" in err[0] and "bitrain[fast]" in err[0]
    with pytest.raises(UserError, match=r"kernel='numba': numba does not import .*bitrain\[fast\]"):
        load_packed(tmp_path / "t.safetensors", build_model, kernel="numba")


@needs_numba
def test_batchnorm_fused_into_the_epilogue(tmp_path, monkeypatch):
    """load_packed moves each BatchNorm2d after a packed conv into it (an Identity in its place); numba
    applies it in the kernel's epilogue in the form that equals torch's BatchNorm on every count."""
    args = dict(name="tiny_resnet_e", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(14)
    model = _calibrated(build_model(**args), (1, 8, 8), seed=15)
    export_packed(model, tmp_path / "t.safetensors", model_args=args)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        expected = model(x)
    plain = load_packed(tmp_path / "t.safetensors", build_model, fuse_bn=False)
    fused = load_packed(tmp_path / "t.safetensors", build_model)
    fused_layers = [m for m in fused.modules() if isinstance(m, PackedQLayer) and m.norm is not None]
    assert len(fused_layers) == 4 and not any(m.norm for m in plain.modules() if isinstance(m, PackedQLayer))
    identities = [sum(isinstance(m, nn.Identity) for m in net.modules()) for net in (plain, fused)]
    assert identities[1] == identities[0] + 4 and isinstance(fused.get_submodule("2.body.1"), nn.Identity)
    keys = set(fused.state_dict())
    assert any(k.endswith(".norm.running_var") for k in keys) and len(keys) == len(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(fused(x), expected) and torch.equal(plain(x), expected)
    form = fused_layers[0]._affine[1]
    assert form is not None and form[2] in (1, 2)

    # the form is checked on every count: a BatchNorm in double precision matches neither float32 form
    norm = copy.deepcopy(fused_layers[0].norm)
    wide = nn.BatchNorm2d(norm.num_features).double().eval()
    wide.load_state_dict(norm.state_dict())
    probe = lambda t: wide(t.double()).float()  # noqa: E731
    monkeypatch.setattr(norm, "forward", probe)
    assert batchnorm_affine(norm, fused_layers[0].fan_in) is None

    # no matching form: the layer runs torch's BatchNorm after the kernel, the same values
    monkeypatch.setattr(epilogue, "AFFINE_FORMS", ())
    again = load_packed(tmp_path / "t.safetensors", build_model)
    with torch.no_grad():
        assert torch.equal(again(x), expected)
    assert all(m._affine[1] is None for m in again.modules() if isinstance(m, PackedQLayer) and m.norm is not None)
    monkeypatch.undo()

    # training mode: batch statistics, exactly as the unfused model (its running statistics too)
    fused.train(), plain.train()
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
    assert torch.equal(fused.get_submodule("2.body.0").norm.running_mean, plain.get_submodule("2.body.1").running_mean)


THREADS_PROBE = """
import torch
torch.set_num_threads(1)
from bitrain.deploy import conv, packing
from bitrain.deploy.reference import pack_signs
w = packing.pack_weights(pack_signs(torch.randn(8, 72) >= 0), [8, 8, 3, 3])
conv.xnor_conv(torch.randn(1, 8, 5, 5), w, kernel_size=(3, 3), padding=(1, 1), fan_in=72, count=True)
print(torch.get_num_threads())
"""


@needs_numba
def test_the_first_kernel_call_keeps_torch_threads():
    """numba's OpenMP pool, started by the first kernel call, sets the OpenMP default of the libgomp torch
    shares to all of numba's threads: ``packing.set_threads`` puts torch's setting back."""
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", THREADS_PROBE], capture_output=True, text=True, env=env, check=True)
    assert run.stdout.split() == ["1"]
