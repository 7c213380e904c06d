"""QActivation, the input quantizer of every quantized layer, and ``resolve_method``, the rule that turns a
quantizer name into its function for a bit width (BMXNet's ``assure_consistency`` for configured defaults).

``clip_threshold`` is BMXNet's gradient cancel: the gradient is zero where ``|x| > t`` (see ``ste.py``);
a 32-bit ``identity`` activation is the full-precision pass-through (no cancel).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary import quantizers as quant
from bitrain.binary.layer_config import check_clip, check_name, get_layer_config
from bitrain.errors import UserError


def resolve_method(explicit, configured: str, bits: int, kind: str, option: str):
    """(method, fn): an explicit name must fit the bits; a configured default that does not
    fit falls back to the default for the bits (BMXNet's assure_consistency)."""
    if explicit is not None:
        if not isinstance(explicit, str):
            return explicit, quant.get_quantizer(explicit)
        check_name(explicit, option)
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
        self.clip_threshold = check_clip(cfg.clip_threshold if clip_threshold is None else clip_threshold)
        self.method, fn = resolve_method(method, cfg.activation_method, self.bits, "activation", "activation_method")
        # a callable/module method stays in self.method (a module is registered there, so
        # train()/eval() and .to() reach it); a name keeps its resolved function in _fn
        self._named = isinstance(self.method, str)
        self._fn = fn if self._named else None

    @property
    def is_identity(self) -> bool:
        """True when the forward returns x unchanged (32-bit identity)."""
        return self.method == "identity"

    @property
    def plus_minus_one(self) -> bool:
        """True when the output is det_sign's +-1 (0 -> +1), an xnor-popcount input; a callable says so itself."""
        if self._named:
            return self.bits == 1 and quant.QUANTIZERS[self.method].plus_minus_one
        return bool(getattr(self.method, "plus_minus_one", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._named:
            return self._fn(x, self.clip_threshold, self.bits)
        return self.method(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method!r}, clip_threshold={self.clip_threshold}"
