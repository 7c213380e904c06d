"""bitrain.deploy.export: bit packing, xnor-popcount arithmetic, packed export == float-latent model."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn as nn
from conftest import run_cli

from bitrain.binary.layers import QConv2d, QLinear
from bitrain.cli.export import export_checkpoint
from bitrain.deploy.export import export_packed, read_metadata
from bitrain.deploy.load import load_packed
from bitrain.deploy.packed import PackedQLayer
from bitrain.deploy.reference import _popcount, pack_signs, unpack_signs, xnor_dot
from bitrain.errors import UserError


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so every layer shapes the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


class Digits(nn.Module):
    """Digits-sized (1x8x8, 10 classes): float stem, two binary convs, binary linear, float head."""

    def __init__(self, name: str = "digits", approximation: str = "", no_offset: bool = False):
        super().__init__()
        q = dict(bits=1, bits_a=1, approximation=approximation, no_offset=no_offset)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.q1 = QConv2d(16, 32, 3, padding=1, **q)
        self.bn1 = nn.BatchNorm2d(32)
        self.q2 = QConv2d(32, 32, 3, stride=2, padding=1, **q)
        self.bn2 = nn.BatchNorm2d(32)
        self.ql = QLinear(32 * 4 * 4, 64, **q)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.bn1(self.q1(x))
        x = self.bn2(self.q2(x))
        return self.fc(self.ql(x.flatten(1)))


class Net32(nn.Module):
    """32x32 input: binary convs with stride 2, padding -1 (1 and asymmetric (1, 0)), groups,
    dilation, shortcuts, a binary-weight / float-activation conv, float 1x1 downsample and head."""

    def __init__(self, name: str = "net32", approximation: str = "", no_offset: bool = False):
        super().__init__()
        q = dict(bits=1, bits_a=1, approximation=approximation, no_offset=no_offset)
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.b1 = nn.Sequential(QConv2d(32, 32, 3, padding=1, **q), nn.BatchNorm2d(32))
        self.b2 = nn.Sequential(QConv2d(32, 64, 3, stride=2, padding=1, **q), nn.BatchNorm2d(64))
        self.down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64))
        self.b3 = nn.Sequential(QConv2d(64, 64, 3, padding=1, groups=4, **q), nn.BatchNorm2d(64))
        self.b4 = nn.Sequential(QConv2d(64, 64, 3, padding=2, dilation=2, **q), nn.BatchNorm2d(64))
        self.b5 = nn.Sequential(QConv2d(64, 96, (3, 1), stride=2, padding=(1, 0), **q), nn.BatchNorm2d(96))
        self.b6 = nn.Sequential(
            QConv2d(96, 96, 1, bits=1, bits_a=32, approximation=approximation, no_offset=no_offset), nn.BatchNorm2d(96)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b1(x)
        x = self.b2(x) + self.down(x)
        x = x + self.b3(x)
        x = x + self.b4(x)
        x = self.b5(x)
        x = self.b6(x)
        return self.head(x)


def test_pack_bit_order():
    # +1 -> 1, -1 -> 0; element 8i+j is bit j (value 2**j) of byte i; pad bits are 0
    signs = torch.tensor([[1, -1, -1, -1, -1, -1, -1, -1, 1], [-1, 1, 1, -1, -1, -1, -1, 1, -1]])
    packed = pack_signs(signs > 0)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[1, 1], [2 + 4 + 128, 0]]
    assert torch.equal(unpack_signs(packed, 9), signs.float())
    import numpy as np  # the documented way to read the bits without bitrain

    assert np.array_equal(np.unpackbits(packed.numpy(), axis=-1, count=9, bitorder="little"), (signs > 0).numpy())
    w = torch.randn(5, 3, 3, 3)
    flat = (w >= 0).reshape(5, -1)
    assert torch.equal(unpack_signs(pack_signs(flat), 27), flat.float() * 2 - 1)


def test_popcount_and_xnor_dot():
    g = torch.Generator().manual_seed(1)
    words = torch.randint(-(2**63), 2**63 - 1, (200,), dtype=torch.int64, generator=g)
    words[:3] = torch.tensor([0, -1, -(2**63)])
    expected = [bin(w & (2**64 - 1)).count("1") for w in words.tolist()]
    assert _popcount(words.clone()).tolist() == expected
    assert expected[:3] == [0, 64, 1]
    # xnor_dot on packed +-1 operands == the float matmul, fan_in not a multiple of 64 (or of 8)
    x = torch.randint(0, 2, (37, 131), generator=g).bool()
    w = torch.randint(0, 2, (11, 131), generator=g).bool()
    from bitrain.deploy.reference import _words

    dot = xnor_dot(_words(pack_signs(x)), _words(pack_signs(w)), 131, chunk=64)
    assert torch.equal(dot, ((x.float() * 2 - 1) @ (w.float() * 2 - 1).T).long())


def _roundtrip(model: nn.Module, x: torch.Tensor, tmp_path, factory) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "packed.safetensors"
    export_packed(model, path, model_args={"name": "test"}, meta={"note": "unit test"})
    loaded = load_packed(path, model_factory=factory)
    with torch.no_grad():
        got = loaded(x)
    return expected, got, loaded


@pytest.mark.parametrize("approximation,no_offset", [("", False), ("", True), ("binet", False), ("xnor", False)])
def test_digits_packed_model_matches(tmp_path, approximation, no_offset):
    torch.manual_seed(0)
    model = _randomize_bn(Digits(approximation=approximation, no_offset=no_offset))
    x = torch.randn(64, 1, 8, 8)
    expected, got, loaded = _roundtrip(
        model, x, tmp_path, lambda name: Digits(approximation=approximation, no_offset=no_offset)
    )
    assert isinstance(loaded.q1, PackedQLayer) and isinstance(loaded.ql, PackedQLayer)
    assert loaded.q1.weight_packed.dtype == torch.uint8
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("approximation", ["", "binet", "xnor"])
def test_net32_packed_model_matches(tmp_path, approximation):
    torch.manual_seed(1)
    model = _randomize_bn(Net32(approximation=approximation))
    x = torch.randn(4, 3, 32, 32)
    expected, got, loaded = _roundtrip(model, x, tmp_path, lambda name: Net32(approximation=approximation))
    assert sum(isinstance(m, PackedQLayer) for m in loaded.modules()) == 6
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.argmax(1), expected.argmax(1))


VARIANTS = {
    "xnor": dict(approximation="xnor"),
    "magnitude_aware_sign": dict(weight_quantization="magnitude_aware_sign"),  # scaled, no offset
    "dorefa_1bit_weights": dict(weight_quantization="dorefa"),  # +-1 but not a sign: no offset
    "approx_sign_inputs": dict(activation_method="approx_sign"),
    "heaviside_inputs": dict(activation_method="ste_heaviside"),  # 0/1 inputs: float path, -1 pad
    "steheaviside_inputs": dict(activation_method="steheaviside"),  # +-1 with 0 -> -1: float path
    "bits_a_4": dict(bits_a=4),  # k-bit inputs, padded with -1 as BMXNet
    "quicknet_pad_plus_one": dict(no_offset=True, clip_threshold=1.25, pad_value=1.0),  # larq QuickNet's conv
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_variants_match(tmp_path, variant):
    kw = dict(bits=1, **{"bits_a": 1, **VARIANTS[variant]})

    def factory(name):
        torch.manual_seed(2)
        # BatchNorm between the binary layers, as in real nets: a scaled layer's exact zero dot
        # (packed) vs the float conv's +-1e-9 would otherwise flip the next layer's sign input
        linear_kw = {k: v for k, v in kw.items() if k != "pad_value"}  # a linear layer has no padding
        return nn.Sequential(
            QConv2d(8, 16, 3, stride=2, padding=1, **kw),
            nn.BatchNorm2d(16),
            nn.Flatten(1),
            QLinear(16 * 3 * 3, 12, **linear_kw),
        )

    model = _randomize_bn(factory("v"))
    x = torch.randn(5, 8, 6, 6)
    expected, got, loaded = _roundtrip(model, x, tmp_path, factory)
    assert all(isinstance(loaded[i], PackedQLayer) for i in (0, 3))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_file_contents_and_metadata(tmp_path):
    model = Digits()
    path = tmp_path / "d.safetensors"
    info = export_packed(model, path, model_args={"name": "digits", "num_classes": 10}, meta={"epoch": 3})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, then JSON
    header = json.loads(raw[8 : 8 + header_len])
    assert header["q1.weight_packed"] == {**header["q1.weight_packed"], "dtype": "U8", "shape": [32, 16 * 9 // 8]}
    assert header["ql.weight_packed"]["shape"] == [64, 32 * 16 // 8]
    assert "q1.weight" not in header and "stem.0.weight" in header and "bn1.running_var" in header
    assert "q1.weight_scale" not in header  # plain sign weights carry no scale
    meta = read_metadata(path)
    assert meta["model_args"] == {"name": "digits", "num_classes": 10}
    assert meta["meta"] == {"epoch": 3} and meta["bit_order"] == "little"
    assert meta["layers"]["q2"]["stride"] == [2, 2] and meta["layers"]["q2"]["padding"] == [1, 1]
    assert meta["layers"]["ql"]["bits_a"] == 1 and info["packed_layers"] == 3
    # the packed bits are the signs of the latent weights (0 -> +1)
    from safetensors.torch import load_file

    bits = unpack_signs(load_file(str(path))["q1.weight_packed"], 16 * 9)
    assert torch.equal(bits, torch.where(model.q1.weight.reshape(32, -1) >= 0, 1.0, -1.0))


def test_packed_size_vs_float_checkpoint(tmp_path):
    model = Net32()
    torch.save(model.state_dict(), tmp_path / "float.pt")
    info = export_packed(model, tmp_path / "p.safetensors", model_args={"name": "net32"})
    binary = 32 * 32 * 9 + 64 * 32 * 9 + 64 * 16 * 9 + 64 * 64 * 9 + 96 * 64 * 3 + 96 * 96  # weights of b1..b6
    floats = sum(v.numel() for v in model.state_dict().values()) - binary  # stem, BN, downsample, head
    # packed: 1 bit per binary weight (rows padded to whole bytes: all fan_ins here are multiples of 8)
    assert info["bytes"] >= binary / 8 + floats * 4
    assert info["bytes"] < binary / 8 + floats * 4 + 12_000  # + header / JSON metadata
    ratio = (tmp_path / "float.pt").stat().st_size / info["bytes"]
    expected = (binary + floats) * 4 / (binary / 8 + floats * 4)
    assert binary == 101_376 and ratio > 0.8 * expected and ratio > 8


def test_unpackable_quantizer_is_a_user_error(tmp_path):
    model = Digits()
    model.q1.weight_quantization = lambda w, clip: (w > 0).float()  # 0/1 weights: not +-scale
    if hasattr(model.q1, "quantized_weight"):
        model.q1.quantized_weight = lambda: (model.q1.weight > 0).float()
    with pytest.raises(UserError, match="q1"):
        export_packed(model, tmp_path / "x.safetensors", model_args={"name": "digits"})


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="junk"):
        load_packed(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not a bitrain packed export"):
        read_metadata(tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="model_args"):
        export_packed(Digits(), tmp_path / "x.safetensors", model_args={"name": object()})
    torch.save({"state": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="model_args"):
        export_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        export_checkpoint(tmp_path / "nope.pt", tmp_path / "out.safetensors")
    assert run_cli("export", tmp_path / "nope.pt", tmp_path / "out.safetensors") == 2


@pytest.mark.parametrize("name", ["tiny_resnet_e", "lenet"])
def test_export_checkpoint_of_zoo_model(tmp_path, capsys, name):
    from bitrain.models import build_model

    args = {"name": name, "num_classes": 10, "in_channels": 1, "image_size": 8}
    torch.manual_seed(3)
    model = _randomize_bn(build_model(**args))
    torch.save(
        {"format": "bitrain", "version": 1, "model": model.state_dict(), "model_args": args}, tmp_path / "last.pt"
    )
    out = tmp_path / "model-1bit.safetensors"
    assert run_cli("export", tmp_path / "last.pt", out) == 0
    assert "packed 1-bit layers" in capsys.readouterr().out
    assert read_metadata(out)["model_args"] == args
    loaded = load_packed(out)  # rebuilt through build_model
    assert any(isinstance(m, PackedQLayer) for m in loaded.modules())
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    # plain 1-bit layers: integer counts on both sides, so the logits are bit-identical
    assert torch.equal(got, expected)
    # a flipped tensor byte is caught by the checkpoint's checksum
    from bitrain.train.checkpoint import checksum

    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    payload["checksum"] = checksum(payload)
    next(iter(payload["model"].values())).view(-1)[0] += 1
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="checksum"):
        export_checkpoint(tmp_path / "bad.pt", tmp_path / "bad.safetensors")


def test_export_refuses_a_suffix_no_format_owns(tmp_path, capsys):
    """``bitrain export CKPT m.txt``: one line, exit 2, nothing written (not a safetensors file named m.txt)."""
    for out in ("m.txt", "model"):
        assert run_cli("export", tmp_path / "nope.pt", tmp_path / out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no format writes" in err and ".safetensors" in err, err
        assert not (tmp_path / out).exists()


def test_layer_settings_are_frozen_and_keep_the_file_format():
    """LayerSettings: the export's JSON (lists, the conv-only keys for convs only) and back, unchangeable."""
    import dataclasses

    from bitrain.deploy.settings import LayerSettings

    conv = LayerSettings.from_layer(QConv2d(4, 8, 3, 2, 1, bias=False))
    data = conv.to_json()
    assert data["stride"] == [2, 2] and data["padding"] == [1, 1] and data["groups"] == 1
    assert data["shape"] == [8, 4, 3, 3] and data["xnor_inputs"] is True and data["offset"] is True
    assert LayerSettings.from_json(json.loads(json.dumps(data))) == conv and conv.kernel_size == (3, 3)
    linear = LayerSettings.from_layer(QLinear(16, 4))
    assert not {"stride", "padding", "dilation", "groups"} & set(linear.to_json()) and not linear.is_conv
    assert LayerSettings.from_json(linear.to_json()) == linear
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.groups = 2
