"""The literature models: larq zoo's Bi-Real, XNOR-Net, DoReFa-Net, Real-to-Binary and BinaryAlexNet, ReActNet-A
and ReActNet-18 (the authors' code), bitorch's ResNet-152. Each has its reference's trainable parameter count at
224 px / 1000 classes, trains a test run on digits, and uses its reference's quantizers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import run_cli

from bitrain.binary.layers import QConv2d, QLinear, binary_layer_config
from bitrain.data import build_data
from bitrain.models import build_model, list_models, model_info
from bitrain.models.alexnet import magnitude_aware_sign_unclipped
from bitrain.models.parts import BatchNormNoScale, keras_bn, max_pool, own
from bitrain.models.reactnet import reactnet_sign
from bitrain.models.realtobinary import Gate
from bitrain.train.options import LoopOptions, StopPolicy
from bitrain.train.trainer import Trainer

# trainable parameters at 224 px, 1000 classes, 3 channels, as the references count them
REFERENCE = {
    "birealnet18": 11_689_512,  # larq zoo BiRealNet
    "xnornet": 62_377_440,  # larq zoo XNORNet
    "dorefanet": 62_384_968,  # larq zoo DoReFaNet
    "realtobinarynet": 11_986_920,  # larq zoo RealToBinaryNet
    "binary_alexnet": 61_838_248,  # larq zoo BinaryAlexNet
    "reactnet_a": 29_343_592,  # liuzechun/ReActNet mobilenet/2_step2/reactnet.py
    "reactnet18": 11_704_424,  # liuzechun/ReActNet resnet/2_step2/birealnet.py
    "resnet152_v1": 60_192_942,  # bitorch Resnet152V1
    "resnet152_v2": 60_185_262,  # bitorch Resnet152V2
}
NEW = list(REFERENCE)


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NEW)
def test_reference_parameter_count_and_shapes_at_224(name):
    with torch.device("meta"):
        model = build_model(name, num_classes=1000, image_size=224)
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    expected = REFERENCE[name]
    if name.startswith("resnet152"):
        # BMXNet's input normaliser (bitrain's ResNets) has no affine parameters; bitorch's has 2 x 3
        expected -= 0 if model.features[0].affine else 6
    assert _trainable(model) == expected
    assert name in list_models() and model_info(name).image_size == 224  # so `bitrain models` lists it


@pytest.fixture(scope="module")
def digits():
    return build_data("digits", batch_size=32, device="cpu", seed=0)


@pytest.mark.parametrize("name", NEW)
def test_trains_a_test_run_on_digits(name, digits):
    train, val, info = digits
    torch.manual_seed(0)
    model = build_model(name, num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size)
    binary = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear)) and m.bits == 1]
    assert binary
    before = [m.weight.detach().flatten()[::101].clone() for m in binary]  # a sample: the AlexNets hold 60M
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # BatchNorm statistics re-estimated before validation, as the CLI does by default (--bn-recalibrate)
    stop, options = StopPolicy(test_run=True), LoopOptions(log_interval=0, bn_recalibrate=2)
    out = Trainer(model, opt, train, val, epochs=1, stop=stop, options=options).fit()
    assert math.isfinite(out["val"]["loss"]) and out["val"]["samples"] == 32
    changed = sum(not torch.equal(b, m.weight.detach().flatten()[::101]) for b, m in zip(before, binary))
    assert changed >= 0.9 * len(binary)  # the gradient reaches the binary layers' latent weights


def test_cli_test_run(tmp_path):
    run = tmp_path / "r"
    args = ("--model", "reactnet18", "--dataset", "digits", "--test-run", "--epochs", "1", "--prefix", run)
    assert run_cli("train", "--cpu", *args) == 0
    assert (run / "model.safetensors").is_file()


# --- each model's own quantizers -----------------------------------------------------------------


def _q(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]


def test_larq_quantizers_per_model():
    with torch.device("meta"):
        models = {n: build_model(n, num_classes=10, image_size=32) for n in NEW[:7]}
    for name, methods in {
        "birealnet18": ("approx_sign", "magnitude_aware_sign", ""),
        "realtobinarynet": ("det_sign", "det_sign", ""),
        "xnornet": ("det_sign", "det_sign", "binet"),
        "reactnet_a": ("approx_sign", reactnet_sign, ""),
        "reactnet18": ("approx_sign", reactnet_sign, ""),
    }.items():
        for m in _q(models[name]):
            assert (m.act.method, m.weight_quantization, m.approximation) == methods, name
            assert (m.bits, m.bits_a, m.apply_offset) == (1, 1, False), name  # the plain +-1 dot product
    first, *rest = _q(models["binary_alexnet"])
    assert (first.bits, first.bits_a, first.weight_quantization) == (1, 32, "det_sign")  # float image in
    assert len(rest) == 7 and all(m.act.method == "det_sign" and not m.apply_offset for m in rest)
    assert isinstance(rest[-1], QLinear) and rest[-1].out_features == 10  # the classifier is binary too
    for m in _q(models["dorefanet"]):
        assert (m.bits, m.bits_a, m.act.method) == (1, 2, "dorefa_quantizer")
        assert m.weight_quantization is magnitude_aware_sign_unclipped
    # larq pads with 0 (pad_values' default) and bounds latent weights where it has WeightClip; ReActNet
    # pads its signs with zeros and has no weight constraint
    for name, clip in {"birealnet18": 1.0, "realtobinarynet": 1.0, "xnornet": 1.0, "binary_alexnet": 1.0}.items():
        assert all(m.weight_clip == clip for m in _q(models[name])), name
    for name in ("dorefanet", "reactnet_a", "reactnet18"):
        assert all(m.weight_clip is None for m in _q(models[name])), name
    for name in NEW[:7]:
        assert all(m.pad_value == 0.0 for m in _q(models[name]) if isinstance(m, QConv2d)), name


def test_float_twins_are_plain_float_layers():
    for name in NEW[:7]:
        with torch.device("meta"):
            fp = build_model(name, num_classes=10, image_size=32, bits=32, bits_a=32)
        assert all(m.full_precision for m in _q(fp)), name
    with torch.device("meta"):
        four = build_model("dorefanet", num_classes=10, image_size=32, bits_a=4)
    assert {m.bits_a for m in _q(four)} == {4}  # DoReFa's activation width: 2 by default, else --bits-a


def test_own_gives_the_models_quantizer_only_where_the_width_takes_it():
    assert own("approx_sign") == "approx_sign" and own("magnitude_aware_sign", "weight") == "magnitude_aware_sign"
    assert own(reactnet_sign, "weight") is reactnet_sign
    with binary_layer_config(bits=32, bits_a=32):
        assert own("approx_sign") is None and own(reactnet_sign, "weight") is None
    with binary_layer_config(bits=2, bits_a=2):
        assert own("approx_sign") is None and own("dorefa_quantizer") == "dorefa_quantizer"
        assert own(reactnet_sign, "weight") is None


def test_magnitude_aware_sign_unclipped_values_and_identity_gradient():
    w = torch.tensor([[-2.0, 0.0], [0.5, 1.5]], requires_grad=True)
    q = magnitude_aware_sign_unclipped(w)
    assert torch.equal(q, torch.tensor([[-1.0, 1.0], [1.0, 1.0]]))  # mean|w| = 1 over the whole layer, 0 -> +1
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    q.backward(g)
    assert torch.equal(w.grad, g)  # no clip at |w| > 1, no scale
    assert repr(magnitude_aware_sign_unclipped) == "magnitude_aware_sign_unclipped"


def test_reactnet_sign_values_and_clamped_gradient():
    w = torch.tensor([[[[-2.0]], [[0.0]]], [[[0.5]], [[1.0]]]], requires_grad=True)  # (out 2, in 2, 1, 1)
    q = reactnet_sign(w)
    assert torch.equal(q.flatten(), torch.tensor([-1.0, 1.0, 0.75, 0.75]))  # mean|W| per output channel
    q.backward(torch.full_like(q, 3.0))
    assert torch.equal(w.grad.flatten(), torch.tensor([0.0, 3.0, 3.0, 3.0]))  # passes where |W| <= 1, unscaled


def test_xnornet_weights_are_sign_times_mean_abs_per_output_channel():
    torch.manual_seed(0)
    model = build_model("xnornet", num_classes=10, image_size=32)
    conv = _q(model)[0]
    w = conv.weight.detach()
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(conv.quantized_weight(), expected)


def test_keras_batch_norm_momentum_epsilon_and_no_scale():
    bn = keras_bn(4, 0.9, 1e-4)
    assert isinstance(bn, nn.BatchNorm2d) and bn.momentum == pytest.approx(0.1) and bn.eps == 1e-4
    centred = keras_bn(4, 0.8, scale=False)
    assert isinstance(centred, BatchNormNoScale) and centred.norm.momentum == pytest.approx(0.2)
    assert [n for n, p in centred.named_parameters()] == ["shift.bias"]  # beta only, as Keras scale=False
    with torch.no_grad():
        centred.shift.bias.copy_(torch.tensor([1.0, -1.0, 0.0, 2.0]))
    x = torch.randn(8, 4, 3, 3)
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-3) + torch.tensor([1.0, -1.0, 0.0, 2.0]).view(1, 4, 1, 1)
    assert torch.allclose(centred(x), expected, atol=1e-5)
    assert isinstance(keras_bn(4, scale=False, dim=1).norm, nn.BatchNorm1d)


def test_max_pool_valid_and_padded_when_the_map_is_too_small():
    assert max_pool(56, same=False)[1] == 27 and max_pool(13, same=False)[1] == 6  # AlexNet at 224 px
    assert max_pool(54, same=True)[1] == 27 and max_pool(27, same=True)[1] == 14  # DoReFa at 224 px
    pool, size = max_pool(2, same=False)
    assert size == 1 and pool(torch.randn(1, 1, 2, 2)).shape == (1, 1, 1, 1)


def test_alexnets_end_on_a_6x6_map_at_224_so_the_adaptive_pool_is_the_identity():
    for name in ("binary_alexnet", "xnornet", "dorefanet"):
        with torch.device("meta"):
            model = build_model(name, num_classes=1000, image_size=224)
            assert model.features(torch.randn(1, 3, 224, 224)).shape[-2:] == (6, 6), name


def test_real_to_binary_gate_and_half_block():
    torch.manual_seed(0)
    model = build_model("realtobinarynet", num_classes=10, image_size=32).eval()
    half = model.features[4]  # the first half block (after conv, BN, PReLU, nothing pooled at 32 px)
    x = torch.randn(2, 64, 8, 8)
    real = half.bn(x)
    gate = half.gate(real)
    assert gate.shape == (2, 64, 1, 1) and ((gate > 0) & (gate < 1)).all()
    manual = torch.sigmoid(half.gate.expand(torch.relu(half.gate.reduce(real.mean(dim=(2, 3))))))
    assert torch.allclose(gate.flatten(1), manual)
    assert torch.allclose(half(x), half.act(half.conv(real) * gate) + x)
    assert isinstance(Gate(512, 512).reduce, nn.Linear) and Gate(512, 512).reduce.out_features == 64


def test_reactnet_a_downsampling_block_shares_one_threshold_and_concatenates():
    torch.manual_seed(0)
    model = build_model("reactnet_a", num_classes=10, image_size=32).eval()
    block = model.features[3]  # 64 -> 128, stride 2
    assert len(block.pointwise) == 2 and block.shift.bias.shape == (64,)
    x = torch.randn(2, 64, 8, 8)
    out = block(x)
    assert out.shape == (2, 128, 4, 4)
    x1 = block.act1(block.conv3(x) + block.pool(x))
    parts = [pw(block.shift(x1)) + x1 for pw in block.pointwise]
    assert torch.allclose(out, block.act2(torch.cat(parts, dim=1)))
    with torch.device("meta"):
        big = build_model("reactnet_a", num_classes=1000, image_size=224)
        assert big.features(torch.randn(1, 3, 224, 224)).shape == (1, 1024, 7, 7)


@pytest.mark.parametrize("name", ["reactnet18", "realtobinarynet"])
def test_packed_export_layers_compute_like_the_model(name, tmp_path):
    from bitrain.deploy.export import export_packed
    from bitrain.deploy.load import load_packed

    args = {"name": name, "num_classes": 10, "in_channels": 1, "image_size": 8}
    torch.manual_seed(0)
    model = build_model(**args).eval()
    export_packed(model, tmp_path / "m.safetensors", model_args=args)
    # the layers one for one (fuse_bn=False: no BatchNorm moved into them)
    packed = load_packed(tmp_path / "m.safetensors", lambda **kw: build_model(**kw), kernel="torch", fuse_bn=False)
    layers = dict(packed.named_modules())
    for layer_name, layer in model.named_modules():
        if isinstance(layer, QConv2d):  # zero padded, scaled (reactnet_sign) or plain +-1 weights
            x = torch.randn(2, layer.in_channels, 6, 6)
            with torch.no_grad():
                assert torch.allclose(layers[layer_name](x), layer(x), atol=1e-4), layer_name
