"""AlexNet-bodied binary nets of the larq zoo: ``binary_alexnet`` (BNN, Hubara et al. 2016), ``xnornet``
(XNOR-Net, Rastegari et al. 2016) and ``dorefanet`` (DoReFa-Net W1A2, Zhou et al. 2016).

The three share AlexNet's five convs (11x11/4 or 12x12/4, 5x5, three 3x3; 3x3/2 max pools) and two 4096-wide
fully connected layers. As in larq zoo: BatchNorm without gamma (Keras ``scale=False``) after each binary layer,
the binary layers without bias, without the xnor offset (``no_offset``: the plain +-1 dot product), padded with
0 (larq's default) and with larq's quantizers (see ``own`` in parts.py for how --bits 32 --bits-a 32 still gives
the float twin); where larq constrains the latent weights (``WeightClip``), ``weight_clip=1.0``:

* binary_alexnet: ste_sign inputs and weights everywhere, the first conv (float input) and the classifier
  included; conv -> pool -> BN; the classifier is binary 4096 -> classes with BN.
* xnornet: float 11x11/4 stem, BN, ReLU; binary convs with ste_sign inputs and XNOR-Net's weights
  (sign times mean|W| per output channel, gradient through the mean: ``approximation="binet"``); the first
  fully connected layer is a 6x6 conv, the second a 1x1 conv; ReLU and a float classifier without bias.
* dorefanet: float 12x12/4 stem with bias; 2-bit larq DoReFa activations (``dorefa_quantizer``) and sign weights
  scaled by the layer's mean|W| with an identity gradient (larq zoo's ``magnitude_aware_sign_unclipped``);
  conv -> BN -> pool; clip to [0, 1] before the float classifier.

Inputs below 50 px get a 3x3/1 first conv, and an ``AdaptiveAvgPool2d(6)`` (identity at 224 px) feeds the
fully connected part, so every input size has the published classifier (torchvision's AlexNet does the same).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.geometry import conv_out_size
from bitrain.binary.layers import QConv2d, QLinear, get_layer_config
from bitrain.models._registry import register
from bitrain.models.parts import ZooQuantizer, check_stem, keras_bn, max_pool, own

DOREFA_BITS_A = 2  # larq zoo DoReFaNet's activations_k_bit


class _UnclippedScaledSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * w.abs().mean()

    @staticmethod
    def backward(ctx, grad):
        return grad


#: larq zoo DoReFaNet's weight quantizer: sign(w) * mean|w| over the whole layer (0 -> +1), gradient 1
#: everywhere (no clip, no scale on the gradient)
magnitude_aware_sign_unclipped = ZooQuantizer("magnitude_aware_sign_unclipped", _UnclippedScaledSign.apply)


class AlexNetLike(nn.Module):
    """features (convs, pools, BN) -> output (the fully connected part)."""

    def __init__(self, features: list[nn.Module], output: list[nn.Module]) -> None:
        super().__init__()
        self.features = nn.Sequential(*features)
        self.output = nn.Sequential(*output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


def _first(initial_layers: str, image_size: int, kernel: int, same: bool) -> tuple[int, int, int, int]:
    # (kernel, stride, padding, output size) of the first conv; 'same' pads k // 2 (TF's output size)
    if initial_layers == "thumbnail":
        return 3, 1, 1, image_size
    pad = kernel // 2 if same else 0
    return kernel, 4, pad, conv_out_size(image_size, kernel, 4, pad)


def _ste(c_in: int, c_out: int, k: int, stride: int, pad: int, **kw) -> QConv2d:
    # larq's QuantConv2D(ste_sign, ste_sign, kernel_constraint="weight_clip", use_bias=False)
    return QConv2d(
        c_in,
        c_out,
        k,
        stride,
        pad,
        activation_method=kw.pop("activation_method", own("det_sign")),
        weight_quantization=own("det_sign", "weight"),
        no_offset=True,
        pad_value=0.0,
        weight_clip=1.0,
        **kw,
    )


def _ste_linear(f_in: int, f_out: int) -> QLinear:
    return QLinear(
        f_in,
        f_out,
        activation_method=own("det_sign"),
        weight_quantization=own("det_sign", "weight"),
        no_offset=True,
        weight_clip=1.0,
    )


@register("binary_alexnet", family="alexnet")
def binary_alexnet(*, num_classes: int, in_channels: int, image_size: int, initial_layers: str) -> nn.Module:
    """larq zoo BinaryAlexNet: binary convs 64 (11x11/4, float input), 192 (5x5), 384, 384, 256 (3x3), each
    followed by [a 3x3/2 max pool,] BN; binary fully connected 4096, 4096, classes, each followed by BN."""
    check_stem("binary_alexnet", initial_layers)
    k, s, p, size = _first(initial_layers, image_size, 11, same=True)
    convs = [(in_channels, 64, k, s, p, True), (64, 192, 5, 1, 2, True), (192, 384, 3, 1, 1, False)]
    convs += [(384, 384, 3, 1, 1, False), (384, 256, 3, 1, 1, True)]
    feats: list[nn.Module] = []
    for i, (c_in, c_out, kernel, stride, pad, pool) in enumerate(convs):
        first = {"bits_a": 32, "activation_method": None} if i == 0 else {}  # larq: no input quantizer
        feats.append(_ste(c_in, c_out, kernel, stride, pad, **first))
        if pool:
            mp, size = max_pool(size, same=False)
            feats.append(mp)
        feats.append(keras_bn(c_out, 0.9, scale=False))
    fc: list[nn.Module] = [nn.AdaptiveAvgPool2d(6), nn.Flatten()]
    for f_in, f_out in ((256 * 36, 4096), (4096, 4096), (4096, num_classes)):
        fc += [_ste_linear(f_in, f_out), keras_bn(f_out, 0.9, scale=False, dim=1)]
    return AlexNetLike(feats, fc)


@register("xnornet", family="alexnet")
def xnornet(*, num_classes: int, in_channels: int, image_size: int, initial_layers: str) -> nn.Module:
    """larq zoo XNORNet: float conv 96 (11x11/4), BN, ReLU, pool, BN; binary convs 256 (5x5), 384, 384, 256
    (3x3), binary 6x6 conv 4096 and 1x1 conv 4096, each with BN; ReLU; float linear without bias."""
    check_stem("xnornet", initial_layers)
    k, s, p, size = _first(initial_layers, image_size, 11, same=True)
    mp, size = max_pool(size, same=False)
    feats: list[nn.Module] = [
        nn.Conv2d(in_channels, 96, k, s, p, bias=False),
        keras_bn(96, 0.9, 1e-5, scale=False),
        nn.ReLU(inplace=True),
        mp,
        keras_bn(96, 0.9, 1e-4, scale=False),
    ]
    convs = [(96, 256, 5, True), (256, 384, 3, False), (384, 384, 3, False), (384, 256, 3, True)]
    for c_in, c_out, kernel, pool in convs:  # (in, out, kernel, max pool after it)
        feats.append(_xnor(c_in, c_out, kernel, kernel // 2))
        if pool:
            mp, size = max_pool(size, same=False)
            feats.append(mp)
        feats.append(keras_bn(c_out, 0.9, 1e-4, scale=False))
    fc: list[nn.Module] = [
        nn.AdaptiveAvgPool2d(6),
        _xnor(256, 4096, 6, 0),  # larq: a 6x6 'valid' conv on the 6x6 map, i.e. a dense layer
        keras_bn(4096, 0.9, 1e-4, scale=False),
        _xnor(4096, 4096, 1, 0),
        keras_bn(4096, 0.9, 1e-3, scale=False),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4096, num_classes, bias=False),
    ]
    return AlexNetLike(feats, fc)


def _xnor(c_in: int, c_out: int, kernel: int, pad: int) -> QConv2d:
    # larq zoo's xnor_weight_scale: clip to [-1, 1], sign times mean|W| per output channel, gradient through the
    # mean; with latent weights in [-1, 1] (larq's weight_clip) that is det_sign with the binet approximation
    binary = own("det_sign", "weight")
    return QConv2d(
        c_in,
        c_out,
        kernel,
        1,
        pad,
        activation_method=own("det_sign"),
        weight_quantization=binary,
        approximation="binet" if binary else None,
        no_offset=True,
        pad_value=0.0,
        weight_clip=1.0,
    )


@register("dorefanet", family="alexnet")
def dorefanet(*, num_classes: int, in_channels: int, image_size: int, initial_layers: str) -> nn.Module:
    """larq zoo DoReFaNet (W1A2): float conv 96 (12x12/4, bias); DoReFa-quantized convs 256 (5x5), 384, 384,
    256 (3x3), each with BN and a 3x3/2 max pool but the fourth; fully connected 4096, 4096 with BN; clip to
    [0, 1]; float linear. Activations at 2 bits (``bits_a`` 2-8 when given; the default 1 means larq's 2)."""
    check_stem("dorefanet", initial_layers)
    k, s, p, size = _first(initial_layers, image_size, 12, same=False)
    bits_a = get_layer_config().bits_a
    bits_a = DOREFA_BITS_A if bits_a == 1 else bits_a
    q = {
        "bits_a": bits_a,
        "activation_method": own("dorefa_quantizer"),
        "weight_quantization": own(magnitude_aware_sign_unclipped, "weight"),
    }
    feats: list[nn.Module] = [nn.Conv2d(in_channels, 96, k, s, p, bias=True)]
    convs = [(96, 256, 5, "same"), (256, 384, 3, "same"), (384, 384, 3, ""), (384, 256, 3, "valid")]
    for c_in, c_out, kernel, pool in convs:  # (in, out, kernel, the max pool's padding after BN, or none)
        conv = QConv2d(c_in, c_out, kernel, 1, kernel // 2, pad_value=0.0, **q)  # larq pads its [0, 1] inputs with 0
        feats += [conv, keras_bn(c_out, 0.9, 1e-4, scale=False)]
        if pool:
            mp, size = max_pool(size, same=pool == "same")
            feats.append(mp)
    fc: list[nn.Module] = [nn.AdaptiveAvgPool2d(6), nn.Flatten()]
    for f_in, f_out in ((256 * 36, 4096), (4096, 4096)):
        fc += [QLinear(f_in, f_out, **q), keras_bn(f_out, 0.9, 1e-4, scale=False, dim=1)]
    fc += [nn.Hardtanh(0.0, 1.0), nn.Linear(4096, num_classes, bias=True)]
    return AlexNetLike(feats, fc)
