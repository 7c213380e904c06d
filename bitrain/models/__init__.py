"""Model zoo: a plain name -> builder registry and ``build_model`` (BMXNet v2 / bitorch / larq zoo names).

A builder is a function ``builder(*, num_classes, in_channels, image_size, initial_layers, **arch) -> nn.Module``
that builds with ``QConv2d``/``QLinear`` and leaves the bit widths to the active ``binary_layer_config``.
Other modules add models with ``@register("name", family=..., image_size=...)`` or ``MODELS.update(...)``.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from bitrain.errors import UserError
from bitrain.layers import binary_layer_config
from bitrain.models.common import init_weights, resolve_stem, INITIALIZATIONS

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}

# architecture options (BMXNet flag names with - -> _) that build_model passes through to builders
ARCH_OPTIONS = ("fp_downsample_sc", "pool_downsample_sc", "downsample_sc_groups", "slices", "reduction",
                "growth_rate", "init_features", "downsample_structure", "block_config", "dilated")
_FLAGS = ("fp_downsample_sc", "pool_downsample_sc", "dilated")  # store_true flags: False means "not given"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    image_size: int  # default (published) input size in px


def register(name: str, *, family: str, image_size: int = 224) -> Callable[[Builder], Builder]:
    """Decorator: add ``builder`` to MODELS under ``name`` and record its family and default input size."""

    def deco(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        builder.family = family  # type: ignore[attr-defined]
        builder.default_image_size = image_size  # type: ignore[attr-defined]
        MODELS[name] = builder
        return builder

    return deco


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(MODELS)


def get_builder(name: str) -> Builder:
    """Name -> builder; an unknown name raises UserError with a did-you-mean and the valid names."""
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), MODELS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"--model: unknown model {name!r}{hint}; valid: {', '.join(list_models())}") from None


def model_info(name: str) -> ModelInfo:
    """Family and default input size of a registered model (for the ``bitrain models`` table)."""
    builder = get_builder(name)
    family = getattr(builder, "family", builder.__module__.rsplit(".", 1)[-1])
    return ModelInfo(name, family, getattr(builder, "default_image_size", 224))


def arch_options(name: str) -> tuple[str, ...]:
    """The architecture options (ARCH_OPTIONS) that model ``name`` accepts."""
    params = inspect.signature(get_builder(name)).parameters
    return tuple(o for o in ARCH_OPTIONS if o in params)


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 224, bits: int = 1,
                bits_a: int = 1, activation_method: str = "det_sign", weight_quantization: str = "det_sign",
                clip_threshold: float = 1.0, approximation: str = "", initial_layers: str = "imagenet",
                initialization: str = "gaussian", **arch: Any) -> nn.Module:
    """Build model ``name`` with the given quantization (bits=32, bits_a=32: the full-precision twin).

    ``arch`` holds architecture options (see ARCH_OPTIONS); None (and False for flags) means "not given";
    an option the model does not take raises UserError naming the flag and the model.
    """
    builder = get_builder(name)
    given = {k: v for k, v in arch.items() if v is not None and not (k in _FLAGS and v is False)}
    accepted = arch_options(name)
    for key in given:
        flag = "--" + key.replace("_", "-")
        if key not in ARCH_OPTIONS:
            raise UserError(f"unknown architecture option {flag}; valid: "
                            + ", ".join("--" + o.replace("_", "-") for o in ARCH_OPTIONS))
        if key not in accepted:
            takes = ", ".join("--" + o.replace("_", "-") for o in accepted) or "none"
            raise UserError(f"option {flag} does not apply to model {name} (it takes: {takes})")
    for option, value in (("--num-classes", num_classes), ("--in-channels", in_channels),
                          ("--image-size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{option}: expected a positive integer, got {value!r}")
    if initialization not in INITIALIZATIONS:
        raise UserError(f"--initialization: unknown value {initialization!r}; valid: {', '.join(INITIALIZATIONS)}")
    stem = resolve_stem(initial_layers, image_size)
    with binary_layer_config(bits=bits, bits_a=bits_a, activation_method=activation_method,
                             weight_quantization=weight_quantization, clip_threshold=clip_threshold,
                             approximation=approximation):
        model = builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                        initial_layers=stem, **given)
    init_weights(model, initialization)
    return model


# the families register themselves on import
from bitrain.models import densenet, lenet, meliusnet, quicknet, resnet, resnet_e  # noqa: E402,F401

# the lead's digits default net; registered only where the file exists (errors inside it still surface)
if importlib.util.find_spec("bitrain.models.small") is not None:
    from bitrain.models import small  # noqa: E402

    for _name, _builder in getattr(small, "MODELS", {}).items():
        MODELS.setdefault(_name, _builder)

__all__ = ["MODELS", "ARCH_OPTIONS", "ModelInfo", "register", "list_models", "get_builder", "model_info",
           "arch_options", "build_model"]
