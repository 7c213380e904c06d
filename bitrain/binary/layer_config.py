"""The quantized layers' configuration, torch-free: the defaults (``LayerConfig``), their checks and
``binary_layer_config``, the block whose values every ``QConv2d`` / ``QLinear`` / ``QActivation`` built inside takes.

``LayerConfig()`` is the one home of the quantization defaults (BMXNet's flag values): ``build_model`` and the
command line's option schema read them from here. The checks are the one rule per value (bit widths,
quantizer names, clip threshold, approximation), used by the layers and by the command line alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from bitrain.errors import UserError
from bitrain.names import APPROXIMATIONS, BITS, QUANTIZERS_BY_NAME, flag


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


DEFAULTS = LayerConfig()  # the quantization defaults, for signatures and the option schema
_CONFIG = [DEFAULTS]


def get_layer_config() -> LayerConfig:
    """The layer defaults in effect now (innermost ``binary_layer_config`` block)."""
    return _CONFIG[-1]


def check_bits(bits: int, option: str = "bits") -> int:
    """bits in 1..8 or 32, else UserError naming the option."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise UserError(f"{option}={bits!r} is not supported; use 1..8 or 32 (32 = full precision)")
    return bits


def check_approximation(value: str) -> str:
    """'' | xnor | binet (``names.APPROXIMATIONS``); ``abc`` (ABC-Net) is refused with its reason, anything else
    with the valid values. The one rule for the layers, ``build_model`` and the command line."""
    valid = ", ".join(repr(a) if a == "" else a for a in APPROXIMATIONS)
    if value == "abc":
        raise UserError(f"{flag('approximation')} abc is not supported (ABC-Net: BMXNet crashes on it); use {valid}")
    if value not in APPROXIMATIONS:
        raise UserError(f"{flag('approximation')} {value!r} is not valid; choose from: {valid}")
    return value


def check_clip(value: float) -> float:
    """A clip threshold > 0 (inf: no gradient cancel), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"clip_threshold={value!r} must be a number > 0 (inf = no gradient cancel)")
    return float(value)


def check_name(value, option: str):
    """A quantizer name (or alias) or a callable; an unknown name names the flag and the keyword."""
    if isinstance(value, str) and value not in QUANTIZERS_BY_NAME:
        valid = ", ".join(sorted(QUANTIZERS_BY_NAME))  # the CLI flag and the keyword name both, for either user
        raise UserError(f"{flag(option)} ({option}) {value!r} is unknown; valid: {valid}")
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
    check_bits(cfg.bits, "bits")
    check_bits(cfg.bits_a, "bits_a")
    check_name(cfg.activation_method, "activation_method")
    check_name(cfg.weight_quantization, "weight_quantization")
    check_clip(cfg.clip_threshold)
    check_approximation(cfg.approximation)
    _CONFIG.append(cfg)
    try:
        yield cfg
    finally:
        _CONFIG.pop()
