"""``build_model``: a registered builder inside the binary-layer configuration, then initialisation."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from bitrain.binary.layer_config import DEFAULTS, binary_layer_config
from bitrain.errors import UserError
from bitrain.models._registry import get_builder, model_info
from bitrain.models.common import init_weights, resolve_stem
from bitrain.names import ARCH_FLAGS, ARCH_OPTIONS, INITIALIZATIONS, STEMS, flag


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    bits: int = DEFAULTS.bits,
    bits_a: int = DEFAULTS.bits_a,
    activation_method: str = DEFAULTS.activation_method,
    weight_quantization: str = DEFAULTS.weight_quantization,
    clip_threshold: float = DEFAULTS.clip_threshold,
    approximation: str = DEFAULTS.approximation,
    initial_layers: str = STEMS[0],
    initialization: str = INITIALIZATIONS[0],
    **arch: Any,
) -> nn.Module:
    """Build model ``name`` with the given quantization (bits=32, bits_a=32: the full-precision twin).

    ``arch`` holds architecture options (see ARCH_OPTIONS); None (and False for flags) means "not given", so
    the model's own default applies (``model_info(name).arch``); an option the model does not take raises
    UserError naming the flag and the model. The quantization defaults are ``binary.layer_config.DEFAULTS``.
    """
    builder = get_builder(name)
    given = {k: v for k, v in arch.items() if v is not None and not (k in ARCH_FLAGS and v is False)}
    defaults = model_info(name).arch
    for key in given:
        if key not in ARCH_OPTIONS:
            raise UserError(f"unknown architecture option {flag(key)}; valid: " + ", ".join(map(flag, ARCH_OPTIONS)))
        if key not in defaults:
            takes = ", ".join(flag(o) for o in ARCH_OPTIONS if o in defaults) or "none"
            raise UserError(f"option {flag(key)} does not apply to model {name} (it takes: {takes})")
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{flag(key)}: expected a positive integer, got {value!r}")
    if initialization not in INITIALIZATIONS:
        raise UserError(f"--initialization: unknown value {initialization!r}; valid: {', '.join(INITIALIZATIONS)}")
    stem = resolve_stem(initial_layers, image_size)
    with binary_layer_config(
        bits=bits,
        bits_a=bits_a,
        activation_method=activation_method,
        weight_quantization=weight_quantization,
        clip_threshold=clip_threshold,
        approximation=approximation,
    ):
        model = builder(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            initial_layers=stem,
            **{**defaults, **given},
        )
    init_weights(model, initialization)
    return model
