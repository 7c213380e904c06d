"""The engine's load-time module swaps (bitrain/deploy/swaps.py): the same values, other modules."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.deploy.swaps import ChannelsLastMaxPool2d, StemConv2d, channels_last_stem
from bitrain.models import build_model


def test_stem_runs_channels_last_at_inference_with_the_same_values():
    """StemConv2d + ChannelsLastMaxPool2d (swapped in by the engine; the zoo builds plain modules): eval on
    the CPU goes through channels_last and hands NCHW on; same logits."""
    torch.manual_seed(0)
    model = build_model(name="resnet18_e1", num_classes=10, in_channels=3, image_size=64).eval()
    assert type(model.features[1]) is nn.Conv2d and type(model.features[4]) is nn.MaxPool2d  # the zoo: plain
    assert channels_last_stem(model) == 2
    stem_conv, pool = model.features[1], model.features[4]
    assert type(stem_conv) is StemConv2d and type(pool) is ChannelsLastMaxPool2d
    seen = {}
    model.features[2].register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o))
    model.features[4].register_forward_hook(lambda m, i, o: seen.__setitem__("pool", o))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
    assert seen["bn"].is_contiguous(memory_format=torch.channels_last) and not seen["bn"].is_contiguous()
    assert seen["pool"].is_contiguous()  # the rest of the model runs NCHW, as in training
    plain = build_model(name="resnet18_e1", num_classes=10, in_channels=3, image_size=64).eval()
    plain.features[1] = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    plain.features[4] = nn.MaxPool2d(3, 2, 1)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = plain(x)
    assert torch.allclose(got, expected, atol=1e-5) and torch.equal(got.argmax(1), expected.argmax(1))
    # the pool alone is exact, NaN and -inf included
    z = torch.randn(2, 5, 9, 9)
    z[0, 0, 0, 0], z[1, 2, 3, 3] = float("nan"), float("-inf")
    with torch.no_grad():
        assert torch.equal(pool(z).nan_to_num(7.0), F.max_pool2d(z, 3, 2, 1).nan_to_num(7.0))
    # training: the plain path, NCHW out, gradients through
    zg = z.clone().requires_grad_()
    y = pool(stem_conv(torch.randn(2, 3, 16, 16, requires_grad=True)))
    assert y.is_contiguous() and not stem_conv(torch.randn(1, 3, 16, 16)).is_contiguous(
        memory_format=torch.channels_last
    )
    pool(zg).nan_to_num(0.0).sum().backward()
    assert zg.grad is not None and zg.grad.abs().sum() > 0
