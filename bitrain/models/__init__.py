"""Model zoo (BMXNet v2 / bitorch / larq zoo names): ``build_model(name, ...)`` and the registry.

The registry (``_registry``) knows nothing of the families; each family module registers its
builders on import, and importing this package imports them all.
"""

from __future__ import annotations

from bitrain.models import (  # noqa: F401  (register)
    alexnet,
    birealnet,
    densenet,
    lenet,
    meliusnet,
    quicknet,
    reactnet,
    realtobinary,
    resnet,
    resnet_e,
    small,
)
from bitrain.models._factory import build_model
from bitrain.models._registry import (
    MODELS,
    ModelInfo,
    arch_options,
    get_builder,
    list_models,
    model_info,
    register,
)
from bitrain.names import ARCH_OPTIONS

__all__ = [
    "MODELS",
    "ARCH_OPTIONS",
    "ModelInfo",
    "register",
    "list_models",
    "get_builder",
    "model_info",
    "arch_options",
    "build_model",
]
