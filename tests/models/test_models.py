"""Model zoo: every registered model builds at 32x32 and 8x8 and trains one step; sizes vs published figures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary.layers import QConv2d, QLinear
from bitrain.errors import UserError
from bitrain.models import MODELS, build_model, list_models, model_info, register
from bitrain.models.common import model_size_bytes, param_counts

# BMXNet's ResNetE-50 puts basic blocks at the bottleneck widths (~340M weights): checked on the meta
# device (shapes and gradients flow), its block class is trained for real through resnet18/34_e*.
# The AlexNets (~60M weights) and ResNet-152 train a real test run in tests/models/test_literature.py.
HEAVY = {"resnet50_e1", "resnet50_e2", "binary_alexnet", "xnornet", "dorefanet", "resnet152_v1", "resnet152_v2"}
FLEX = {"densenet_flex": {"block_config": "2,2,2"}, "meliusnet_flex": {"block_config": "2,2,2"}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]


def _train_step(name: str, in_channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=in_channels, image_size=size, **FLEX.get(name, {}))
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, QConv2d))
    before = first.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, in_channels, size, size), torch.tensor([1, 7])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    binary = [m for m in _quantized(model) if m.bits == 1]
    assert binary, f"{name} has no binary layer"
    for m in binary:
        assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
    assert sum(bool(m.weight.grad.abs().sum() > 0) for m in binary) >= 0.9 * len(binary)
    opt.step()
    assert not torch.equal(first.weight, before)


LIGHT = [n for n in list_models() if n not in HEAVY]


@pytest.mark.parametrize("name", LIGHT)
def test_trains_one_step_8px_gray(name):
    _train_step(name, 1, 8)


# at 32 px the cost grows with the feature maps: one real step per block family, the wiring of every
# model at 32 px is checked on the meta device below
@pytest.mark.parametrize("name", ["resnet18_e1", "resnet18_v2", "quicknet_small", "meliusnet_flex", "lenet"])
def test_trains_one_step_32px_rgb(name):
    _train_step(name, 3, 32)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("size,channels", [(32, 3), (8, 1)])
def test_shapes_and_grads_on_meta(name, size, channels):
    if (size, channels) == (8, 1) and name not in HEAVY:
        pytest.skip("trained for real in test_trains_one_step_8px_gray")
    with torch.device("meta"):
        model = build_model(name, num_classes=10, in_channels=channels, image_size=size, **FLEX.get(name, {}))
        out = model(torch.randn(2, channels, size, size))
        F.cross_entropy(out, torch.tensor([1, 7])).backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["resnet18_e1", "resnet18_v2", "densenet28", "meliusnet22", "quicknet_small"])
def test_imagenet_forward(name):
    model = build_model(name, num_classes=1000).eval()
    assert isinstance(model.features[1] if name.startswith("resnet") else model.features[0], nn.Conv2d)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_full_precision_twin_differs_only_in_bits(name):
    with torch.device("meta"):
        fp = build_model(name, num_classes=10, image_size=32, bits=32, bits_a=32, **FLEX.get(name, {}))
        bn = build_model(name, num_classes=10, image_size=32, **FLEX.get(name, {}))
    assert {k: v.shape for k, v in fp.state_dict().items()} == {k: v.shape for k, v in bn.state_dict().items()}
    assert [type(m) for m in fp.modules()] == [type(m) for m in bn.modules()]
    assert all(m.bits == 32 and m.bits_a == 32 for m in _quantized(fp))
    # binary weights; binarised inputs but where a layer takes its input as it comes (BMXNet's bottleneck,
    # BinaryAlexNet's first conv) or quantizes it to its model's width (DoReFa-Net's 2 bits)
    assert all(m.bits == 1 and (m.bits_a < 32 or m.act.is_identity) for m in _quantized(bn))


def test_full_precision_twin_computes_like_float_convs():
    torch.manual_seed(0)
    fp = build_model("resnet18_e1", num_classes=10, image_size=32, bits=32, bits_a=32).eval()
    bn = build_model("resnet18_e1", num_classes=10, image_size=32).eval()
    bn.load_state_dict(fp.state_dict())
    conv = fp.features[2][0].body[0]  # stage 1, first binary-capable conv
    x = torch.randn(2, 64, 8, 8)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight, padding=1), atol=1e-5)
    # binary: the sign of input and weight, input padded with -1 (xnor semantics)
    q = bn.features[2][0].body[0]
    ref = F.conv2d(
        F.pad(torch.where(x >= 0, 1.0, -1.0), (1, 1, 1, 1), value=-1.0), torch.where(q.weight >= 0, 1.0, -1.0)
    )
    assert torch.allclose(q(x), ref, atol=1e-4) or torch.allclose(q(x), (ref + 64 * 9) / 2, atol=1e-4)
    img = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(fp(img), bn(img))


# published model sizes (MB in these papers = 2**20 bytes); size = binary weights / 8 + float params * 4 bytes
# tolerance 5 % where the figure is rounded to 0.1 MB, 1 % where it has two decimals
PUBLISHED = [
    # name, options, params (M) or None, size MiB, size tolerance, source
    ("resnet18_e1", {"fp_downsample_sc": True, "pool_downsample_sc": True}, 11.7, 4.0, 0.05, "BMXNet v2 results"),
    ("densenet28", {}, None, 4.0, 0.05, "BinaryDenseNet paper"),
    ("meliusnet22", {}, None, 4.0, 0.05, "MeliusNet paper (3.9)"),
    ("densenet45", {}, 13.9, 7.35, 0.01, "larq docs binary_densenet45 summary"),
]


@pytest.mark.parametrize("name,options,params_m,size_mib,tol,source", PUBLISHED)
def test_sizes_match_published(name, options, params_m, size_mib, tol, source):
    with torch.device("meta"):
        model = build_model(name, num_classes=1000, image_size=224, **options)
    binary, floating = param_counts(model)
    if params_m is not None:
        assert abs((binary + floating) / 1e6 - params_m) / params_m < 0.02
    assert abs(model_size_bytes(model) / 2**20 - size_mib) / size_mib < tol


def test_resnet_e18_binary_downsample_is_smaller():
    with torch.device("meta"):
        fp_sc = build_model("resnet18_e1", num_classes=1000, fp_downsample_sc=True)
        q_sc = build_model("resnet18_e1", num_classes=1000)
    # the three 1x1 downsample convs (64*128 + 128*256 + 256*512 weights) move from 32 to 1 bit
    assert param_counts(q_sc)[0] - param_counts(fp_sc)[0] == 64 * 128 + 128 * 256 + 256 * 512


def test_slices_keep_weights_and_add_blocks():
    with torch.device("meta"):
        one = build_model("resnet18_e1", num_classes=10, image_size=32)
        four = build_model("resnet18_e1", num_classes=10, image_size=32, slices=4)
    assert param_counts(one)[0] == param_counts(four)[0]
    assert len(_quantized(four)) > len(_quantized(one))
    model = build_model("resnet18_e2", num_classes=10, image_size=8, in_channels=1, slices=2)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_downsample_groups_and_pool_options():
    model = build_model(
        "resnet18_e1",
        num_classes=10,
        image_size=32,
        fp_downsample_sc=True,
        pool_downsample_sc=True,
        downsample_sc_groups=4,
    )
    ds = model.features[3][0].downsample
    assert isinstance(ds[0], nn.AvgPool2d) and type(ds[1]) is nn.Conv2d and ds[1].groups == 4
    assert ds[1].stride == (1, 1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_dense_options():
    model = build_model(
        "densenet_flex",
        num_classes=10,
        image_size=32,
        block_config="2,3",
        reduction="2",
        growth_rate=32,
        init_features=32,
        downsample_structure="bn,relu,pool,fp_conv:2",
    )
    # 32 + 2*32 = 96 -> /2 = 48 -> rounded to 64; + 3*32 = 160
    assert model.output[-1].in_features == 160
    dil = build_model("meliusnet22", num_classes=10, image_size=32, dilated=True)
    assert dil(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in dil.modules()) == 1  # stages 3, 4 dilate instead


def test_stem_choice():
    small = build_model("densenet28", num_classes=10, image_size=32)
    big = build_model("densenet28", num_classes=10, image_size=224)
    grouped = build_model("densenet28", num_classes=10, image_size=224, initial_layers="grouped_stem")
    assert small.features[0].kernel_size == (3, 3) and small.features[0].stride == (1, 1)
    assert big.features[0].kernel_size == (7, 7) and big.features[0].stride == (2, 2)
    assert [m.groups for m in grouped.features if isinstance(m, nn.Conv2d)][:3] == [1, 4, 8]


@pytest.mark.parametrize(
    "method,std",
    [
        ("gaussian", lambda fi, fo: math.sqrt(2 / fi)),
        ("msraprelu_in", lambda fi, fo: math.sqrt(2 / 1.0625 / fi)),
        ("msraprelu_avg", lambda fi, fo: math.sqrt(2 / 1.0625 / ((fi + fo) / 2))),
        ("default", lambda fi, fo: math.sqrt(2 / ((fi + fo) / 2) / 3)),
    ],
)
def test_initialization(method, std):
    torch.manual_seed(0)
    model = build_model("quicknet_small", num_classes=10, image_size=32, initialization=method)
    w = model.features[-2].body[0].weight  # 512x512x3x3 binary conv: fan_in = fan_out = 4608
    assert abs(w.std().item() / std(4608, 4608) - 1) < 0.02
    blur = next(m for m in model.modules() if hasattr(m, "kernel"))
    assert torch.allclose(blur.kernel[0, 0], torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16.0)


def test_errors_name_the_option():
    with pytest.raises(UserError, match=r"did you mean .*resnet18_e1.*; valid: .*densenet28"):
        build_model("resnet18_e", num_classes=10)
    with pytest.raises(UserError, match=r"--growth-rate .*resnet18_e1"):
        build_model("resnet18_e1", num_classes=10, growth_rate=32)
    with pytest.raises(UserError, match=r"--block-config .*densenet28"):
        build_model("densenet28", num_classes=10, block_config="6,6,6,5")
    with pytest.raises(UserError, match=r"--slices 3"):
        build_model("resnet18_e1", num_classes=10, slices=3)
    with pytest.raises(UserError, match=r"--initialization.*msraprelu_in"):
        build_model("resnet18_e1", num_classes=10, initialization="xavier")
    with pytest.raises(UserError, match=r"--initial-layers.*grouped_stem"):
        build_model("resnet18_e1", num_classes=10, initial_layers="cifar")
    with pytest.raises(UserError, match=r"needs --block-config"):
        build_model("densenet_flex", num_classes=10)
    with pytest.raises(UserError, match=r"--reduction: expected 3"):
        build_model("densenet28", num_classes=10, reduction="2,2")
    with pytest.raises(UserError, match=r"--downsample-structure: bad entry 'conv'"):
        build_model("densenet28", num_classes=10, downsample_structure="bn,conv")
    with pytest.raises(UserError, match=r"--downsample-sc-groups 3"):
        build_model("resnet18_e1", num_classes=10, downsample_sc_groups=3)
    with pytest.raises(UserError, match=r"at least 4 px"):
        build_model("lenet", num_classes=10, image_size=3)
    with pytest.raises(UserError, match=r"--num-classes"):
        build_model("lenet", num_classes=0)
    assert issubclass(UserError, ValueError)


def test_unset_options_are_ignored():
    model = build_model(
        "resnet18_v1",
        num_classes=10,
        image_size=8,
        in_channels=1,
        growth_rate=None,
        dilated=False,
        fp_downsample_sc=False,
    )
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_registry():
    assert model_info("meliusnet22").family == "meliusnet" and model_info("meliusnet22").image_size == 224
    assert model_info("lenet").image_size == 28
    assert {"resnet18_v1", "resnet50_e2", "densenet45", "meliusnet_c", "quicknet_large", "lenet"} <= set(MODELS)

    @register("_test_tmp", family="test", image_size=16)
    def _tmp(*, num_classes, in_channels, image_size, initial_layers):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    try:
        assert build_model("_test_tmp", num_classes=3, image_size=4, in_channels=1)(torch.ones(1, 1, 4, 4)).shape == (
            1,
            3,
        )
        assert model_info("_test_tmp").family == "test"
        with pytest.raises(ValueError, match="twice"):
            register("_test_tmp", family="test")(_tmp)
    finally:
        del MODELS["_test_tmp"]


def test_small_reactnet_is_small_resnet_e_plus_learnt_shifts():
    """With its thresholds at 0 and its RPReLU slopes at 1 (identity), small_reactnet computes exactly
    small_resnet_e with the same weights; the shifts and slopes learn (they get gradients)."""
    torch.manual_seed(0)
    plain = build_model("small_resnet_e", num_classes=10, in_channels=1, image_size=28).eval()
    react = build_model("small_reactnet", num_classes=10, in_channels=1, image_size=28).eval()
    src = plain.state_dict()
    mapped = {}
    for k in react.state_dict():
        if ".body." in k and k.split(".body.")[1][0].isdigit():
            head, tail = k.split(".body.")
            i, rest = tail.split(".", 1)
            if i == "0":
                continue  # the LearnableBias in front of the conv
            mapped[k] = src[f"{head}.body.{int(i) - 1}.{rest}"]
        elif ".act." not in k:
            mapped[k] = src[k]
    missing = react.load_state_dict(mapped, strict=False).missing_keys
    assert missing and all(".act." in k or ".body.0." in k for k in missing)
    for m in react.modules():
        if isinstance(m, nn.PReLU):
            nn.init.ones_(m.weight)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(react(x), plain(x), rtol=0, atol=0)
    react.train()
    F.cross_entropy(react(x), torch.tensor([0, 1, 2, 3])).backward()
    shifts = [p for n, p in react.named_parameters() if ".act." in n or ".body.0." in n]
    assert len(shifts) == 4 * 6
    # all but the last block's slope, whose negative outputs the head's ReLU zeroes while shift_out is 0
    dead = [n for n, p in react.named_parameters() if (".act." in n or ".body.0." in n) and p.grad.abs().sum() == 0]
    assert dead == ["7.act.prelu.weight"]
