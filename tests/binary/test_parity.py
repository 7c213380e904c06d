"""bitrain against its references: larq 0.14 / larq-zoo 2.4 and bitorch 0.4.1 (recorded fixtures, and bitorch
live where it imports), plus larq's QuickNet block. docs/parity.md says what is compared and how to re-record;
BMXNet v2's semantics, which no current environment runs, are checked against hand-written transcriptions
of its source in test_quant.py and test_layers.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from bitrain.binary import quantizers as quant
from bitrain.binary.layers import QConv2d
from bitrain.models import build_model, list_models

FIXTURES = Path(__file__).parents[1] / "fixtures" / "parity"
INF = math.inf


def _load(reference: str):
    data = np.load(FIXTURES / f"{reference}.npz")
    return data, json.loads(str(data["meta"]))


LARQ, LARQ_META = _load("larq")
BITORCH, BITORCH_META = _load("bitorch")


def _t(data, key: str) -> torch.Tensor:
    return torch.from_numpy(np.array(data[key]))


def _run(fn, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = fn(x)
    (g,) = torch.autograd.grad((y * dy).sum(), x)
    return y.detach(), g


def _compare(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    if exact:
        assert torch.equal(got, want), f"max |diff| {(got - want).abs().max().item()}"
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def nchw(t: torch.Tensor) -> torch.Tensor:  # NHWC -> NCHW
    return t.permute(0, 3, 1, 2)


def oihw(t: torch.Tensor) -> torch.Tensor:  # a Keras HWIO kernel -> torch OIHW
    return t.permute(3, 2, 0, 1)


# larq case -> (bitrain on the same tensor, exact?, layout: "" elementwise, "nhwc" or "hwio").
# Exact: signs and roundings of the same float32 values; close: transcendental functions (TF's and
# torch's tanh / cosh differ in the last ulp) and means (their sums run in another order).
LARQ_CASES = {
    "ste_sign": (lambda x: quant.det_sign(x, 1.0), True, ""),
    "ste_sign_clip1.25": (lambda x: quant.det_sign(x, 1.25), True, ""),
    "approx_sign": (lambda x: quant.approx_sign(x), True, ""),
    "swish_sign": (lambda x: quant.swish_sign(x), False, ""),
    "ste_heaviside": (lambda x: quant.ste_heaviside(x, 1.0), True, ""),
    "ste_tern": (lambda x: quant.ste_tern(x, 1.0), True, ""),
    "magnitude_aware_sign_nhwc": (lambda x: quant.get_quantizer("magnitude_aware_sign")(x, 1.0), False, "nhwc"),
    "magnitude_aware_sign_hwio": (
        lambda w: quant.get_quantizer("magnitude_aware_sign", 1, "weight")(w, 1.0),
        False,
        "hwio",
    ),
    **{
        f"dorefa_activations_{k}bit": (lambda x, k=k: quant.get_quantizer("dorefa_quantizer", k)(x), True, "")
        for k in (1, 2, 3, 4)
    },
    **{
        f"dorefa_weights_{k}bit": (
            lambda w, k=k: quant.get_quantizer("dorefa_quantizer", k, "weight")(w),
            False,
            "hwio",
        )
        for k in (1, 2, 3, 4)
    },
}


def test_fixtures_are_small_and_name_their_reference_versions():
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 200_000
    assert LARQ_META["versions"]["larq"] == "0.14.0" and LARQ_META["versions"]["larq-zoo"] == "2.4.0"
    assert BITORCH_META["versions"]["bitorch"] == "0.4.1"
    grid = _t(LARQ, "quantizers/ste_sign/x")
    for edge in (0.0, 1.0, -1.0, 1.25, -1.25, 0.05, 0.5, 1 / 6, 0.49999997):
        assert (grid == torch.tensor(edge, dtype=torch.float32)).any(), edge  # the grid holds every edge
    assert (grid == 0).sum() == 2 and torch.signbit(grid[grid == 0]).tolist().count(True) == 1  # 0.0 and -0.0


@pytest.mark.parametrize("case", sorted(LARQ_CASES))
def test_quantizer_matches_larq(case):
    fn, exact, layout = LARQ_CASES[case]
    x, dy = _t(LARQ, f"quantizers/{case}/x"), _t(LARQ, f"quantizers/{case}/dy")
    y_ref, g_ref = _t(LARQ, f"quantizers/{case}/y"), _t(LARQ, f"quantizers/{case}/grad")
    to = {"": lambda t: t, "nhwc": nchw, "hwio": oihw}[layout]
    y, g = _run(fn, to(x).contiguous(), to(dy))
    _compare(y, to(y_ref), exact or case.startswith("dorefa_weights"))  # the rounded values agree exactly
    _compare(g, to(g_ref), exact)


@pytest.mark.parametrize("case", ["ste_sign_pad0", "ste_sign_pad1_stride2", "quicknet_pad1_clip1.25"])
def test_qconv_matches_larq_quantconv2d(case):
    """larq QuantConv2D(ste_sign in and kernel, padding "same" with pad_values) = QConv2d(no_offset, pad_value)."""
    meta = LARQ_META["qconv"][case]
    k = f"qconv/{case}/"
    conv = QConv2d(
        4,
        3,
        3,
        meta["stride"],
        1,
        clip_threshold=meta["clip"],
        no_offset=True,
        pad_value=meta["pad_value"],
        weight_clip=meta["clip"],
    )
    with torch.no_grad():
        conv.weight.copy_(oihw(_t(LARQ, k + "kernel_hwio")))
    x = nchw(_t(LARQ, k + "x_nhwc")).contiguous().requires_grad_()
    y = conv(x)
    gx, gw = torch.autograd.grad((y * nchw(_t(LARQ, k + "dy_nhwc"))).sum(), [x, conv.weight])
    _compare(y.detach(), nchw(_t(LARQ, k + "y_nhwc")), True)  # sums of +-1: exact
    _compare(gx, nchw(_t(LARQ, k + "grad_x_nhwc")), False)
    _compare(gw, oihw(_t(LARQ, k + "grad_kernel_hwio")), False)


# larq zoo model -> bitrain model and options; trainable parameters at 224 px, 1000 classes
LARQ_ZOO = {
    "QuickNet": ("quicknet", {}),
    "QuickNetSmall": ("quicknet_small", {}),
    "QuickNetLarge": ("quicknet_large", {}),
    "BiRealNet": ("birealnet18", {}),
    "XNORNet": ("xnornet", {}),
    "DoReFaNet": ("dorefanet", {}),
    "RealToBinaryNet": ("realtobinarynet", {}),
    "BinaryAlexNet": ("binary_alexnet", {}),
    "BinaryResNetE18": ("resnet18_e1", {}),
    "BinaryDenseNet28": ("densenet28", {}),
    "BinaryDenseNet37": ("densenet37", {}),
    "BinaryDenseNet45": ("densenet45", {}),
    "MeliusNet22": ("meliusnet22", {"initial_layers": "grouped_stem"}),
}
# bitorch model -> bitrain model, bitorch's count minus bitrain's (0: the same). ResNet v1/v2: bitorch's
# input BatchNorm2d(3) is affine (6 parameters), bitrain's has none (BMXNet's learns a shift only).
BITORCH_ZOO = {
    "resnet18v1": ("resnet18_v1", 6),
    "resnet34v1": ("resnet34_v1", 6),
    "resnet50v1": ("resnet50_v1", 6),
    "resnet152v1": ("resnet152_v1", 6),
    "resnet18v2": ("resnet18_v2", 6),
    "resnet34v2": ("resnet34_v2", 6),
    "resnet50v2": ("resnet50_v2", 6),
    "resnet152v2": ("resnet152_v2", 6),
    "resnete18": ("resnet18_e1", 0),
    "resnete34": ("resnet34_e1", 0),
    "densenet28": ("densenet28", 0),
    "densenet37": ("densenet37", 0),
    "densenet45": ("densenet45", 0),
}


def _trainable(name: str, **options) -> int:
    if name not in list_models():
        pytest.skip(f"{name} is not registered in this build")
    with torch.device("meta"):
        model = build_model(name, num_classes=1000, image_size=224, **options)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("larq_name", sorted(LARQ_ZOO))
def test_trainable_parameters_match_larq_zoo(larq_name):
    name, options = LARQ_ZOO[larq_name]
    assert _trainable(name, **options) == LARQ_META["zoo_trainable"][larq_name]


@pytest.mark.parametrize("bitorch_name", sorted(BITORCH_ZOO))
def test_trainable_parameters_match_bitorch(bitorch_name):
    name, difference = BITORCH_ZOO[bitorch_name]
    assert _trainable(name) == BITORCH_META["zoo_trainable"][bitorch_name] - difference


def test_issue_11_counts_are_the_recorded_larq_counts():
    want = {"QuickNet": 13_230_024, "QuickNetSmall": 12_652_504, "QuickNetLarge": 23_338_184, "MeliusNet22": 6_944_584}
    assert {k: LARQ_META["zoo_trainable"][k] for k in want} == want


# --- larq's QuickNet block -------------------------------------------------------------------------


def test_quicknets_relus_see_negative_inputs():
    """With the xnor offset (dot + fan_in) / 2 >= 0 the block's ReLU would do nothing; larq's conv has none."""
    torch.manual_seed(0)
    model = build_model("quicknet_small", num_classes=10, image_size=64)
    seen: list[float] = []
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    for r in relus:  # a pre-hook: the ReLUs work in place
        r.register_forward_pre_hook(lambda _m, inp: seen.append(float((inp[0] < 0).float().mean())))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert len(seen) == len(relus) == 18
    assert all(0.2 < share < 0.8 for share in seen), seen  # every ReLU, the 16 after binary convs too
    convs = [m for m in model.modules() if isinstance(m, QConv2d)]
    assert len(convs) == 16
    assert all(
        not c.apply_offset and c.pad_value == 1.0 and c.act.clip_threshold == 1.25 and c.weight_clip == 1.25
        for c in convs
    )


def test_quicknet_weight_clip_is_applied_by_the_trainer_every_step():
    from bitrain.data.loader import DeviceLoader
    from bitrain.train.optim import build_optimizer
    from bitrain.train.trainer import Trainer

    torch.manual_seed(0)
    model = build_model("quicknet_small", num_classes=4, image_size=8, in_channels=1)
    convs = [m for m in model.modules() if isinstance(m, QConv2d)]
    with torch.no_grad():
        convs[0].weight.fill_(3.0)  # past the bound, as a large step could leave it
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(8) % 4, batch_size=4, train=True, mean=(0.5,), std=(0.25,))
    Trainer(model, build_optimizer(model, "sgd", lr=0.1), loader, None, epochs=1).fit()
    assert all(c.weight.abs().max().item() <= 1.25 for c in convs)  # no --clip-latent-weights given


# --- bitorch: recorded, and live where it imports ---------------------------------------------------

BITORCH_CASES = {
    "sign": lambda x: quant.det_sign(x),
    "approxsign": lambda x: quant.approx_sign(x),
    "swishsign": lambda x: quant.swish_sign(x),
    "steheaviside": lambda x: quant.get_quantizer("steheaviside")(x),
    "sign_cancel0.7": lambda x: quant.det_sign(x, 0.7),
}


@pytest.mark.parametrize("case", sorted(BITORCH_CASES))
def test_quantizer_matches_bitorch_recorded(case):
    k = f"quantizers/{case}/"
    y, g = _run(BITORCH_CASES[case], _t(BITORCH, k + "x"), _t(BITORCH, k + "dy"))
    _compare(y, _t(BITORCH, k + "y"), True)
    _compare(g, _t(BITORCH, k + "grad"), case != "swishsign")


@pytest.mark.parametrize("stride", [1, 2])
def test_qconv_matches_bitorch_recorded(stride):
    """bitorch QConv2d(sign, sign, pad -1, cancel 1.0, no bias, no offset) = QConv2d(no_offset=True)."""
    k = f"qconv/sign_stride{stride}/"
    conv = QConv2d(4, 3, 3, stride, 1, no_offset=True)
    with torch.no_grad():
        conv.weight.copy_(_t(BITORCH, k + "weight"))
    x = _t(BITORCH, k + "x").requires_grad_()
    y = conv(x)
    gx, gw = torch.autograd.grad((y * _t(BITORCH, k + "dy")).sum(), [x, conv.weight])
    _compare(y.detach(), _t(BITORCH, k + "y"), True)
    _compare(gx, _t(BITORCH, k + "grad_x"), False)
    _compare(gw, _t(BITORCH, k + "grad_weight"), False)


def _bitorch() -> None:
    try:
        import bitorch.layers  # noqa: F401
    except Exception as e:  # not installed beside this torch (it is no dependency of bitrain)
        pytest.skip(f"bitorch does not import here ({type(e).__name__}: {e}); the recorded fixture is compared")


def test_live_against_bitorch_on_fresh_inputs():
    _bitorch()
    from bitorch.layers import QActivation
    from bitorch.layers import QConv2d as BitorchQConv2d
    from bitorch.quantizations import quantization_from_name

    g = torch.Generator().manual_seed(1234)
    x = torch.cat([torch.randn(2000, generator=g) * 1.5, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    dy = torch.rand(x.shape, generator=g) + 0.5
    for name, fn in BITORCH_CASES.items():
        ref = QActivation("sign", 0.7) if name == "sign_cancel0.7" else quantization_from_name(name)()
        y_ref, g_ref = _run(ref, x, dy)
        y, gr = _run(fn, x, dy)
        _compare(y, y_ref, True)
        _compare(gr, g_ref, name != "swishsign")
    theirs = BitorchQConv2d(
        3, 5, 3, padding=1, input_quantization="sign", weight_quantization="sign", gradient_cancellation_threshold=1.0
    )
    ours = QConv2d(3, 5, 3, 1, 1, no_offset=True)
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
    xi = torch.randn(2, 3, 7, 7, generator=g)
    _compare(ours(xi), theirs(xi), True)


# --- BMXNet's binary ResNet bottleneck ----------------------------------------------------------------


def _bmxnet_qconv(x: torch.Tensor, conv: QConv2d) -> torch.Tensor:
    # BMXNet's bare nn.QConv2D: the input as it comes, padded with -1, sign weights, (dot + fan_in) / 2
    p = conv.qpadding[0]
    w = torch.where(conv.weight >= 0, 1.0, -1.0)
    dot = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (p,) * 4, value=-1.0), w, stride=conv.stride)
    return (dot + conv.fan_in) / 2


def test_binary_resnet50_bottlenecks_are_bmxnets():
    from bitrain.models.resnet import BottleneckV1, BottleneckV2

    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 16, 6, 6))  # a block's input: the previous block's ReLU output
    v1 = BottleneckV1(16, 32, 2).eval()
    b = v1.body
    assert [type(m) for m in b] == [QConv2d, nn.BatchNorm2d, nn.ReLU] * 2 + [QConv2d, nn.BatchNorm2d]
    assert b[0].stride == (2, 2) and b[3].stride == (1, 1)  # v1 strides on the first 1x1
    assert all(c.act.is_identity and c.bits == 1 and c.apply_offset for c in (b[0], b[3], b[6]))
    h = torch.relu(b[1](_bmxnet_qconv(x, b[0])))
    h = torch.relu(b[4](_bmxnet_qconv(h, b[3])))
    ref = torch.relu(b[7](_bmxnet_qconv(h, b[6])) + v1.downsample[1](_bmxnet_qconv(x, v1.downsample[0])))
    with torch.no_grad():
        torch.testing.assert_close(v1(x), ref, rtol=1e-4, atol=1e-4)  # real inputs: float sums

    v2 = BottleneckV2(16, 32, 2).eval()
    assert v2.conv1.stride == (1, 1) and v2.conv2.stride == (2, 2)  # v2 strides on the 3x3
    a = torch.relu(v2.bn1(x))
    h = _bmxnet_qconv(
        torch.relu(v2.bn3(_bmxnet_qconv(torch.relu(v2.bn2(_bmxnet_qconv(a, v2.conv1))), v2.conv2))), v2.conv3
    )
    with torch.no_grad():
        torch.testing.assert_close(v2(x), h + _bmxnet_qconv(a, v2.downsample), rtol=1e-4, atol=1e-4)
