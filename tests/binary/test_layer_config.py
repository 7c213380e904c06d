"""binary/layer_config.py: the one home of the quantization defaults and their checks (torch-free)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from bitrain.binary import layer_config as LC
from bitrain.binary.layers import QConv2d, get_layer_config
from bitrain.errors import UserError
from bitrain.models import build_model


def test_the_defaults_are_bmxnets_and_build_model_reads_them():
    assert dataclasses.asdict(LC.DEFAULTS) == {
        "bits": 1,
        "bits_a": 1,
        "activation_method": "det_sign",
        "weight_quantization": "det_sign",
        "clip_threshold": 1.0,
        "approximation": "",
        "no_offset": False,
    }
    assert get_layer_config() is LC.DEFAULTS  # outside any block
    params = inspect.signature(build_model).parameters
    for f in dataclasses.fields(LC.LayerConfig):
        if f.name in params:
            assert params[f.name].default == getattr(LC.DEFAULTS, f.name), f.name
    conv = QConv2d(2, 2, 3)
    assert (conv.bits, conv.bits_a, conv.weight_quantization, conv.act.method) == (1, 1, "det_sign", "det_sign")
    assert (conv.act.clip_threshold, conv.approximation) == (1.0, "")


def test_one_rule_for_abc_and_the_approximations():
    for value in ("", "xnor", "binet"):
        assert LC.check_approximation(value) == value
    with pytest.raises(UserError, match=r"--approximation abc is not supported \(ABC-Net"):
        LC.check_approximation("abc")
    with pytest.raises(UserError, match="--approximation abc is not supported"):
        QConv2d(2, 2, 3, approximation="abc")  # the layers use the same rule
    # the same text as the option schema's choices error, so the command line can use this rule for every value
    with pytest.raises(UserError, match="^--approximation 'foo' is not valid; choose from: '', xnor, binet$"):
        LC.check_approximation("foo")
    with pytest.raises(UserError, match=r"^--approximation abc is not supported \(ABC-Net: BMXNet crashes on it\); "):
        LC.check_approximation("abc")


def test_checks_name_the_option():
    assert LC.check_bits(32) == 32 and LC.check_clip(2) == 2.0 and LC.check_name("ste_sign", "x") == "ste_sign"
    with pytest.raises(UserError, match="bits_a=0"):
        LC.check_bits(0, "bits_a")
    with pytest.raises(UserError, match="clip_threshold=-1"):
        LC.check_clip(-1)
    with pytest.raises(UserError, match=r"--weight-quantization \(weight_quantization\) 'x' is unknown"):
        LC.check_name("x", "weight_quantization")
