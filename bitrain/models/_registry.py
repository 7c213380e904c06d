"""The model registry: a plain name -> builder dict (timm's ``_registry``), apart from the families.

A builder is a function ``builder(*, num_classes, in_channels, image_size, initial_layers, **arch) -> nn.Module``
that builds with ``QConv2d``/``QLinear`` and leaves the bit widths to the active ``binary_layer_config``.
Each family module registers its builders with ``@register("name", family=..., image_size=..., arch=...)``:
``arch`` holds the architecture options (``names.ARCH_OPTIONS``) the model takes with their default values,
stated there once; ``build_model`` hands the builder every one of them, the user's value or the default.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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
    arch: Mapping[str, Any] = field(default_factory=dict)  # the architecture options it takes -> their defaults


_INFO: dict[str, ModelInfo] = {}


def register(
    name: str, *, family: str, image_size: int = 224, arch: Mapping[str, Any] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator: add ``builder`` to MODELS under ``name`` with its family, default input size and ``arch``,
    the architecture options it takes and their defaults (keys from ``names.ARCH_OPTIONS``)."""
    arch = dict(arch or {})
    unknown = sorted(set(arch) - set(ARCH_OPTIONS))
    if unknown:
        raise ValueError(f"model {name!r}: {unknown} are not architecture options (bitrain.names.ARCH_OPTIONS)")

    def deco(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = builder
        _INFO[name] = ModelInfo(name, family, image_size, MappingProxyType(arch))
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
    """Family, default input size and architecture defaults of a registered model (``bitrain models``)."""
    builder = get_builder(name)
    return _INFO.get(name) or ModelInfo(name, builder.__module__.rsplit(".", 1)[-1], 224)


def arch_options(name: str) -> tuple[str, ...]:
    """The architecture options (ARCH_OPTIONS) that model ``name`` accepts."""
    arch = model_info(name).arch
    return tuple(o for o in ARCH_OPTIONS if o in arch)
