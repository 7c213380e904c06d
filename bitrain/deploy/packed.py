"""Packed 1-bit layers at inference: ``PackedQLayer`` and the choice of its kernel.

``PackedQLayer`` computes a 1-bit QConv2d / QLinear from the export's sign bits (``docs/export.md``).
Two kernels give the same integer dot products, so the same outputs:

- ``numba`` (``bitrain.deploy.conv``, the ``[fast]`` extra): sign and bit-packing fused, a direct
  convolution over 64-bit words with xnor + popcount, compiled; used by ``load_packed`` when numba imports.
- ``torch``: the reference written in torch ops (``unfold``, ``reference.py``'s SWAR popcount), slow but
  dependency-free;
  used when numba is missing (one line on stderr says so, once) or when asked for.

The choice: ``load_packed(..., kernel=...)`` or ``use_kernel(model, ...)``, else the environment
variable ``BITRAIN_KERNEL`` (auto, numba, torch), else auto.

``swaps.fuse_batchnorm`` moves a BatchNorm2d that follows a packed conv into it (``PackedQLayer.norm``), as
torch.ao's ``fuse_modules`` does for conv + bn; numba then applies it in the kernel's epilogue, in the
float32 form that gives torch's BatchNorm bit for bit on every value the layer can output (checked
once per layer, ``epilogue.batchnorm_affine``), else torch's BatchNorm runs after the kernel as before.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary import quantizers as quant
from bitrain.binary.geometry import conv_out_size
from bitrain.deploy.reference import _words, pack_signs, unpack_signs, xnor_dot
from bitrain.deploy.settings import LayerSettings
from bitrain.errors import UserError
from bitrain.names import PACKED_KERNELS

KERNEL_ENV = "BITRAIN_KERNEL"
_NOTED: list[str] = []  # the fallback line is printed once per process


def version(t: torch.Tensor) -> int:
    """t's version counter (it counts in-place changes), or -1 for an inference tensor, which keeps none
    (made under ``torch.inference_mode``: in-place changes of it cannot be seen)."""
    return -1 if t.is_inference() else t._version


# ------------------------------------------------------------------------------------- the kernel


def resolve_kernel(kernel: str | None = None) -> str:
    """``numba`` or ``torch`` for a requested kernel (the argument, else $BITRAIN_KERNEL, else ``auto``).

    ``auto`` is numba when it imports, else the torch reference with one line on stderr (once per process).
    """
    name = kernel if kernel is not None else (os.environ.get(KERNEL_ENV) or "auto")
    what = f"kernel={name!r}" if kernel is not None else f"{KERNEL_ENV}={name}"
    if name not in PACKED_KERNELS:
        raise UserError(f"{what} is not a packed-layer kernel; valid: {', '.join(PACKED_KERNELS)}")
    if name == "torch":
        return "torch"
    from bitrain.deploy import packing  # numba's modules are imported on use

    if packing.available():
        return "numba"
    if name == "numba":
        raise UserError(f"{what}: numba does not import ({packing.IMPORT_ERROR}); pip install 'bitrain[fast]'")
    if not _NOTED:
        _NOTED.append(name)
        print(
            "bitrain: numba is not installed, so packed 1-bit layers run the slow torch reference "
            "(pip install 'bitrain[fast]' for the xnor-popcount kernel)",
            file=sys.stderr,
        )
    return "torch"


def use_kernel(model: nn.Module, kernel: str | None = None) -> str:
    """Set the kernel of every ``PackedQLayer`` in ``model`` (see ``resolve_kernel``); returns the one used."""
    chosen = resolve_kernel(kernel)
    for m in model.modules():
        if isinstance(m, PackedQLayer):
            m.kernel = chosen
    return chosen


# ---------------------------------------------------------------------------------- packed layers


class PackedQLayer(nn.Module):
    """Inference of a 1-bit QConv2d / QLinear from packed weights, with the ``numba`` or ``torch`` kernel.

    With +-1 inputs the dot products come from xnor + popcount on bit-packed operands: numba's direct
    convolution over words (any pad value: -1 in the kernel, another through a border term), or the
    torch reference for -1 padding (``xnor_inputs``: input patches from ``unfold``, a SWAR popcount);
    otherwise the +-1 weights are unpacked and used in a float conv. Then, as
    QConv2d / QLinear's forward: ``h = dot * scale + bias``, ``(h + fan_in) / 2`` where the layer applies
    the offset (plain +-1 weights, no approximation, not ``no_offset``), times the XNOR-Net activation
    scale K for ``approximation == "xnor"``. A plain offset layer gets ``(dot + fan_in) / 2`` from the
    numba kernel directly (an integer either way, so the same float32 value).
    """

    def __init__(self, settings: LayerSettings, act: nn.Module):
        super().__init__()
        self.settings = settings
        shape = settings.shape
        self.out_features, self.fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
        self.is_conv = settings.is_conv
        self.act = act  # the original QActivation: same method and bits
        self.register_buffer("weight_packed", torch.zeros(shape[0], (self.fan_in + 7) // 8, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(shape[0]))
        self.bias = nn.Parameter(torch.zeros(shape[0]), requires_grad=False) if settings.bias else None
        self.kernel = "torch"  # set by load_packed / use_kernel
        record = quant.spec(getattr(act, "method", None))
        # numba takes sign(x) while packing when the activation is exactly that sign
        self.fused_sign = getattr(act, "bits", 0) == 1 and record is not None and record.sign_forward
        # numba takes +-1 inputs with any pad value: -1 in the kernel, another v through a border term
        self.numba_inputs = settings.xnor_inputs or (
            settings.bits_a == 1 and bool(getattr(act, "plus_minus_one", False))
        )
        self._words: tuple[tuple, Any, bool] | None = None  # (key, kernels.pack_weights(...), scaled)
        self._borders: dict[tuple[int, int], torch.Tensor] = {}
        self.norm: nn.BatchNorm2d | None = None  # a following BatchNorm2d, moved in by fuse_batchnorm
        self._affine: tuple[tuple, Any] | None = None  # (key, batchnorm_affine(...) or None)

    def extra_repr(self) -> str:
        s = self.settings
        return f"{s.type} {s.shape} packed, bits_a={s.bits_a}, approximation={s.approximation!r}"

    def _dot_conv(self, xq: torch.Tensor) -> torch.Tensor:
        s = self.settings
        kh, kw = s.kernel_size
        ph, pw = s.padding
        groups, out = s.groups, self.out_features
        if not s.xnor_inputs:  # float/k-bit input: the +-1 weights unpacked, a float conv
            w = unpack_signs(self.weight_packed, self.fan_in).reshape(s.shape)
            xq = F.pad(xq, (pw, pw, ph, ph), value=s.pad_value)
            return F.conv2d(xq, w.to(xq.dtype), None, s.stride, 0, s.dilation, groups)
        n, _, h, wd = xq.shape
        if not torch.all(xq.abs() == 1):
            raise RuntimeError(f"activation {s.activation_method!r} did not give +-1 values")
        bits = F.pad((xq > 0).float(), (pw, pw, ph, ph))  # pad bit 0 = -1, as QConv2d pads with -1
        cols = F.unfold(bits, (kh, kw), dilation=s.dilation, stride=s.stride)  # (n, C*kh*kw, L)
        ho, wo = self._output_size(h, wd)
        ell = cols.shape[-1]
        # (n, groups, L, fan_in) patch bits; unfold orders rows (channel, kh, kw) like the weight
        cols = cols.reshape(n, groups, self.fan_in, ell).permute(1, 0, 3, 2) > 0.5
        x_words = _words(pack_signs(cols))  # (groups, n, L, nw)
        w_words = _words(self.weight_packed).reshape(groups, out // groups, -1)
        dots = [xnor_dot(x_words[g].reshape(n * ell, -1), w_words[g], self.fan_in) for g in range(groups)]
        dot = torch.stack(dots)  # (groups, n*L, out/groups)
        dot = dot.reshape(groups, n, ell, out // groups).permute(1, 0, 3, 2)
        # contiguous NCHW like the float conv's output, so the float layers after it sum in the
        # same order and plain (offset) binary nets give bit-identical logits
        dot = dot.reshape(n, out, ho, wo).contiguous()
        return dot.to(xq.dtype)

    def _output_size(self, h: int, w: int) -> tuple[int, int]:
        """The conv's output height and width for an (h, w) input."""
        s = self.settings
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = s.kernel_size, s.padding, s.stride, s.dilation
        return conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)

    def _dot_linear(self, xq: torch.Tensor) -> torch.Tensor:
        if not self.settings.xnor_inputs:
            w = unpack_signs(self.weight_packed, self.fan_in)
            return F.linear(xq, w.to(xq.dtype))
        if not torch.all(xq.abs() == 1):
            raise RuntimeError(f"activation {self.settings.activation_method!r} did not give +-1 values")
        lead = xq.shape[:-1]
        x_words = _words(pack_signs(xq.reshape(-1, self.fan_in) > 0))
        dot = xnor_dot(x_words, _words(self.weight_packed), self.fan_in)
        return dot.reshape(*lead, self.out_features).to(xq.dtype)

    def _prepared(self) -> tuple[Any, bool]:
        """The weights in the numba kernel's layout and whether the layer scales, for the current buffers."""
        buffers = self._buffers  # the dict itself: a module attribute lookup costs a microsecond a tensor
        key = tuple((t.data_ptr(), version(t)) for t in (buffers["weight_packed"], buffers["weight_scale"]))
        if self._words is None or self._words[0] != key:
            from bitrain.deploy import packing

            s = self.settings
            words = packing.pack_weights(self.weight_packed, s.shape, s.groups)
            scaled = bool(s.approximation) or not bool(torch.all(self.weight_scale == 1))
            self._words, self._borders = (key, words, scaled), {}
        return self._words[1], self._words[2]

    def _border(self, hw: tuple[int, int]) -> torch.Tensor:
        """(1, out, Ho, Wo): the sum of the +-1 weights over the taps that fall on the padding, per output.
        The kernel pads with -1; a pad value v adds (v + 1) times this (integers: exact in float32)."""
        if hw not in self._borders:
            s = self.settings
            (ph, pw), shape = s.padding, s.shape
            mask = torch.ones(1, shape[1] * s.groups, hw[0] + 2 * ph, hw[1] + 2 * pw)
            mask[:, :, ph : ph + hw[0], pw : pw + hw[1]] = 0.0
            w = unpack_signs(self.weight_packed, self.fan_in).reshape(shape)
            self._borders[hw] = F.conv2d(mask, w, None, s.stride, 0, s.dilation, s.groups)
        return self._borders[hw]

    def _epilogue_norm(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int] | None:
        """``self.norm`` as the kernel's (alpha, beta, form) for a plain conv's counts, or None: no norm,
        training mode, not a float32 input, a 1x1 output map (torch's BatchNorm takes another path there),
        or no float32 form matched torch's BatchNorm on every count (``batchnorm_affine``)."""
        norm = self.norm
        if norm is None or norm.training or type(norm) is not nn.BatchNorm2d or norm.running_var is None:
            return None
        ho, wo = self._output_size(*x.shape[-2:])
        if x.dtype != torch.float32 or ho * wo <= 1:
            return None
        b, p = norm._buffers, norm._parameters  # the dicts: the key is computed on every call
        tensors = (b["running_mean"], b["running_var"], p.get("weight"), p.get("bias"))
        key = tuple((t.data_ptr(), version(t)) for t in tensors if t is not None) + (norm.eps,)
        if self._affine is None or self._affine[0] != key:
            from bitrain.deploy.epilogue import batchnorm_affine

            self._affine = (key, batchnorm_affine(norm, self.fan_in))
        return self._affine[1]

    def _normed(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.norm is None else self.norm(h)

    def _dot_numba(self, x: torch.Tensor, words: Any, count: bool, affine: Any = None) -> torch.Tensor:
        from bitrain.deploy import conv as kernels

        s = self.settings
        if not self.fused_sign:  # another +-1 activation: run it, then pack its signs
            x = self.act(x)
            if not torch.all(x.abs() == 1):
                raise RuntimeError(f"activation {s.activation_method!r} did not give +-1 values")
        if not self.is_conv:
            lead = x.shape[:-1]
            h = kernels.xnor_conv(x.reshape(-1, self.fan_in, 1, 1), words, fan_in=self.fan_in, count=count)
            return h.reshape(*lead, self.out_features).to(x.dtype)
        geometry = dict(stride=s.stride, padding=s.padding, dilation=s.dilation)
        kernel_size = s.kernel_size
        h = kernels.xnor_conv(
            x, words, kernel_size=kernel_size, fan_in=self.fan_in, count=count, affine=affine, **geometry
        )
        return h.to(x.dtype)

    def _plain(self, words_scaled: tuple[Any, bool]) -> tuple[bool, bool]:
        """(plain, border) for numba: plain = the output is the kernel's count of agreeing bits (offset, no
        bias, no scale, -1 padding); border = a pad value other than -1 that needs ``_border``'s term."""
        s = self.settings
        border = self.is_conv and s.pad_value != -1.0 and any(s.padding)
        return bool(s.offset and self.bias is None and not words_scaled[1] and not border), border

    def unit_plan(self, x: torch.Tensor) -> tuple[Any, tuple[np.ndarray, np.ndarray, int]] | None:
        """(kernel words, epilogue affine) when this conv can run inside a fused residual unit on x
        (``fused.PackedResidual``): numba, sign fused into the packing, groups 1, a plain count with its
        BatchNorm in the epilogue; else None."""
        if not (self.kernel == "numba" and self.is_conv and self.fused_sign and self.numba_inputs):
            return None
        if x.device.type != "cpu" or self.settings.groups != 1:
            return None
        prepared = self._prepared()
        affine = self._epilogue_norm(x) if self._plain(prepared)[0] else None
        return None if affine is None else (prepared[0], affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if self.kernel == "numba" and self.numba_inputs and x.device.type == "cpu":
            words, scaled = self._prepared()
            pad = s.pad_value
            plain, border = self._plain((words, scaled))
            affine = self._epilogue_norm(x) if plain and self.is_conv else None
            h = self._dot_numba(x, words, count=plain, affine=affine)
            if plain:  # the kernel's count of agreeing bits is (dot + fan_in) / 2
                return h if affine is not None else self._normed(h)
            if border:
                h = h + (pad + 1.0) * self._border(tuple(x.shape[-2:]))
        else:
            xq = self.act(x)
            h = self._dot_conv(xq) if self.is_conv else self._dot_linear(xq)
            scaled = bool(s.approximation) or not torch.all(self.weight_scale == 1)
        view = (1, -1, 1, 1) if self.is_conv else (-1,)
        if scaled:  # binet / xnor scale by mean|W|, or a magnitude-aware quantizer's
            h = h * self.weight_scale.reshape(view)
        if self.bias is not None:
            h = h + self.bias.reshape(view)
        if s.offset:
            h = (h + self.fan_in) / 2  # +-1 dot -> number of agreeing bits
        if s.approximation == "xnor":
            h = h * _xnor_k(x, s, self.is_conv)
        return self._normed(h)


def _xnor_k(x: torch.Tensor, s: LayerSettings, is_conv: bool) -> torch.Tensor:
    """XNOR-Net activation scale: mean |x| over channels, box-filtered over each window (zero pad)."""
    if not is_conv:
        return x.abs().mean(-1, keepdim=True)
    kh, kw = s.kernel_size
    box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype, device=x.device)
    return F.conv2d(x.abs().mean(1, keepdim=True), box, None, s.stride, s.padding, s.dilation)
