"""The model registry: a plain name -> builder dict (timm's ``_registry``), apart from the families.

A builder is a function ``builder(*, num_classes, in_channels, image_size, initial_layers, **arch) -> nn.Module``
that builds with ``QConv2d``/``QLinear`` and leaves the bit widths to the active ``binary_layer_config``.
Each family module registers its builders with ``@register("name", family=..., image_size=...)``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from bitrain.errors import UserError
from bitrain.names import ARCH_OPTIONS

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


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
