"""Fused residual units of packed models (bitrain/deploy/fused.py, conv.xnor_conv's unit arguments):
the same bits as the float model's conv + BatchNorm + shortcut, and the packed signs handed on."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_kernels import _calibrated, _sign  # the same helpers as the single-layer kernel tests

from bitrain.deploy import conv, packing
from bitrain.deploy.epilogue import batchnorm_affine
from bitrain.deploy.export import export_packed
from bitrain.deploy.fused import PackedResidual
from bitrain.deploy.load import load_packed
from bitrain.deploy.packed import PackedQLayer, use_kernel
from bitrain.deploy.reference import pack_signs
from bitrain.deploy.swaps import channels_last_stem, fuse_batchnorm
from bitrain.models import build_model

pytestmark = pytest.mark.skipif(not packing.available(), reason=f"numba is not installed ({packing.IMPORT_ERROR})")


def _norm(c: int, fan_in: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.copy_(fan_in / 2 + torch.randn(c, generator=g) * fan_in**0.5 / 4)
        bn.running_var.copy_(fan_in / 4 * (0.5 + torch.rand(c, generator=g)))
        bn.weight.copy_(torch.randn(c, generator=g))  # some scales negative
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _counts(x: torch.Tensor, weight: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    """QConv2d's plain output: (dot + fan_in) / 2 of the -1 padded signs."""
    dot = F.conv2d(F.pad(_sign(x), (pad,) * 4, value=-1.0), _sign(weight), None, stride)
    return (dot + weight[0].numel()) / 2


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize("seed", range(24))
def test_unit_extras_equal_conv_batchnorm_shortcut_bit_for_bit(seed):
    """Random geometries: residual + x, a 1x1 shortcut in the same pass, a torch-made residual, each with
    and without the packed output; zeros, -0.0 and a NaN in the input; rows with 8x8 remainders."""
    rnd, g = random.Random(seed), torch.Generator().manual_seed(seed)
    n, c = rnd.choice([1, 2, 3]), rnd.choice([8, 40, 64, 72, 128])
    stride = rnd.choice([1, 2])
    h, w = rnd.randint(3, 13), rnd.randint(3, 21)
    o = c if stride == 1 and rnd.random() < 0.5 else rnd.choice([8, 16, 64, 96])
    x = torch.randn(n, c, h, w, generator=g)
    x.view(-1)[::9] = 0.0
    x.view(-1)[4::13] = -0.0
    x.view(-1)[5] = float("nan")
    weight = torch.randn(o, c, 3, 3, generator=g)
    words = packing.pack_weights(pack_signs((weight >= 0).reshape(o, -1)), [o, c, 3, 3])
    bn = _norm(o, c * 9, g)
    affine = batchnorm_affine(bn, c * 9)
    assert affine is not None
    with torch.no_grad():
        main = bn(_counts(x, weight, stride, 1))
    geometry = dict(kernel_size=(3, 3), stride=(stride, stride), padding=(1, 1), fan_in=c * 9, count=True)
    cases = {}
    if o == c and stride == 1:
        cases["+ x"] = ({"residual": x}, main + x)
        cases["+ x, channels_last"] = ({"residual": x.contiguous(memory_format=torch.channels_last)}, main + x)
    w1 = torch.randn(o, c, 1, 1, generator=g)
    bn1 = _norm(o, c, g)
    with torch.no_grad():
        side = bn1(_counts(x, w1, stride, 0))
    if side.shape == main.shape:
        a1 = batchnorm_affine(bn1, c)
        words1 = packing.pack_weights(pack_signs((w1 >= 0).reshape(o, -1)), [o, c, 1, 1])
        sc = conv.Shortcut(words1, 1, 1, c, a1[2], a1[0], a1[1])
        cases["1x1 shortcut"] = ({"shortcut": sc}, main + side)
        cases["torch residual"] = ({"residual": side}, main + side)
    assert cases
    packed = packing.pack_activations(x, (1, 1))
    for what, (extra, want) in cases.items():
        for pack_out in (None, (1, 1), (0, 2)):
            got = conv.xnor_conv(x, words, affine=affine, packed=packed, pack_out=pack_out, **geometry, **extra)
            if pack_out is not None:
                got, signs = got
                assert signs.dtype.name == "uint64"
                assert (signs == packing.pack_activations(want, pack_out)).all(), (what, pack_out)
            assert got.shape == want.shape and torch.equal(_bits(got), _bits(want)), (what, pack_out)
    # without the packed input given, the kernel packs x itself: the same values
    extra, want = next(iter(cases.values()))
    assert torch.equal(_bits(conv.xnor_conv(x, words, affine=affine, **geometry, **extra)), _bits(want))


@pytest.mark.parametrize("c", [8, 40, 64, 72, 128, 200])
def test_channels_last_input_packs_as_nchw(c):
    """A channels_last tensor is packed where it lies (64 channels per compare), with the same words."""
    g = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, 5, 7, generator=g)
    x.view(-1)[::5] = -0.0
    x.view(-1)[3] = float("nan")
    x.view(-1)[4] = 0.0
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    assert (packing.pack_activations(cl, (1, 2)) == packing.pack_activations(x, (1, 2))).all()


def test_unit_arguments_are_checked():
    x = torch.randn(1, 16, 5, 5)
    weight = torch.randn(16, 8, 3, 3)
    grouped = packing.pack_weights(pack_signs((weight >= 0).reshape(16, -1)), [16, 8, 3, 3], 2)
    geometry = dict(kernel_size=(3, 3), padding=(1, 1), fan_in=72, count=True)
    with pytest.raises(ValueError, match="groups 1"):
        conv.xnor_conv(x, grouped, residual=x, **geometry)
    words = packing.pack_weights(pack_signs(torch.randn(12, 144) >= 0), [12, 16, 3, 3])
    with pytest.raises(ValueError, match="residual"):
        conv.xnor_conv(x, words, residual=x, kernel_size=(3, 3), padding=(1, 1), fan_in=144, count=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        conv.xnor_conv(x, words, pack_out=(1, 1), kernel_size=(3, 3), padding=(1, 1), fan_in=144, count=True)


def _spy(monkeypatch) -> list[dict]:
    """Record the unit arguments of every kernel call (conv.run: xnor_conv's and the fused units')."""
    calls: list[dict] = []
    real = conv.run

    def spy(call, x, packed=None, residual=None):
        calls.append(dict(packed=packed is not None, residual=residual is not None))
        calls[-1].update(shortcut=call.shortcut is not None, pack_out=call.pack_out is not None)
        calls[-1]["channels_last"] = not x.is_contiguous()
        return real(call, x, packed, residual)

    monkeypatch.setattr(conv, "run", spy)
    return calls


VARIANTS = {  # resnet18_e1 options -> (fused units, shortcuts in the kernel, torch shortcuts)
    "binary downsample": ({}, 16, 3, 0),
    "published: pooled float downsample": ({"fp_downsample_sc": True, "pool_downsample_sc": True}, 16, 0, 3),
    "sliced: only the downsampling blocks": ({"slices": 2}, 3, 3, 0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resnet_e_units_are_fused_and_bit_identical(tmp_path, monkeypatch, variant):
    opts, n_units, in_kernel, in_torch = VARIANTS[variant]
    chained = "slices" not in opts
    args = dict(name="resnet18_e1", num_classes=10, in_channels=3, image_size=64, **opts)
    torch.manual_seed(21)
    model = build_model(**args)
    channels_last_stem(model)  # the float model as the engine runs it: its stem through channels_last
    model = _calibrated(model, (3, 64, 64), seed=22)
    export_packed(model, tmp_path / "m.safetensors", model_args=args)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        expected = model(x)
    fused = load_packed(tmp_path / "m.safetensors", build_model, kernel="numba")
    units = [m for m in fused.modules() if isinstance(m, PackedResidual)]
    assert len(units) == n_units
    # the same state_dict as the model with only its BatchNorms fused
    only_bn = load_packed(tmp_path / "m.safetensors", build_model, kernel="numba", fuse_bn=False)
    fuse_batchnorm(only_bn)
    assert fused.state_dict().keys() == only_bn.state_dict().keys()
    # the stem's max-pool hands the first unit channels_last (only a BatchNorm between); the float model's does not
    # (sliced: the first unit comes later, after blocks that are not units)
    assert fused.features[4].channels_last_out == chained and not model.features[4].channels_last_out
    calls = _spy(monkeypatch)
    with torch.no_grad():
        got = fused(x)
    assert torch.equal(got, expected), (got - expected).abs().max()
    if n_units:
        unit_calls = [c for c in calls if c["residual"] or c["shortcut"]]
        assert len(unit_calls) == n_units
        assert sum(c["shortcut"] for c in unit_calls) == in_kernel
        assert sum(c["residual"] for c in unit_calls) == n_units - in_kernel  # + x, or torch's shortcut
        # each unit after the first takes its input packed by the one before; the last packs nothing
        assert [c["packed"] for c in unit_calls] == [False] + [chained] * (n_units - 1)
        assert [c["pack_out"] for c in unit_calls] == [True] * (n_units - 1) + [False]
        # the first unit reads the channels_last input as it lies (but a torch shortcut gets NCHW)
        assert [c["channels_last"] for c in unit_calls] == [chained] + [False] * (n_units - 1)
        calls.clear()
        with torch.no_grad():
            assert torch.equal(fused(x), expected)
        # sliced blocks between the units: after the first call, no unit packs for the next one
        assert [c["pack_out"] for c in calls if c["residual"] or c["shortcut"]][:-1] == [chained] * (n_units - 1)
        assert in_torch == sum(
            u.shortcut_name is not None and not isinstance(getattr(u, u.shortcut_name)[0], PackedQLayer) for u in units
        )


def test_a_changed_handoff_is_not_used_and_fallbacks_agree(tmp_path):
    """A hook that changes a unit's output in place: the next unit packs the changed tensor itself. The
    torch kernel and training mode run the blocks' own modules, with the unfused model's results."""
    args = dict(name="tiny_resnet_e", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(31)
    model = _calibrated(build_model(**args), (1, 8, 8), seed=32)
    export_packed(model, tmp_path / "t.safetensors", model_args=args)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(33))
    fused = load_packed(tmp_path / "t.safetensors", build_model)
    assert [type(m).__name__ for m in fused][2:6] == ["PackedResidual"] * 4
    assert [u.takes_packed() for u in list(fused)[2:6]] == [False, True, True, True]

    def flip(module, inputs, output):
        output.neg_()

    hooks = [net[3].register_forward_hook(flip) for net in (model, fused)]
    with torch.no_grad():
        want, got = model(x), fused(x)
    for h in hooks:
        h.remove()
    assert torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))  # no stale handoff from the hooked call

    slow = load_packed(tmp_path / "t.safetensors", build_model, kernel="torch")
    with torch.no_grad():
        assert torch.equal(slow(x), model(x))
    plain = load_packed(tmp_path / "t.safetensors", build_model, fuse_bn=False)
    fused.train(), plain.train()
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))


def test_blocks_declare_their_sum():
    """Only blocks that are body(x) + shortcut(x) declare it: ResNetE E1 whole convs, BasicBlockE without
    ReAct's RPReLU; E2 (pre-norm), sliced convs and small_reactnet do not."""

    def declared(**args):
        model = build_model(num_classes=10, in_channels=3, **args)
        return [m.residual_parts() for m in model.modules() if hasattr(m, "residual_parts")]

    e1 = declared(name="resnet18_e1", image_size=64)
    assert len(e1) == 16 and e1.count(("body", "downsample")) == 3 and e1.count(("body", None)) == 13
    assert set(declared(name="resnet18_e2", image_size=64)) == {None}
    sliced = declared(name="resnet18_e1", image_size=64, slices=2)  # the downsampling convs stay whole
    assert len(sliced) == 3 + 13 * 2 and sliced.count(("body", "downsample")) == 3 and sliced.count(None) == 26
    small = declared(name="small_resnet_e", image_size=28)
    assert small.count(("body", "shortcut")) == 3 and small.count(("body", None)) == 3
    assert set(declared(name="small_reactnet", image_size=28)) == {None}


def test_the_kept_plan_follows_the_layers(tmp_path):
    """A unit keeps its kernel call's parts per input shape; new BatchNorm statistics, a new kernel or a new
    batch size make a new plan, with the unfused model's results each time."""
    args = dict(name="tiny_resnet_e", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(41)
    model = _calibrated(build_model(**args), (1, 8, 8), seed=42)
    export_packed(model, tmp_path / "t.safetensors", model_args=args)
    fused = load_packed(tmp_path / "t.safetensors", build_model)
    plain = load_packed(tmp_path / "t.safetensors", build_model, fuse_bn=False)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(43))
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
        first = fused[3].link.plan
        for norm in (fused[3].conv.norm, plain.get_submodule("3.body.1")):
            norm.running_mean.add_(0.75)  # in place: the tensor's version changes
        assert torch.equal(fused(x), plain(x)) and fused[3].link.plan is not first
        assert not torch.equal(fused(x), model(x))  # the new statistics are used
        kernel_plan = fused[3].link.plan
        use_kernel(fused, "torch")
        assert torch.equal(fused(x), plain(x)) and fused[3].link.plan[3] is None  # torch: the block's modules
        use_kernel(fused, "numba")
        assert torch.equal(fused(x[:1]), plain(x[:1])) and fused[3].link.plan is not kernel_plan


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_packed_models_run_under_no_grad_inference_mode_and_plain_calls(tmp_path, kernel):
    """The same outputs under torch.no_grad(), torch.inference_mode() and a plain call, also for a model
    loaded under inference_mode (its tensors then keep no version counter: the units still agree)."""
    args = dict(name="tiny_resnet_e", num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(51)
    model = _calibrated(build_model(**args), (1, 8, 8), seed=52)
    export_packed(model, tmp_path / "t.safetensors", model_args=args)
    fused = load_packed(tmp_path / "t.safetensors", build_model, kernel=kernel)
    assert any(isinstance(m, PackedResidual) for m in fused.modules())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(53))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(fused(x), expected)
    with torch.inference_mode():
        assert torch.equal(fused(x), expected) and torch.equal(fused(x), expected)  # a kept plan too
    assert torch.equal(fused(x).detach(), expected)
    with torch.inference_mode():
        loaded_there = load_packed(tmp_path / "t.safetensors", build_model, kernel=kernel)
        assert torch.equal(loaded_there(x), expected)
    with torch.no_grad():
        assert torch.equal(loaded_there(x), expected) and torch.equal(fused(x), expected)
