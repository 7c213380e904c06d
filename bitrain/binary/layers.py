"""Quantized layers: QActivation, QConv2d, QLinear, the scaling approximations and the layer config.

BMXNet v2 semantics (``gluon/nn/binary_layers.py``), re-done as plain nn.Conv2d / nn.Linear
subclasses whose forward is: quantize input -> pad -> conv (or linear).

* Padding: a 1-bit input with a +-1 quantizer is padded with -1 (not 0), so the padded input
  stays binary and equals what an xnor-popcount kernel sees; other inputs are padded with 0.
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

Latent weights: a binary weight quantizer passes a gradient to latent float weights that
nothing bounds (larq's warning). Call ``clip_latent_weights_(model)`` after each
``optimizer.step()`` (or train with Bop, which keeps them at +-1). The Trainer checks this once,
at the start of training (``latent_weight_warning``): no hook runs on the hot path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary import quantizers as quant
from bitrain.errors import UserError
from bitrain.names import APPROXIMATIONS


@dataclass(frozen=True)
class LayerConfig:
    """Defaults for quantized layers built inside ``binary_layer_config`` (BMXNet flag values)."""

    bits: int = 1
    bits_a: int = 1
    activation_method: str = "det_sign"
    weight_quantization: str = "det_sign"
    clip_threshold: float = 1.0
    approximation: str = ""
    no_offset: bool = False


_CONFIG = [LayerConfig()]


def get_layer_config() -> LayerConfig:
    """The layer defaults in effect now (innermost ``binary_layer_config`` block)."""
    return _CONFIG[-1]


def _check_approximation(value: str) -> str:
    if value == "abc":
        raise UserError("approximation 'abc' (ABC-Net) is not supported; use '', 'binet' or 'xnor'")
    if value not in APPROXIMATIONS:
        raise UserError(f"approximation {value!r} is not valid; use '', 'binet' or 'xnor'")
    return value


def _check_clip(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"clip_threshold={value!r} must be a number > 0 (inf = no gradient cancel)")
    return float(value)


def _check_name(value, option: str):
    if isinstance(value, str) and value not in quant.ALL_NAMES:
        flag = "--" + option.replace("_", "-")  # the CLI flag and the keyword name both, for either user
        raise UserError(f"{flag} ({option}) {value!r} is unknown; valid: {', '.join(sorted(quant.ALL_NAMES))}")
    return value


@contextlib.contextmanager
def binary_layer_config(**overrides) -> Iterator[LayerConfig]:
    """Layers built inside the block take these defaults (BMXNet set_binary_layer_config).

    A value of None keeps the current one. Values are validated here, so a bad flag fails
    before any model is built.
    """
    fields = {f.name for f in dataclasses.fields(LayerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"binary_layer_config: unknown option(s) {unknown}; valid: {', '.join(sorted(fields))}")
    cfg = dataclasses.replace(get_layer_config(), **{k: v for k, v in overrides.items() if v is not None})
    quant.check_bits(cfg.bits, "bits")
    quant.check_bits(cfg.bits_a, "bits_a")
    _check_name(cfg.activation_method, "activation_method")
    _check_name(cfg.weight_quantization, "weight_quantization")
    _check_clip(cfg.clip_threshold)
    _check_approximation(cfg.approximation)
    _CONFIG.append(cfg)
    try:
        yield cfg
    finally:
        _CONFIG.pop()


def _resolve(explicit, configured: str, bits: int, kind: str, option: str):
    """(method, fn): an explicit name must fit the bits; a configured default that does not
    fit falls back to the default for the bits (BMXNet's assure_consistency)."""
    if explicit is not None:
        if not isinstance(explicit, str):
            return explicit, quant.get_quantizer(explicit)
        _check_name(explicit, option)
        if explicit not in quant.valid_methods(bits, kind):
            raise UserError(
                f"{option} {explicit!r} does not fit {bits}-bit {kind}s; "
                f"valid: {', '.join(quant.valid_methods(bits, kind))}"
            )
        return explicit, quant.get_quantizer(explicit, bits, kind)
    method = configured if configured in quant.valid_methods(bits, kind) else quant.default_method(bits, kind)
    return method, quant.get_quantizer(method, bits, kind)


class QActivation(nn.Module):
    """Input quantizer: gradient cancel at ``clip_threshold``, then quantize to ``bits`` bits.

    ``method`` is a registry name (see ``bitrain.binary.quantizers``) or a callable/module taking x.
    """

    def __init__(self, bits: int | None = None, clip_threshold: float | None = None, method=None):
        super().__init__()
        cfg = get_layer_config()
        self.bits = quant.check_bits(cfg.bits_a if bits is None else bits, "bits_a")
        self.clip_threshold = _check_clip(cfg.clip_threshold if clip_threshold is None else clip_threshold)
        self.method, fn = _resolve(method, cfg.activation_method, self.bits, "activation", "activation_method")
        # a callable/module method stays in self.method (a module is registered there, so
        # train()/eval() and .to() reach it); a name keeps its resolved function in _fn
        self._named = isinstance(self.method, str)
        self._fn = fn if self._named else None

    @property
    def is_identity(self) -> bool:
        """True when the forward returns x unchanged (32-bit identity)."""
        return self.method == "identity"

    @property
    def pad_value(self) -> float:
        """Value a following conv pads with: -1 for +-1 outputs (binary stays binary), else 0."""
        if self._named:
            return -1.0 if self.bits == 1 and quant.QUANTIZERS[self.method].plus_minus_one else 0.0
        return float(getattr(self.method, "pad_value", -1.0 if self.bits == 1 else 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._named:
            return self._fn(x, self.clip_threshold, self.bits)
        return self.method(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method!r}, clip_threshold={self.clip_threshold}"


def _setup(
    layer: nn.Module,
    bits,
    bits_a,
    weight_quantization,
    activation_method,
    clip_threshold,
    approximation,
    no_offset,
    fan_in: int,
) -> None:
    """Shared attribute setup of QConv2d and QLinear (plain function, not a mixin)."""
    cfg = get_layer_config()
    layer.bits = quant.check_bits(cfg.bits if bits is None else bits, "bits")
    layer.bits_a = quant.check_bits(cfg.bits_a if bits_a is None else bits_a, "bits_a")
    layer.approximation = _check_approximation(cfg.approximation if approximation is None else approximation)
    layer.no_offset = bool(cfg.no_offset if no_offset is None else no_offset)
    layer.weight_quantization, wq = _resolve(
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


def _out_size(hw, conv: nn.Conv2d) -> int:
    # spatial output positions of a QConv2d (padding qpadding) on an hw input
    out = 1
    for size, p, k, s, d in zip(hw, conv.qpadding, conv.kernel_size, conv.stride, conv.dilation):
        out *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return out


def _offset_args(layer: nn.Module, w: torch.Tensor, bias: torch.Tensor | None):
    """(dot + fan_in) / 2 as one linear: weights halved (exact for +-1) and fan_in / 2 as bias."""
    b = w.new_full((w.shape[0],), layer.fan_in / 2.0)
    return w * 0.5, (b if bias is None else b + bias * 0.5)


class QConv2d(nn.Conv2d):
    """nn.Conv2d whose forward quantizes the input (bits_a) and the weight (bits), BMXNet QConv2D.

    ``padding`` is applied by the layer with the activation's pad value (``qpadding``, (h, w));
    the parent's ``padding`` attribute is (0, 0). State dict keys: ``weight`` [, ``bias``].
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
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        if isinstance(padding, str):
            raise UserError(f"QConv2d: padding={padding!r}; give an int or (h, w) pair")
        self.qpadding = (padding, padding) if isinstance(padding, int) else tuple(padding)
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
            fan_in=in_channels // groups * kh * kw,
        )

    def quantized_weight(self) -> torch.Tensor:
        """The weight as used in forward: quantized and scaled (binet/xnor); the offset's 1/2 excluded."""
        return _quantized_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_precision:  # exactly nn.Conv2d (zero padding inside the conv kernel)
            return F.conv2d(x, self.weight, self.bias, self.stride, self.qpadding, self.dilation, self.groups)
        x_real = x
        x = self.act(x)
        # (dot + fan_in) / 2: halve whichever is smaller, the weights or the output
        n_out = x.shape[0] * self.out_channels * _out_size(x.shape[-2:], self)
        half_w = self.apply_offset and self.weight.numel() <= n_out
        w = _forward_weight(self, 0.5 if half_w else 1.0)
        b = self.bias
        if half_w:
            half_fan_in = w.new_full((self.out_channels,), self.fan_in / 2.0)
            b = half_fan_in if b is None else half_fan_in + b * 0.5
        # The conv pads with zeros inside its kernel (a pre-padded input makes oneDNN much
        # slower on small maps); the border's pad value enters as a separate tiny term.
        y = F.conv2d(x, w, b, self.stride, self.qpadding, self.dilation, self.groups)
        pad_value = self.act.pad_value
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
        ho = (h + 2 * ph - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        return (w.sum(1).flatten(1) @ cols).view(1, w.shape[0], ho, -1)

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
            f"offset={self.apply_offset}"
        )


class QLinear(nn.Linear):
    """nn.Linear whose forward quantizes the input (bits_a) and the weight (bits).

    Same offset and approximation rules as QConv2d with fan_in = in_features; ``xnor``'s K is
    mean|x| over the features of each sample.
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
    ):
        super().__init__(in_features, out_features, bias)
        _setup(
            self,
            bits,
            bits_a,
            weight_quantization,
            activation_method,
            clip_threshold,
            approximation,
            no_offset,
            fan_in=in_features,
        )

    def quantized_weight(self) -> torch.Tensor:
        """The weight as used in forward: quantized and scaled (binet/xnor); the offset's 1/2 excluded."""
        return _quantized_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_precision:
            return F.linear(x, self.weight, self.bias)
        x_real = x
        x = self.act(x)
        w, b = self.quantized_weight(), self.bias
        if self.apply_offset:
            w, b = _offset_args(self, w, b)
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


@torch.no_grad()
def clip_latent_weights_(model: nn.Module, bound: float = 1.0) -> int:
    """Clamp the latent weights of 1-bit layers to [-bound, bound] in place; returns how many.

    Call after every ``optimizer.step()``: with a straight-through sign the gradient keeps
    pushing latent weights that are already past the sign, and without a bound they grow
    until a sign flip needs many steps (larq's warning).
    """
    if not bound > 0 or math.isinf(bound):
        raise UserError(f"clip_latent_weights_: bound={bound!r} must be a finite number > 0")
    layers = binary_layers(model)
    for m in layers:
        m.weight.clamp_(-bound, bound)
        m.weight._bitrain_bounded = True
    return len(layers)


def latent_weight_warning(model: nn.Module) -> str | None:
    """larq's warning as text, or None: 1-bit layers whose latent weights nothing bounds.

    The trainer shows it once at the start of training (no per-step hook on the hot path);
    ``clip_latent_weights_`` and Bop mark the weights they keep bounded.
    """
    unbounded = [m for m in binary_layers(model) if not getattr(m.weight, "_bitrain_bounded", False)]
    if not unbounded:
        return None
    return (
        f"note: {len(unbounded)} binary layer(s) train latent weights that nothing bounds (larq's warning); "
        "--clip-latent-weights 1.0 (clip_latent_weights_) or --optimizer bop keeps them in range"
    )
