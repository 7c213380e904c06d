"""Quantized layers: full-precision equality, -1 padding, xnor-popcount offset, scales, config, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary import layers as L
from bitrain.binary.layers import QActivation, QConv2d, QLinear, binary_layer_config, get_layer_config
from bitrain.errors import UserError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pm1(*shape):
    return torch.randint(0, 2, shape).float() * 2 - 1


def _xnor_popcount_conv(xb, wb, stride, pad):
    """Reference: pad the +-1 input with -1, then count agreeing positions per output (explicit loops)."""
    xb = F.pad(xb, (pad, pad, pad, pad), value=-1.0)
    n, c, h, w = xb.shape
    o, _, kh, kw = wb.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = torch.zeros(n, o, ho, wo)
    xbits, wbits = xb > 0, wb > 0
    for i in range(ho):
        for j in range(wo):
            patch = xbits[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]  # (n, c, kh, kw)
            agree = ~(patch[:, None] ^ wbits[None])  # xnor, (n, o, c, kh, kw)
            out[:, :, i, j] = agree.flatten(2).sum(-1).float()  # popcount
    return out


@pytest.mark.parametrize("c,hw,stride,pad", [(3, 6, 1, 1), (3, 6, 2, 1), (3, 6, 1, 0), (16, 3, 1, 1), (16, 3, 2, 0)])
def test_binary_conv_equals_xnor_popcount_with_minus_one_padding(c, hw, stride, pad):
    # small channels: the offset's 1/2 is folded into the weights; 16 channels on a 3x3 map:
    # the weights are larger than the output, so the layer halves the output instead
    conv = QConv2d(c, 4 if c == 3 else c, 3, stride=stride, padding=pad)
    x = torch.randn(2, c, hw, hw)
    ref = _xnor_popcount_conv(torch.where(x >= 0, 1.0, -1.0), torch.where(conv.weight >= 0, 1.0, -1.0), stride, pad)
    xr = x.clone().requires_grad_()
    y = conv(xr)
    assert torch.equal(y, ref)
    assert conv.padding == (0, 0) and conv.qpadding == (pad, pad)
    # gradient: STE (cancel at |x| > 1) of d/dx (dot + fan_in) / 2 = conv-transpose of sign(W) / 2
    g = torch.randn_like(y)
    y.backward(g)
    xs = torch.where(x >= 0, 1.0, -1.0).requires_grad_()
    ws = torch.where(conv.weight >= 0, 1.0, -1.0).requires_grad_()
    F.conv2d(F.pad(xs, (pad,) * 4, value=-1.0), ws, stride=stride).backward(g)
    assert torch.allclose(xr.grad, xs.grad / 2 * (x.abs() <= 1), atol=1e-6)
    assert torch.allclose(conv.weight.grad, ws.grad / 2, atol=1e-5)  # weights: STE, no cancel


def test_no_offset_gives_plain_dot_and_padding_is_minus_one():
    conv = QConv2d(2, 3, 3, padding=1, no_offset=True)
    x = _pm1(1, 2, 4, 4)
    wq = conv.quantized_weight()
    assert set(wq.unique().tolist()) == {-1.0, 1.0}
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), wq)
    assert torch.equal(conv(x), ref)
    assert not torch.equal(conv(x), F.conv2d(x, wq, padding=1))  # zero padding would differ at the border


def test_offset_equals_dot_plus_fan_in_over_two_and_gradient_half():
    conv = QConv2d(4, 2, 3, padding=1)
    assert conv.apply_offset and conv.fan_in == 36
    x = _pm1(2, 4, 5, 5)
    dot = F.conv2d(F.pad(x, (1,) * 4, value=-1.0), conv.quantized_weight())
    assert torch.equal(conv(x), (dot + 36) / 2)
    xr = (x * 0.5).requires_grad_()  # inside the clip threshold, so the STE passes the gradient
    conv(xr).sum().backward()
    xr2 = (x * 0.5).requires_grad_()
    conv2 = QConv2d(4, 2, 3, padding=1, no_offset=True)
    conv2.weight.data.copy_(conv.weight.data)
    conv2(xr2).sum().backward()
    assert torch.allclose(xr.grad, xr2.grad / 2)


def test_full_precision_layer_is_exactly_nn_conv2d_and_linear():
    conv = QConv2d(3, 5, 3, stride=2, padding=1, bits=32, bits_a=32, pad_value=1.0)  # zero padding all the same
    ref = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    ref.load_state_dict(conv.state_dict())
    assert list(conv.state_dict()) == ["weight"] and isinstance(conv, nn.Conv2d)
    x1 = torch.randn(2, 3, 7, 7, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = conv(x1), ref(x2)
    assert torch.equal(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(conv.weight.grad, ref.weight.grad)
    lin = QLinear(6, 3, bits=32, bits_a=32)
    ref_l = nn.Linear(6, 3, bias=False)
    ref_l.load_state_dict(lin.state_dict())
    x = torch.randn(4, 6) * 3
    assert torch.equal(lin(x), ref_l(x))


def test_binet_scale_with_gradient_and_xnor_scales_stop_gradient():
    w = torch.randn(3, 2, 3, 3)
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    binet = QConv2d(2, 3, 3, padding=1, approximation="binet")
    binet.weight.data.copy_(w)
    assert not binet.apply_offset
    assert torch.allclose(binet.quantized_weight(), torch.where(w >= 0, 1.0, -1.0) * alpha)
    x = torch.randn(2, 2, 5, 5)
    xb = F.pad(torch.where(x >= 0, 1.0, -1.0), (1,) * 4, value=-1.0)
    assert torch.allclose(binet(x), F.conv2d(xb, torch.where(w >= 0, 1.0, -1.0) * alpha), atol=1e-6)
    # d/dw of sum(sign(w) * alpha) with STE = alpha + sign(w) * sum(sign(w)) / n: the scale has a gradient
    binet.quantized_weight().sum().backward()
    s = torch.where(w >= 0, 1.0, -1.0)
    assert torch.allclose(binet.weight.grad, alpha + s * s.sum(dim=(1, 2, 3), keepdim=True) / 18, atol=1e-6)

    xnor = QConv2d(2, 3, 3, stride=2, padding=1, approximation="xnor")
    xnor.weight.data.copy_(w)
    k = F.avg_pool2d(x.abs().mean(1, keepdim=True), 3, stride=2, padding=1, count_include_pad=True)
    ref = F.conv2d(xb, torch.where(w >= 0, 1.0, -1.0) * alpha, stride=2) * k
    assert torch.allclose(xnor(x), ref, atol=1e-5)
    xnor.quantized_weight().sum().backward()
    assert torch.allclose(xnor.weight.grad, alpha.expand_as(w))  # scale's gradient stopped


def test_xnor_linear_scale():
    lin = QLinear(5, 2, approximation="xnor")
    x = torch.randn(3, 5)
    wq = torch.where(lin.weight >= 0, 1.0, -1.0) * lin.weight.abs().mean(1, keepdim=True)
    ref = F.linear(torch.where(x >= 0, 1.0, -1.0), wq) * x.abs().mean(1, keepdim=True)
    assert torch.allclose(lin(x), ref.detach(), atol=1e-6)


def test_binary_linear_offset_popcount():
    lin = QLinear(7, 3)
    x = _pm1(4, 7)
    agree = ((x[:, None, :] > 0) == (lin.weight[None] >= 0)).sum(-1).float()
    assert torch.equal(lin(x), agree)


def test_layer_config_context_nests_and_restores():
    base = get_layer_config()
    with binary_layer_config(bits_a=2, clip_threshold=1.3, approximation="binet") as cfg:
        assert cfg.bits_a == 2 and get_layer_config() is cfg
        conv = QConv2d(2, 2, 3)
        assert (conv.bits, conv.bits_a, conv.approximation) == (1, 2, "binet")
        assert conv.act.method == "round" and conv.act.clip_threshold == 1.3  # det_sign does not fit 2 bits
        assert conv.pad_value == -1.0  # BMXNet pads -1 whatever the input, a k-bit one too
        with binary_layer_config(bits=32, bits_a=32, approximation=None):
            inner = QConv2d(2, 2, 3)
            assert inner.full_precision and inner.weight_quantization == "identity"
            assert inner.act.method == "identity" and inner.approximation == "binet"
    assert get_layer_config() is base


def test_explicit_arguments_override_config_and_activation_alone():
    with binary_layer_config(bits_a=32, activation_method="approx_sign"):
        act = QActivation()
        x = torch.tensor([-2.0, -0.5, 0.5])
        assert act(x).tolist() == [-1.0, -0.75, 0.75]  # the 32-bit polynomial
        act1 = QActivation(bits=1, method="approx_sign", clip_threshold=0.6)
        assert act1(x).tolist() == [-1.0, -1.0, 1.0]


def test_errors_name_the_option():
    with pytest.raises(UserError, match="ABC-Net"):
        QConv2d(2, 2, 3, approximation="abc")
    with pytest.raises(UserError, match="approximation 'foo'"):
        QLinear(2, 2, approximation="foo")
    with pytest.raises(UserError, match=r"bits=3\.5"):
        QConv2d(2, 2, 3, bits=3.5)
    with pytest.raises(UserError, match="bits_a=16.*1..8 or 32"):
        QConv2d(2, 2, 3, bits_a=16)
    with pytest.raises(UserError, match=r"activation_method\) 'nope' is unknown"):
        QConv2d(2, 2, 3, activation_method="nope")
    with pytest.raises(UserError, match="weight_quantization 'det_sign' does not fit 4-bit weights"):
        QConv2d(2, 2, 3, bits=4, weight_quantization="det_sign")
    with pytest.raises(UserError, match="clip_threshold"):
        QActivation(clip_threshold=0)
    with pytest.raises(UserError, match="unknown option"):
        with binary_layer_config(bitz=1):
            pass
    with pytest.raises(UserError, match=r"activation_method\) 'x'"):
        with binary_layer_config(activation_method="x"):
            pass


def test_k_bit_weights_and_custom_callable_quantizer():
    conv = QConv2d(2, 2, 1, bits=2, bits_a=2)
    assert conv.weight_quantization == "dorefa" and not conv.apply_offset
    assert len(conv.quantized_weight().unique()) <= 4
    calls = []

    def q(x):
        calls.append(x.shape)
        return torch.where(x >= 0, 1.0, -1.0)

    c = QConv2d(2, 2, 1, activation_method=q)
    c(torch.randn(1, 2, 3, 3))
    assert calls == [torch.Size([1, 2, 3, 3])] and c.act.method is q


def test_clip_latent_weights_and_warning_once():
    model = nn.Sequential(QConv2d(2, 2, 3, padding=1), nn.Flatten(), QLinear(8, 2, bits=32, bits_a=32))
    with torch.no_grad():
        model[0].weight.mul_(10)
    assert L.clip_latent_weights_(model, 0.5) == 1
    assert model[0].weight.abs().max() <= 0.5 and model[2].weight.abs().max() > 0  # only binary layers
    assert L.latent_weight_warning(model) is None  # clipped: nothing to warn about
    fresh = nn.Sequential(QConv2d(2, 2, 3), QConv2d(2, 2, 3, bits=32, bits_a=32))
    text = L.latent_weight_warning(fresh)
    assert text is not None and "1 binary layer(s)" in text and "--clip-latent-weights" in text
    with pytest.raises(UserError, match="bound"):
        L.clip_latent_weights_(model, 0)


@pytest.mark.parametrize(
    "method,bits_a,pad_value,want",
    [
        ("det_sign", 1, None, -1.0),
        ("approx_sign", 1, None, -1.0),
        ("ste_heaviside", 1, None, -1.0),  # 0/1 input: still -1, as BMXNet and bitorch
        ("round", 2, None, -1.0),  # k-bit input in [0, 1]: still -1
        ("identity", 32, None, -1.0),  # real input into binary weights (BMXNet's bare QConv2D)
        ("det_sign", 1, 1.0, 1.0),  # larq QuickNet's pad_values=1.0
        ("det_sign", 1, 0.0, 0.0),  # larq's default zero padding
    ],
)
def test_padding_value_with_groups_dilation_stride_matches_explicit_pad(method, bits_a, pad_value, want):
    # the layer adds the border's contribution as a separate term; check it against an
    # explicit pad-then-conv for grouped, dilated, strided, non-square padding
    conv = QConv2d(
        4,
        6,
        (3, 2),
        stride=(2, 1),
        padding=(2, 1),
        dilation=(2, 1),
        groups=2,
        bits_a=bits_a,
        activation_method=method,
        no_offset=True,
        pad_value=pad_value,
    )
    x = torch.randn(3, 4, 7, 6, requires_grad=True)
    assert conv.pad_value == want
    xq = conv.act(x)
    ref = F.conv2d(
        F.pad(xq, (1, 1, 2, 2), value=want), conv.quantized_weight(), stride=(2, 1), dilation=(2, 1), groups=2
    )
    y = conv(x)
    if bits_a == 1:  # +-1 / 0-1 inputs: integer sums, exact whatever the order
        assert torch.equal(y, ref)
    assert torch.allclose(y, ref, atol=1e-5)
    (gw_ref,) = torch.autograd.grad(ref.square().sum(), conv.weight)
    (gw,) = torch.autograd.grad(y.square().sum(), conv.weight)
    assert torch.allclose(gw, gw_ref)


def test_a_bias_is_refused_like_bmxnet():
    with pytest.raises(UserError, match=r"QConv2d: bias=True is not supported.*BatchNorm"):
        QConv2d(2, 2, 3, bias=True)
    with pytest.raises(UserError, match=r"QLinear: bias=True is not supported"):
        QLinear(2, 2, bias=True, bits=32, bits_a=32)  # at every width, as BMXNet's check_params
    assert QConv2d(2, 2, 3).bias is None and QLinear(2, 2).bias is None
    with pytest.raises(UserError, match="pad_value"):
        QConv2d(2, 2, 3, pad_value="same")
    with pytest.raises(UserError, match="weight_clip"):
        QConv2d(2, 2, 3, weight_clip=0)


def test_own_weight_clip_is_kept_by_clip_latent_weights():
    """larq's kernel_constraint=WeightClip(1.25): the layer's own bound, whatever --clip-latent-weights says."""
    own, plain = QConv2d(2, 2, 3, weight_clip=1.25), QConv2d(2, 2, 3)
    model = nn.Sequential(own, plain, QConv2d(2, 2, 1, bits=32, bits_a=32, weight_clip=0.5))
    with torch.no_grad():
        for m in model:
            m.weight.normal_(0, 3)
    fp_before = model[2].weight.clone()
    assert L.has_weight_clips(model) and not L.has_weight_clips(nn.Sequential(plain))
    assert L.latent_weight_warning(model) is not None and "1 binary layer(s)" in L.latent_weight_warning(model)
    assert L.clip_latent_weights_(model, None) == 1  # only the layer with its own bound
    assert own.weight.abs().max() == 1.25 and plain.weight.abs().max() > 1.25
    assert L.clip_latent_weights_(model, 0.5) == 2
    assert own.weight.abs().max() == 1.25 and plain.weight.abs().max() == 0.5  # its own bound wins
    assert torch.equal(model[2].weight, fp_before)  # a full-precision layer keeps its weights
    assert L.latent_weight_warning(model) is None


@pytest.mark.slow
def test_inductor_compiled_binary_block_matches_eager():
    torch._dynamo.reset()
    m = nn.Sequential(nn.BatchNorm2d(4), QConv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), QConv2d(4, 4, 1))
    L.clip_latent_weights_(m)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = m(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().clone().requires_grad_()
    yc = torch.compile(m, fullgraph=False)(x2)
    (gxc,) = torch.autograd.grad(yc.square().sum(), x2)
    assert torch.allclose(y, yc, atol=1e-5) and torch.allclose(gx, gxc, atol=1e-4)
