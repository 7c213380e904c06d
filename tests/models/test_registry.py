"""The registry: each model's architecture options and their defaults are declared once, in its
``@register(..., arch=...)``; every model builds to the parameter count it had before that move."""

from __future__ import annotations

import inspect

import pytest
import torch

from bitrain.models import MODELS, arch_options, build_model, list_models, model_info, register
from bitrain.models.densenet import DenseNetBase
from bitrain.models.resnet_e import ResNetE
from bitrain.names import ARCH_OPTIONS

FLEX = {"densenet_flex": {"block_config": "2,2,2"}, "meliusnet_flex": {"block_config": "2,2,2"}}

# parameters at the default input size, 1000 classes, 3 input channels (flex models: block_config 2,2,2);
# a new model adds its line here
PARAMS = {
    "binary_alexnet": 61_838_248,
    "birealnet18": 11_689_512,
    "densenet28": 5_131_496,
    "densenet37": 8_702_248,
    "densenet45": 13_889_512,
    "densenet_flex": 758_888,
    "dorefanet": 62_384_968,
    "lenet": 2_134_520,
    "meliusnet22": 6_948_392,
    "meliusnet29": 11_332_136,
    "meliusnet42": 26_829_352,
    "meliusnet59": 55_559_144,
    "meliusnet_a": 9_242_792,
    "meliusnet_b": 12_242_984,
    "meliusnet_c": 12_244_072,
    "meliusnet_flex": 1_424_744,
    "quicknet": 13_230_024,
    "quicknet_large": 23_338_184,
    "quicknet_small": 12_652_504,
    "reactnet18": 11_704_424,
    "reactnet_a": 29_343_592,
    "realtobinarynet": 11_986_920,
    "resnet152_v1": 60_192_936,
    "resnet152_v2": 60_185_256,
    "resnet18_e1": 11_689_640,
    "resnet18_e2": 11_687_848,
    "resnet18_v1": 11_689_640,
    "resnet18_v2": 11_687_848,
    "resnet34_e1": 21_797_800,
    "resnet34_e2": 21_796_008,
    "resnet34_v1": 21_797_800,
    "resnet34_v2": 21_796_008,
    "resnet50_e1": 341_832_616,
    "resnet50_e2": 341_824_936,
    "resnet50_v1": 25_557_160,
    "resnet50_v2": 25_549_480,
    "small_reactnet": 1_489_640,
    "small_resnet_e": 1_486_248,
    "tiny_resnet_e": 142_216,
    "xnornet": 62_377_440,
}
# with options given: the user's value replaces the registered default
OVERRIDES = [
    ("densenet28", {"growth_rate": 32, "init_features": 48}, 1_499_512),
    ("densenet_flex", {"block_config": "1,2", "growth_rate": 16}, 98_408),
    ("meliusnet22", {"downsample_structure": "bn,relu,pool,q_conv"}, 6_948_392),
    ("meliusnet22", {"growth_rate": 32}, 2_050_664),
    ("meliusnet_a", {"init_features": 32}, 8_450_056),
    ("resnet18_e1", {"fp_downsample_sc": True, "pool_downsample_sc": True, "downsample_sc_groups": 2}, 11_603_624),
    ("resnet18_e1", {"slices": 2}, 11_689_640),
]


def _params(name: str, **options) -> int:
    with torch.device("meta"):
        model = build_model(name, num_classes=1000, image_size=model_info(name).image_size, **options)
    return sum(p.numel() for p in model.parameters())


def test_every_model_has_its_parameter_count():
    assert sorted(PARAMS) == list_models()
    assert {name: _params(name, **FLEX.get(name, {})) for name in PARAMS} == PARAMS


@pytest.mark.parametrize("name,options,params", OVERRIDES)
def test_options_replace_the_registered_defaults(name, options, params):
    assert _params(name, **options) == params


def test_the_registered_defaults_are_the_defaults():
    for name in ("densenet28", "meliusnet22", "resnet18_e1"):
        given = {k: v for k, v in model_info(name).arch.items()}
        assert _params(name, **given) == PARAMS[name]  # passing the defaults changes nothing
    assert model_info("densenet28").arch["reduction"] == (2.7, 2.7, 2.2)
    assert model_info("meliusnet22").arch["reduction"] == (2.0, 480 / 224, 480 / 256)  # 320->160, 480->224, 480->256
    assert model_info("resnet34_e2").arch == {
        "fp_downsample_sc": False,
        "pool_downsample_sc": False,
        "downsample_sc_groups": 1,
        "slices": 1,
    }


def test_architecture_defaults_are_declared_once():
    """The registry's ``arch`` is the only place: no builder and no family class states a default for an
    architecture option, and the options a model takes are exactly its ``arch`` keys."""
    for name in list_models():
        params = inspect.signature(MODELS[name]).parameters
        stated = [p for p in params if p in ARCH_OPTIONS and params[p].default is not inspect.Parameter.empty]
        assert not stated, (name, stated)
        assert arch_options(name) == tuple(o for o in ARCH_OPTIONS if o in model_info(name).arch)
    for cls in (ResNetE, DenseNetBase):
        params = inspect.signature(cls).parameters
        assert all(params[p].default is inspect.Parameter.empty for p in params if p in ARCH_OPTIONS), cls


def test_register_refuses_an_unknown_architecture_option():
    with pytest.raises(ValueError, match="not architecture options"):
        register("_test_bad", family="test", arch={"depth": 3})
    assert "_test_bad" not in MODELS
