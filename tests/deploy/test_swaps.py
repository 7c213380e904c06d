"""The engine's load-time module swaps (bitrain/deploy/swaps.py): the same values, other modules."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.deploy.swaps import (
    ChannelsLastMaxPool2d,
    StemBatchNorm2d,
    StemConv2d,
    StemReLU,
    channels_last_stem,
)
from bitrain.models import build_model


def test_stem_runs_channels_last_at_inference_with_the_same_values():
    """StemConv2d + ChannelsLastMaxPool2d (swapped in by the engine; the zoo builds plain modules): eval on
    the CPU goes through channels_last and hands NCHW on; same logits."""
    torch.manual_seed(0)
    model = build_model(name="resnet18_e1", num_classes=10, in_channels=3, image_size=64).eval()
    assert type(model.features[1]) is nn.Conv2d and type(model.features[4]) is nn.MaxPool2d  # the zoo: plain
    assert channels_last_stem(model) == 4  # conv and pool; the BatchNorm and ReLU of a pool-first stem
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


def _stem_by_hand(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The ImageNet stem module by module in channels_last, as the engine ran it before pooling first."""
    y = F.conv2d(x.contiguous(memory_format=torch.channels_last), conv.weight, conv.bias, conv.stride, conv.padding)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.max_pool2d(torch.relu(y), 3, 2, 1)


@pytest.mark.parametrize("bias", [False, True])
def test_the_imagenet_stem_pools_first_with_the_same_bits(bias):
    """conv -> BatchNorm -> ReLU -> max-pool at inference: pooled first (the BatchNorm and ReLU on the 4x
    smaller map, negative-weight channels through their minima) and bit-identical to the module order, for
    BatchNorm weights of both signs and zero, odd sizes, batch 1 and more; training and train() mode keep
    the module order; the state_dict is unchanged and plain() gives the zoo's modules back."""
    torch.manual_seed(1)
    model = build_model(name="resnet18_e1", num_classes=10, in_channels=3, image_size=64).eval()
    conv, bn, relu, pool = model.features[1:5]
    if bias:
        conv.bias = nn.Parameter(torch.randn(64) * 0.1)
    keys = list(model.state_dict())
    with torch.no_grad():
        bn.weight.copy_(torch.randn(64))  # about half the channels negative
        bn.weight[:3] = 0.0
        bn.bias.copy_(torch.randn(64) * 0.5)
        bn.running_mean.copy_(torch.randn(64) * 0.2)
        bn.running_var.copy_(torch.rand(64) + 0.5)
    assert channels_last_stem(model) == 4
    assert [type(m) for m in model.features[1:5]] == [StemConv2d, StemBatchNorm2d, StemReLU, ChannelsLastMaxPool2d]
    assert list(model.state_dict()) == keys
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.shape))
    for shape in [(1, 3, 64, 64), (3, 3, 61, 57)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got = model.features[:5](x)
            expected = _stem_by_hand(conv, bn, model.features[0](x))  # features[0]: the input's BatchNorm
        assert torch.equal(got, expected), shape
        assert got.is_contiguous() and seen["bn"][-1] == shape[-1] // 2 + shape[-1] % 2  # BN saw the conv's map
        with torch.inference_mode():
            assert torch.equal(model.features[:5](x), got)
    # one model, two threads: a forward in another thread between this one's conv and pool changes nothing
    x, other = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 32, 32)

    @torch.no_grad()  # grad mode is per thread
    def forward_other():
        seen["other"] = model.features[:5](other)

    with torch.no_grad():
        h = conv(model.features[0](x))
        worker = threading.Thread(target=forward_other)
        worker.start()
        worker.join()
        got = pool(relu(bn(h)))
        assert torch.equal(got, _stem_by_hand(conv, bn, model.features[0](x)))
        assert torch.equal(seen["other"], _stem_by_hand(conv, bn, model.features[0](other)))
        # copies (the ONNX export's deepcopy, pickle) carry a plan of their own
        twin = copy.deepcopy(model)
        assert twin.features[1].pool_first is not conv.pool_first and twin.features[1].pool_first.bn is twin.features[2]
        assert torch.equal(twin.features[:5](x), got)
        twin.features[2]._forward_hooks.clear()  # the test's lambda hook does not pickle
        assert torch.equal(pickle.loads(pickle.dumps(twin)).features[:5](x), got)
    # a gradient asked: the module order, with gradients to the conv
    x = torch.randn(2, 3, 32, 32)
    out = model.features[:5](x)
    assert out.requires_grad and torch.allclose(out, _stem_by_hand(conv, bn, model.features[0](x)), atol=1e-5)
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # train(): BatchNorm on batch statistics, so no pooling first
    model.train()
    with torch.no_grad():
        y = model.features[:5](x)
        z = F.conv2d(model.features[0](x), conv.weight, conv.bias, 2, 3)
        ref = F.max_pool2d(torch.relu(F.batch_norm(z, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)), 3, 2, 1)
    assert torch.allclose(y, ref, atol=1e-5)
    # the zoo's modules back: plain order, the same values to rounding
    model.eval()
    from bitrain.deploy.swaps import plain

    plain(model)
    assert [type(m) for m in model.features[1:5]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    with torch.no_grad():
        assert torch.allclose(model.features[:5](x), _stem_by_hand(conv, bn, model.features[0](x)), atol=1e-5)
