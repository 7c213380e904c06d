"""Quantized layers: QConv2d, QLinear, the scaling approximations and the latent-weight bounds.

QActivation (``activation.py``) and the layer configuration (``layer_config.py``: the defaults,
``binary_layer_config``) are importable from here too.

BMXNet v2 semantics (``gluon/nn/binary_layers.py``), re-done as plain nn.Conv2d / nn.Linear
subclasses whose forward is: quantize input -> pad -> conv (or linear).

* Padding: the quantized input is padded with ``pad_value``, -1 by default whatever the input
  (BMXNet's ``_apply_pre_padding`` and bitorch's ``padding_value``): a +-1 input stays binary and equals
  what an xnor-popcount kernel sees. ``pad_value=1.0`` is larq QuickNet's ``pad_values=1.0``,
  ``pad_value=0.0`` larq's default (zero padding). Only a full-precision layer pads with zeros.
* Bias: refused (BMXNet's ``check_params``, bitorch's assert): a BatchNorm after the layer gives the shift.
* Offset: when the weights are 1-bit +-1 values (bits == 1, a sign quantizer), there is no
  scaling approximation and ``no_offset`` is False, the output is ``(dot + fan_in) / 2`` with
  ``fan_in = in_channels / groups * kh * kw``: for +-1 inputs that is the xnor-popcount count
  of agreeing positions. As in BMXNet this depends on the weight bits only (not bits_a).
* Approximations (only for quantized weights, bits < 32): ``binet`` multiplies the quantized
  weights by mean|W| per output channel, with gradient (Bi-Real "scaled weights");
  ``xnor`` does the same with the scale's gradient stopped and multiplies the output by
  XNOR-Net's K = mean over channels of |x| (the real-valued input) averaged over each
  receptive field, also stop-gradient. ``abc`` (ABC-Net) is rejected.
* bits / bits_a = 32 is full precision: no quantization and no gradient cancel, so a layer
  with bits = bits_a = 32 is exactly nn.Conv2d / nn.Linear. (BMXNet's default 32-bit
  activation is relu; here it is identity, so that equality holds.)
* Weight quantizers get no gradient cancel (as in BMXNet); the clip threshold applies to the
  input activations.
* ``weight_clip``: larq's ``kernel_constraint=WeightClip(c)``, this layer's own latent-weight bound;
  ``clip_latent_weights_`` (called by the trainer after every step) clamps the layer to it.

Latent weights: a binary weight quantizer passes a gradient to latent float weights that
nothing bounds (larq's warning). Call ``clip_latent_weights_(model)`` after each
``optimizer.step()`` (or train with Bop, which keeps them at +-1); layers with their own
``weight_clip`` are clamped to it on every call. The Trainer checks this once, at the start of
training (``latent_weight_warning``): no hook runs on the hot path.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary import quantizers as quant
from bitrain.binary.activation import QActivation, resolve_method
from bitrain.binary.geometry import conv_out_size
from bitrain.binary.layer_config import LayerConfig, binary_layer_config, check_approximation, get_layer_config
from bitrain.errors import UserError

# the configuration lives in layer_config.py (torch-free, read by the command line too) and QActivation in
# activation.py; their public names stay importable from here, where the layers are
__all__ = [
    "LayerConfig",
    "QActivation",
    "QConv2d",
    "QLinear",
    "binary_layer_config",
    "binary_layers",
    "clip_latent_weights_",
    "get_layer_config",
    "has_weight_clips",
    "latent_weight_warning",
    "mark_latent_bounded",
]


def _check_weight_clip(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserError(f"weight_clip={value!r} must be a finite number > 0 (or None: no bound of its own)")
    return float(value)


def _refuse_bias(layer: nn.Module, bias: bool) -> None:
    if bias:
        raise UserError(
            f"{type(layer).__name__}: bias=True is not supported (BMXNet and bitorch refuse a bias in a binary "
            "layer); use bias=False and a BatchNorm after the layer for the shift"
        )


def _setup(
    layer: nn.Module,
    bits,
    bits_a,
    weight_quantization,
    activation_method,
    clip_threshold,
    approximation,
    no_offset,
    weight_clip,
    fan_in: int,
) -> None:
    """Shared attribute setup of QConv2d and QLinear (plain function, not a mixin)."""
    cfg = get_layer_config()
    layer.weight_clip = _check_weight_clip(weight_clip)
    layer.bits = quant.check_bits(cfg.bits if bits is None else bits, "bits")
    layer.bits_a = quant.check_bits(cfg.bits_a if bits_a is None else bits_a, "bits_a")
    layer.approximation = check_approximation(cfg.approximation if approximation is None else approximation)
    layer.no_offset = bool(cfg.no_offset if no_offset is None else no_offset)
    layer.weight_quantization, wq = resolve_method(
        weight_quantization, cfg.weight_quantization, layer.bits, "weight", "weight_quantization"
    )
    layer._wq = wq if isinstance(layer.weight_quantization, str) else None
    layer.act = QActivation(layer.bits_a, clip_threshold, activation_method)
    layer.fan_in = fan_in
    record = quant.spec(layer.weight_quantization)
    binary = layer.bits == 1 and record is not None and record.plus_minus_one
    layer.apply_offset = binary and layer.approximation == "" and not layer.no_offset
    layer.full_precision = layer.bits == 32 and layer.bits_a == 32 and layer.act.is_identity


def _quantized_weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    if layer.bits == 32:
        return w
    wq = layer._wq(w, quant.INF, layer.bits) if layer._wq is not None else layer.weight_quantization(w)
    if layer.approximation:
        # mean|W| per output channel, shape (out, 1, ...) to broadcast over the weight
        scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        wq = wq * (scale.detach() if layer.approximation == "xnor" else scale)
    return wq


def _forward_weight(layer: nn.Module, scale: float) -> torch.Tensor:
    # quantized_weight() * scale; for a plain det_sign one fused pass producing +-scale
    record = quant.spec(layer.weight_quantization)
    if layer.bits == 1 and record is not None and record.ste_sign and not layer.approximation:
        return quant.scaled_sign(layer.weight, scale)
    w = _quantized_weight(layer)
    return w if scale == 1.0 else w * scale


def _out_hw(hw, conv: nn.Conv2d) -> tuple[int, int]:
    # output height and width of a QConv2d (padding qpadding) on an hw input
    h, w = (conv_out_size(*a) for a in zip(hw, conv.kernel_size, conv.stride, conv.qpadding, conv.dilation))
    return h, w


def _offset_args(layer: nn.Module, w: torch.Tensor):
    """(dot + fan_in) / 2 as one linear: weights halved (exact for +-1) and fan_in / 2 as bias."""
    return w * 0.5, w.new_full((w.shape[0],), layer.fan_in / 2.0)


class QConv2d(nn.Conv2d):
    """nn.Conv2d whose forward quantizes the input (bits_a) and the weight (bits), BMXNet QConv2D.

    ``padding`` is applied by the layer with ``pad_value`` (``qpadding``, (h, w); default -1);
    the parent's ``padding`` attribute is (0, 0). No bias. State dict key: ``weight``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        *,
        bits: int | None = None,
        bits_a: int | None = None,
        weight_quantization=None,
        activation_method=None,
        clip_threshold: float | None = None,
        approximation: str | None = None,
        no_offset: bool | None = None,
        pad_value: float | None = None,
        weight_clip: float | None = None,
    ):
        _refuse_bias(self, bias)
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, False)
        if isinstance(padding, str):
            raise UserError(f"QConv2d: padding={padding!r}; give an int or (h, w) pair")
        self.qpadding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        if pad_value is not None and (isinstance(pad_value, bool) or not isinstance(pad_value, (int, float))):
            raise UserError(f"QConv2d: pad_value={pad_value!r} must be a number (None: -1, BMXNet's)")
        self.pad_value = -1.0 if pad_value is None else float(pad_value)
        self._border_cols: dict = {}  # cache of _padding_term's unfolded border mask
        kh, kw = self.kernel_size
        _setup(
            self,
            bits,
            bits_a,
            weight_quantization,
            activation_method,
            clip_threshold,
            approximation,
            no_offset,
            weight_clip,
            fan_in=in_channels // groups * kh * kw,
        )

    def quantized_weight(self) -> torch.Tensor:
        """The weight as used in forward: quantized and scaled (binet/xnor); the offset's 1/2 excluded."""
        return _quantized_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_precision:  # exactly nn.Conv2d (zero padding inside the conv kernel)
            return F.conv2d(x, self.weight, None, self.stride, self.qpadding, self.dilation, self.groups)
        x_real = x
        x = self.act(x)
        # (dot + fan_in) / 2: halve whichever is smaller, the weights or the output
        n_out = x.shape[0] * self.out_channels * math.prod(_out_hw(x.shape[-2:], self))
        half_w = self.apply_offset and self.weight.numel() <= n_out
        w = _forward_weight(self, 0.5 if half_w else 1.0)
        b = w.new_full((self.out_channels,), self.fan_in / 2.0) if half_w else None
        # The conv pads with zeros inside its kernel (a pre-padded input makes oneDNN much
        # slower on small maps); the border's pad value enters as a separate tiny term.
        y = F.conv2d(x, w, b, self.stride, self.qpadding, self.dilation, self.groups)
        pad_value = self.pad_value
        if pad_value != 0.0 and any(self.qpadding):
            y = y.add_(self._padding_term(x.shape[-2:], w, pad_value))  # in place: conv's backward does not need y
        if self.apply_offset and not half_w:
            y = y.add_(self.fan_in).mul_(0.5)
        if self.approximation == "xnor" and self.bits < 32:
            y = y * self._xnor_k(x_real)
        return y

    def _padding_term(self, hw, w: torch.Tensor, pad_value: float) -> torch.Tensor:
        # conv(pad(x, v)) = conv(pad(x, 0)) + conv(pad(0, v)); every input channel has the same
        # border, so the second term only needs the weights summed over input channels:
        # (out, kh*kw) @ unfolded border mask (kh*kw, H'*W') -> (1, out, H', W'), broadcast
        # over the batch. A matmul, because a 1-channel conv falls to a slow kernel on the CPU.
        (h, wd), (ph, pw) = hw, self.qpadding
        key = (h, wd, pad_value, w.dtype, w.device)
        cols = None if torch.compiler.is_compiling() else self._border_cols.get(key)
        if cols is None:  # the unfolded border mask depends on the input size only: cache it
            mask = w.new_full((1, 1, h + 2 * ph, wd + 2 * pw), pad_value)
            mask[:, :, ph : ph + h, pw : pw + wd] = 0.0
            cols = F.unfold(mask, self.kernel_size, dilation=self.dilation, stride=self.stride)[0]
            if not torch.compiler.is_compiling():
                self._border_cols = {key: cols}  # one entry: a model sees one size at a time
        ho, wo = _out_hw(hw, self)
        return (w.sum(1).flatten(1) @ cols).view(1, w.shape[0], ho, wo)

    def _xnor_k(self, x: torch.Tensor) -> torch.Tensor:
        # K (N, 1, H', W'): channel-mean |x| averaged over each receptive field (zero padded)
        with torch.no_grad():
            a = x.abs().mean(dim=1, keepdim=True)
            kh, kw = self.kernel_size
            k = a.new_full((1, 1, kh, kw), 1.0 / (kh * kw))
            return F.conv2d(a, k, None, self.stride, self.qpadding, self.dilation)

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", qpadding={self.qpadding}, bits={self.bits}, bits_a={self.bits_a}, "
            f"weight_quantization={self.weight_quantization!r}, approximation={self.approximation!r}, "
            f"offset={self.apply_offset}, pad_value={self.pad_value}"
            + (f", weight_clip={self.weight_clip}" if self.weight_clip is not None else "")
        )


class QLinear(nn.Linear):
    """nn.Linear whose forward quantizes the input (bits_a) and the weight (bits).

    Same offset and approximation rules as QConv2d with fan_in = in_features; ``xnor``'s K is
    mean|x| over the features of each sample. No bias. State dict key: ``weight``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        bits: int | None = None,
        bits_a: int | None = None,
        weight_quantization=None,
        activation_method=None,
        clip_threshold: float | None = None,
        approximation: str | None = None,
        no_offset: bool | None = None,
        weight_clip: float | None = None,
    ):
        _refuse_bias(self, bias)
        super().__init__(in_features, out_features, False)
        _setup(
            self,
            bits,
            bits_a,
            weight_quantization,
            activation_method,
            clip_threshold,
            approximation,
            no_offset,
            weight_clip,
            fan_in=in_features,
        )

    def quantized_weight(self) -> torch.Tensor:
        """The weight as used in forward: quantized and scaled (binet/xnor); the offset's 1/2 excluded."""
        return _quantized_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_precision:
            return F.linear(x, self.weight)
        x_real = x
        x = self.act(x)
        w, b = self.quantized_weight(), None
        if self.apply_offset:
            w, b = _offset_args(self, w)
        y = F.linear(x, w, b)
        if self.approximation == "xnor" and self.bits < 32:
            y = y * x_real.detach().abs().mean(dim=-1, keepdim=True)
        return y

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", bits={self.bits}, bits_a={self.bits_a}, "
            f"weight_quantization={self.weight_quantization!r}, approximation={self.approximation!r}, "
            f"offset={self.apply_offset}"
        )


# --- latent weights ----------------------------------------------------------------------------


def binary_layers(model: nn.Module) -> list[nn.Module]:
    """QConv2d / QLinear modules of ``model`` with 1-bit weights."""
    return [m for m in model.modules() if isinstance(m, (QConv2d, QLinear)) and m.bits == 1]


def mark_latent_bounded(params) -> None:
    """Tell the binary layers' check that these weights are kept bounded (e.g. by Bop)."""
    for p in params:
        p._bitrain_bounded = True


def _own_clip(m: nn.Module) -> float | None:
    # a layer's own latent-weight bound (larq's WeightClip), for layers that quantize their weights
    return m.weight_clip if isinstance(m, (QConv2d, QLinear)) and m.bits < 32 else None


def has_weight_clips(model: nn.Module) -> bool:
    """True when some layer of ``model`` has a ``weight_clip`` of its own (the trainer then clips every step)."""
    return any(_own_clip(m) is not None for m in model.modules())


@torch.no_grad()
def clip_latent_weights_(model: nn.Module, bound: float | None = 1.0) -> int:
    """Clamp latent weights in place; returns how many layers it clamped.

    A layer with its own ``weight_clip`` (larq's ``WeightClip``) is clamped to it; every other 1-bit
    layer to [-bound, bound] (``bound=None``: only the layers with their own). Call after every
    ``optimizer.step()``: with a straight-through sign the gradient keeps pushing latent weights that
    are already past the sign, and without a bound they grow until a sign flip needs many steps
    (larq's warning).
    """
    if bound is not None and (not bound > 0 or math.isinf(bound)):
        raise UserError(f"clip_latent_weights_: bound={bound!r} must be a finite number > 0")
    done = 0
    for m in model.modules():
        own = _own_clip(m)
        b = own if own is not None else (bound if isinstance(m, (QConv2d, QLinear)) and m.bits == 1 else None)
        if b is None:
            continue
        m.weight.clamp_(-b, b)
        m.weight._bitrain_bounded = True
        done += 1
    return done


def latent_weight_warning(model: nn.Module) -> str | None:
    """larq's warning as text, or None: 1-bit layers whose latent weights nothing bounds.

    The trainer shows it once at the start of training (no per-step hook on the hot path);
    ``clip_latent_weights_`` and Bop mark the weights they keep bounded.
    """
    unbounded = [
        m for m in binary_layers(model) if _own_clip(m) is None and not getattr(m.weight, "_bitrain_bounded", False)
    ]
    if not unbounded:
        return None
    return (
        f"note: {len(unbounded)} binary layer(s) train latent weights that nothing bounds (larq's warning); "
        "--clip-latent-weights 1.0 (clip_latent_weights_) or --optimizer bop keeps them in range"
    )
