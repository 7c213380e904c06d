"""bitrain's layers as OpenVINO ops (``openvino.py`` walks a model and calls these).

A 1-bit QConv2d whose input quantizer signs (det_sign family) and whose weights are +-scale becomes one
``BinaryConvolution`` (xnor-popcount, pad -1), bit-exact with the layer in eval mode:
- weights: the sign bits in a u1 constant, written least-significant bit first over the flattened OIHW
  tensor (the CPU plugin's order; the Python API's u1 constant packs most-significant first: not used);
- input: a per-channel 2-level FakeQuantize with its threshold at the float32 just below 0 (bit 1 for
  x >= 0, -0.0 included, as det_sign), output 0/1;
- in_channels % 8 != 0 (the CPU kernel is wrong there): the input gets +1 channels and the weights +1 bits
  up to a multiple of 8, and the known extra count is subtracted as a constant map;
- a pad value other than -1: its known difference (a constant map) is added;
- then per channel: mean|W| (binet/xnor) or the weight magnitude, BMXNet's offset (D + fan_in) / 2,
  XNOR-Net's K, and a BatchNorm that follows, as one Multiply and one Add.
Every other layer is float ops; a QConv2d / QLinear that does not binarize this way runs as a float conv /
matmul of its quantized weight (its input identity or a sign), or is refused naming the layer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: openvino.py refuses with one line without it; the module still imports
    import openvino as ov
    import openvino.opset14 as ops
    from openvino import op
except ImportError:  # pragma: no cover
    ov = ops = op = None

from bitrain.binary import quantizers as quant
from bitrain.binary.layers import QConv2d, QLinear
from bitrain.errors import UserError

SIGN_T = np.float32(-(2.0**-149))  # the largest float32 below 0: "x > SIGN_T" is det_sign's "x >= 0"


def chan(v) -> np.ndarray:
    """A per-channel (1, C, 1, 1) float32 constant."""
    v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
    return np.asarray(v, np.float32).reshape(1, -1, 1, 1)


def shape_of(node) -> list[int]:
    """The static shape of a node's (first) output or of an output."""
    shape = node.get_partial_shape() if hasattr(node, "get_partial_shape") else node.get_output_partial_shape(0)
    return list(shape.to_shape())


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as y = a x + b per channel (float64)."""
    if bn.running_mean is None:
        raise UserError("OpenVINO export: a BatchNorm2d without running statistics cannot be exported")
    var, mean = bn.running_var.detach().double().cpu(), bn.running_mean.detach().double().cpu()
    a = 1.0 / torch.sqrt(var + bn.eps)
    b = -mean * a
    if bn.affine:
        a, b = (
            a * bn.weight.detach().double().cpu(),
            b * bn.weight.detach().double().cpu() + bn.bias.detach().double().cpu(),
        )
    return a, b


def sign_node(x):
    """det_sign as float ops: +1 for x >= 0 (and -0.0), else -1."""
    return ops.select(ops.greater_equal(x, np.float32(0)), np.float32(1), np.float32(-1))


def _act_node(layer: nn.Module, x, name: str):
    """A QConv2d / QLinear's input quantizer as ops: identity or a sign; others refused."""
    act = layer.act
    if act.is_identity:
        return x
    if signs_act(act):
        return sign_node(x)
    raise UserError(
        f"OpenVINO export: layer {name}: input quantizer {act.method!r} at {act.bits} bits has no OpenVINO "
        "form here (supported: 32-bit identity and the sign quantizers det_sign / approx_sign / swish_sign)"
    )


def signs_act(act: nn.Module) -> bool:
    """An input quantizer whose forward is exactly det_sign's (+1 for x >= 0)."""
    record = quant.spec(act.method)
    return act.bits == 1 and record is not None and record.sign_forward


def binary_conv_ok(layer: nn.Module) -> bool:
    """Whether a QConv2d becomes a BinaryConvolution: 1-bit +-scale weights, signed input, no groups."""
    if not (isinstance(layer, QConv2d) and layer.bits == 1 and signs_act(layer.act) and layer.groups == 1):
        return False
    qw = layer.quantized_weight().detach().reshape(layer.weight.shape[0], -1).abs()
    return bool(torch.equal(qw, qw.amax(1, keepdim=True).expand_as(qw)))


def _pack_u1(positive: np.ndarray) -> op.Constant:
    """A u1 Constant, bit 1 = +1, least-significant bit first over the flattened tensor."""
    bits = np.packbits(positive.reshape(-1).astype(np.uint8), bitorder="little")
    t = ov.Tensor(ov.Type.u1, list(positive.shape))
    t.data[:] = bits
    return op.Constant(t)


def _tap_map(hw, layer: QConv2d, inside: float, outside: float, weight: torch.Tensor) -> torch.Tensor:
    """(1, O, Ho, Wo) float64: conv of a map that is ``inside`` on the image and ``outside`` on the padding."""
    (ph, pw), (h, w) = layer.qpadding, hw
    m = torch.full((1, 1, h + 2 * ph, w + 2 * pw), outside, dtype=torch.float64)
    m[..., ph : ph + h, pw : pw + w] = inside
    m = m.expand(1, weight.shape[1], -1, -1)
    return F.conv2d(m, weight, None, layer.stride, 0, layer.dilation)


def _unfused(x):
    """``x`` through a 1x1 max-pool (the same values) when it is a residual sum (an Add of two computed tensors).

    The CPU plugin (2026.4) fuses the binarizing FakeQuantize into the conv before it, and when that conv
    also adds the residual, it may convert the residual to u1 first: wrong values (seen in Net32 of the
    packed export tests). A Reshape is optimised away; a pooling node stops the fusion.
    """
    node = x.get_node() if hasattr(x, "get_node") else x
    if node.get_type_name() != "Add":
        return x
    if any(i.get_source_output().get_node().get_type_name() == "Constant" for i in node.inputs()):
        return x
    return ops.max_pool(x, [1, 1], [1, 1], [0, 0], [0, 0], [1, 1]).output(0)


def _binary_dot(x, layer: QConv2d, positive: torch.Tensor, hw):
    """The +-1 dot of sign(x) and the weight signs, the input padded with the layer's pad value."""
    o, c, kh, kw = positive.shape
    pos = positive.numpy()
    npad = (-c) % 8  # the CPU kernel needs whole bytes of input channels
    if npad:
        zero = np.zeros(4, np.int64)
        x = ops.pad(x, zero, np.array([0, npad, 0, 0]), "constant", np.float32(1.0))
        pos = np.concatenate([pos, np.ones((o, npad, kh, kw), bool)], 1)
    t = np.full((1, c + npad, 1, 1), SIGN_T, np.float32)
    x = _unfused(x)
    xb = ops.fake_quantize(x, t, t, np.zeros_like(t), np.ones_like(t), 2)
    (ph, pw), stride, dil = layer.qpadding, list(layer.stride), list(layer.dilation)
    y = ops.binary_convolution(xb, _pack_u1(pos), stride, [ph, pw], [ph, pw], dil, "xnor-popcount", -1.0)
    extra = None
    if npad:  # the +1 channels added npad * (taps inside - taps on the -1 padding)
        ones = torch.ones(1, 1, kh, kw, dtype=torch.float64)
        extra = -npad * _tap_map(hw, layer, 1.0, -1.0, ones)
    if layer.pad_value != -1.0 and any(layer.qpadding):  # the padding taps counted -1, not pad_value
        signed = positive.double() * 2 - 1
        fix = (layer.pad_value + 1.0) * _tap_map(hw, layer, 0.0, 1.0, signed)
        extra = fix if extra is None else extra + fix
    if extra is not None:
        y = ops.add(y, extra.float().numpy())
    return y


def _xnor_k(x, layer: QConv2d):
    """XNOR-Net's K: channel-mean |x| averaged over each receptive field, zero padded."""
    kh, kw = layer.kernel_size
    (ph, pw) = layer.qpadding
    a = ops.reduce_mean(ops.abs(x), np.array([1]), True)
    k = np.full((1, 1, kh, kw), 1.0 / (kh * kw), np.float32)
    return ops.convolution(a, k, list(layer.stride), [ph, pw], [ph, pw], list(layer.dilation))


def qconv(layer: QConv2d, x, name: str, bn: nn.BatchNorm2d | None = None):
    """A QConv2d (and the BatchNorm after it, if given) as ops."""
    o = layer.out_channels
    a, b = (
        bn_affine(bn) if bn is not None else (torch.ones(o, dtype=torch.float64), torch.zeros(o, dtype=torch.float64))
    )
    if layer.full_precision:
        y = float_conv(x, layer.weight, None, layer.stride, layer.qpadding, layer.dilation, layer.groups)
        return ops.add(ops.multiply(y, chan(a)), chan(b)) if bn is not None else y
    half = 0.5 if layer.apply_offset else 1.0
    shift = half * layer.fan_in if layer.apply_offset else 0.0
    if binary_conv_ok(layer):
        qw = layer.quantized_weight().detach().double().cpu()
        mag = qw.reshape(o, -1).abs().amax(1)
        y = _binary_dot(x, layer, qw >= 0, shape_of(x)[2:])
        scale = a * mag * half
    else:
        xin = _act_node(layer, x, name)
        (ph, pw) = layer.qpadding
        if any(layer.qpadding):
            pads = np.array([0, 0, ph, pw])
            xin = ops.pad(xin, pads, pads, "constant", np.float32(layer.pad_value))
        w = layer.quantized_weight().detach().cpu()
        y = float_conv(xin, w, None, layer.stride, (0, 0), layer.dilation, layer.groups)
        scale = a * half
    if torch.any(scale != 1):
        y = ops.multiply(y, chan(scale))
    if layer.approximation == "xnor":
        y = ops.multiply(y, _xnor_k(x, layer))
    return ops.add(y, chan(a * shift + b))


def float_conv(x, weight: torch.Tensor, bias, stride, padding, dilation, groups: int):
    """torch's conv2d (zero padding) as a Convolution / GroupConvolution."""
    if isinstance(padding, str):
        raise UserError(f"OpenVINO export: conv padding={padding!r} is not supported; give numbers")
    w = weight.detach().float().cpu().numpy()
    pads = [int(p) for p in padding]
    args = (list(stride), pads, pads, list(dilation))
    if groups == 1:
        y = ops.convolution(x, w, *args)
    else:
        o = w.shape[0]
        y = ops.group_convolution(x, w.reshape(groups, o // groups, *w.shape[1:]), *args)
    return y if bias is None else ops.add(y, chan(bias))


def conv2d(m: nn.Conv2d, x, name: str, bn: nn.BatchNorm2d | None = None):
    """An nn.Conv2d, with the BatchNorm after it folded into its weights and bias."""
    if m.padding_mode != "zeros":
        raise UserError(f"OpenVINO export: layer {name}: padding_mode {m.padding_mode!r} is not supported")
    w, bias = m.weight.detach().double().cpu(), m.bias
    bias = torch.zeros(m.out_channels, dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    if bn is not None:
        a, b = bn_affine(bn)
        w, bias = w * a.view(-1, 1, 1, 1), bias * a + b
    has_bias = bn is not None or m.bias is not None
    return float_conv(x, w, bias.float() if has_bias else None, m.stride, m.padding, m.dilation, m.groups)


def linear(m: nn.Linear, x, name: str):
    """nn.Linear, or a QLinear (its quantized weight; input identity or a sign; offset, xnor's K)."""
    if isinstance(m, QLinear) and not m.full_precision:
        w = m.quantized_weight().detach().float().cpu()
        if m.apply_offset:
            w = w * 0.5
        y = ops.matmul(_act_node(m, x, name), w.numpy(), False, True)
        if m.apply_offset:
            y = ops.add(y, np.float32(m.fan_in / 2.0))
        if m.approximation == "xnor":
            y = ops.multiply(y, ops.reduce_mean(ops.abs(x), np.array([-1]), True))
        return y
    y = ops.matmul(x, m.weight.detach().float().cpu().numpy(), False, True)
    return y if m.bias is None else ops.add(y, m.bias.detach().float().cpu().numpy())
