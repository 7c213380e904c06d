"""``build_model``: a registered builder inside the binary-layer configuration, then initialisation."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from bitrain.binary.layers import binary_layer_config
from bitrain.errors import UserError
from bitrain.models._registry import arch_options, get_builder
from bitrain.models.common import init_weights, resolve_stem
from bitrain.names import ARCH_FLAGS, ARCH_OPTIONS, INITIALIZATIONS


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    bits: int = 1,
    bits_a: int = 1,
    activation_method: str = "det_sign",
    weight_quantization: str = "det_sign",
    clip_threshold: float = 1.0,
    approximation: str = "",
    initial_layers: str = "imagenet",
    initialization: str = "gaussian",
    **arch: Any,
) -> nn.Module:
    """Build model ``name`` with the given quantization (bits=32, bits_a=32: the full-precision twin).

    ``arch`` holds architecture options (see ARCH_OPTIONS); None (and False for flags) means "not given";
    an option the model does not take raises UserError naming the flag and the model.
    """
    builder = get_builder(name)
    given = {k: v for k, v in arch.items() if v is not None and not (k in ARCH_FLAGS and v is False)}
    accepted = arch_options(name)
    for key in given:
        flag = "--" + key.replace("_", "-")
        if key not in ARCH_OPTIONS:
            raise UserError(
                f"unknown architecture option {flag}; valid: "
                + ", ".join("--" + o.replace("_", "-") for o in ARCH_OPTIONS)
            )
        if key not in accepted:
            takes = ", ".join("--" + o.replace("_", "-") for o in accepted) or "none"
            raise UserError(f"option {flag} does not apply to model {name} (it takes: {takes})")
    for option, value in (("--num-classes", num_classes), ("--in-channels", in_channels), ("--image-size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{option}: expected a positive integer, got {value!r}")
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
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, initial_layers=stem, **given
        )
    init_weights(model, initialization)
    return model
