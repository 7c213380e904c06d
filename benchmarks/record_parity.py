"""Record reference outputs, gradients and parameter counts into tests/fixtures/parity/ (run by hand).

Each reference runs in its own environment, not bitrain's (larq needs TensorFlow and numpy < 2; bitorch
pins its own torch); this script imports neither torch (for larq) nor bitrain. docs/parity.md has the
recipes for the environments; in short:

    python benchmarks/record_parity.py larq      # larq 0.14 + larq-zoo 2.4 on TensorFlow (tf-keras)
    python benchmarks/record_parity.py bitorch   # bitorch 0.4.1 on its own torch

Each reference gives one compressed ``<reference>.npz``: float32 arrays named ``<group>/<case>/<what>``
(the input ``x``, a fixed upstream gradient ``dy``, the reference's output ``y`` and input gradient
``grad`` = d sum(y * dy) / dx) and ``meta``, a JSON string (versions, parameter counts, settings), so
that tests/binary/test_parity.py recomputes the same with bitrain and compares. The grid holds 0, -0.0, +-1, the clip edges 1.25 and 0.05 with
their float32 neighbours, and every rounding edge (k + 1/2) / n of 1..4 bits with its neighbours.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parity"


def grid() -> np.ndarray:
    """Dense float32 grid on [-3, 3] plus the edges and their float32 neighbours."""
    f = np.float32
    pts = [np.linspace(-3, 3, 241, dtype=f)]
    edges = [0.0, 1.0, 1.25, 0.05, 0.7, 2.5]  # sign, clip 1 and 1.25, ste_tern, a cancel edge, tails
    for bits in (1, 2, 3, 4):
        n = 2**bits - 1
        edges += [(k + 0.5) / n for k in range(n)]  # rounding edges of clip(x, 0, 1) * n
    for e in edges:
        e = f(e)
        for s in (f(1), f(-1)):
            v = s * e
            pts.append(np.array([np.nextafter(v, f(-np.inf)), v, np.nextafter(v, f(np.inf))], dtype=f))
    # around 0 the smallest normal floats, not nextafter's subnormals: TensorFlow's CPU kernels flush
    # subnormals to zero (so larq's sign(-1e-45) is +1), a platform setting rather than larq's semantics
    pts = [p[np.abs(p) >= np.finfo(f).tiny] if p.size == 3 and p[1] == 0 else p for p in pts]
    pts.append(np.array([-np.finfo(f).tiny, np.finfo(f).tiny], dtype=f))
    pts.append(np.array([-0.0, 0.49999997, 0.166666657, 0.0714285672], dtype=f))  # issue 11's inputs
    x = np.concatenate(pts)
    _, keep = np.unique(x.view(np.int32), return_index=True)  # -0.0 and 0.0 both stay
    return x[np.sort(keep)]


def upstream(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 1.5, size=shape).astype(np.float32)


def inputs(shape, seed: int, scale: float = 1.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


# ------------------------------------------------------------------------------------------- larq


def record_larq() -> dict:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # larq 0.14 needs Keras 2 (tf-keras) on TF >= 2.16
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")  # zookeeper's tfds protos
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import larq as lq
    import larq_zoo as lqz
    import tensorflow as tf

    def run(fn, x: np.ndarray, seed: int) -> dict:
        dy = upstream(x.shape, seed)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = fn(xt)
            loss = tf.reduce_sum(y * dy)
        g = tape.gradient(loss, xt)
        return {"x": _f32(x), "dy": _f32(dy), "y": _f32(y.numpy()), "grad": _f32(g.numpy())}

    x = grid()
    q = lq.quantizers
    quant = {
        "ste_sign": run(q.SteSign(), x, 1),
        "ste_sign_clip1.25": run(q.SteSign(clip_value=1.25), x, 2),
        "approx_sign": run(q.ApproxSign(), x, 3),
        "swish_sign": run(q.SwishSign(), x, 4),
        "ste_heaviside": run(q.SteHeaviside(), x, 5),
        "ste_tern": run(q.SteTern(), x, 6),
    }
    for k in (1, 2, 3, 4):
        quant[f"dorefa_activations_{k}bit"] = run(q.DoReFa(k_bit=k, mode="activations"), x, 10 + k)
        quant[f"dorefa_weights_{k}bit"] = run(q.DoReFa(k_bit=k, mode="weights"), inputs((3, 3, 2, 4), 20 + k), 30 + k)
    # magnitude_aware_sign: an NHWC activation (mean over N, H, W per channel) and an HWIO kernel
    quant["magnitude_aware_sign_nhwc"] = run(q.MagnitudeAwareSign(), inputs((2, 3, 3, 4), 40, 0.8), 41)
    quant["magnitude_aware_sign_hwio"] = run(q.MagnitudeAwareSign(), inputs((3, 3, 2, 4), 42, 0.8), 43)

    convs = {}
    for name, kw in {
        "ste_sign_pad0": dict(strides=1, pad_values=0.0, clip=1.0),
        "ste_sign_pad1_stride2": dict(strides=2, pad_values=1.0, clip=1.0),
        "quicknet_pad1_clip1.25": dict(strides=1, pad_values=1.0, clip=1.25),
    }.items():
        clip = kw.pop("clip")
        x4 = inputs((2, 5, 5, 4), 50)
        layer = lq.layers.QuantConv2D(
            3,
            3,
            padding="same",
            use_bias=False,
            input_quantizer=q.SteSign(clip_value=clip),
            kernel_quantizer=q.SteSign(clip_value=clip),
            kernel_constraint=lq.constraints.WeightClip(clip),
            **kw,
        )
        layer.build(x4.shape)
        kernel = np.clip(inputs((3, 3, 4, 3), 51, 0.8), -clip, clip)  # as WeightClip keeps it after a step
        layer.kernel.assign(kernel)
        xt = tf.constant(x4)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xt)
            y = layer(xt)
            dy = upstream(y.shape, 52)
            loss = tf.reduce_sum(y * dy)
        gx, gw = tape.gradient(loss, [xt, layer.kernel])
        convs[name] = {
            "clip": clip,
            "stride": kw["strides"],
            "pad_value": kw["pad_values"],
            "x_nhwc": _f32(x4),
            "kernel_hwio": _f32(kernel),
            "dy_nhwc": _f32(dy),
            "y_nhwc": _f32(y.numpy()),
            "grad_x_nhwc": _f32(gx.numpy()),
            "grad_kernel_hwio": _f32(gw.numpy()),
        }

    zoo = {}
    for name in (
        "QuickNet",
        "QuickNetSmall",
        "QuickNetLarge",
        "BiRealNet",
        "XNORNet",
        "DoReFaNet",
        "RealToBinaryNet",
        "BinaryAlexNet",
        "BinaryResNetE18",
        "BinaryDenseNet28",
        "BinaryDenseNet37",
        "BinaryDenseNet45",
        "MeliusNet22",
    ):
        fn = getattr(lqz.sota, name, None) or getattr(lqz.literature, name)
        model = fn(weights=None, input_shape=(224, 224, 3), num_classes=1000)
        zoo[name] = int(sum(np.prod(v.shape) for v in model.trainable_weights))
        tf.keras.backend.clear_session()
    versions = {p: md.version(p) for p in ("larq", "larq-zoo", "tensorflow", "tf-keras", "numpy")}
    return {"reference": "larq", "versions": versions, "quantizers": quant, "qconv": convs, "zoo_trainable": zoo}


# ---------------------------------------------------------------------------------------- bitorch


def record_bitorch() -> dict:
    import torch
    from bitorch.layers import QActivation, QConv2d
    from bitorch.models import model_from_name
    from bitorch.quantizations import quantization_from_name

    def run(fn, x: np.ndarray, seed: int) -> dict:
        dy = upstream(x.shape, seed)
        xt = torch.tensor(x, requires_grad=True)
        y = fn(xt)
        (g,) = torch.autograd.grad((y * torch.tensor(dy)).sum(), xt)
        return {"x": _f32(x), "dy": _f32(dy), "y": _f32(y.detach()), "grad": _f32(g)}

    x = grid()
    quant = {
        name: run(quantization_from_name(name)(), x, 60 + i)
        for i, name in enumerate(("sign", "approxsign", "swishsign", "steheaviside"))
    }
    quant["sign_cancel0.7"] = run(QActivation("sign", 0.7), x, 70)

    x4 = inputs((2, 4, 5, 5), 80)
    w = inputs((3, 4, 3, 3), 81, 0.5)
    convs = {}
    for stride in (1, 2):
        conv = QConv2d(
            4,
            3,
            3,
            stride=stride,
            padding=1,
            input_quantization="sign",
            weight_quantization="sign",
            gradient_cancellation_threshold=1.0,
        )
        with torch.no_grad():
            conv.weight.copy_(torch.tensor(w))
        xt = torch.tensor(x4, requires_grad=True)
        y = conv(xt)
        dy = upstream(tuple(y.shape), 82 + stride)
        gx, gw = torch.autograd.grad((y * torch.tensor(dy)).sum(), [xt, conv.weight])
        convs[f"sign_stride{stride}"] = {
            "stride": stride,
            "x": _f32(x4),
            "weight": _f32(w),
            "dy": _f32(dy),
            "y": _f32(y.detach()),
            "grad_x": _f32(gx),
            "grad_weight": _f32(gw),
        }

    zoo = {}
    for name in (
        "resnet18v1",
        "resnet34v1",
        "resnet50v1",
        "resnet152v1",
        "resnet18v2",
        "resnet34v2",
        "resnet50v2",
        "resnet152v2",
        "resnete18",
        "resnete34",
        "densenet28",
        "densenet37",
        "densenet45",
        "meliusnet22",
        "meliusnet23",
        "meliusnet42",
        "meliusnet59",
        "meliusneta",
        "meliusnetb",
        "meliusnetc",
        "quicknet",
        "quicknetsmall",
        "quicknetlarge",
    ):
        model = model_from_name(name)(input_shape=(1, 3, 224, 224), num_classes=1000)
        zoo[name] = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    versions = {p: md.version(p) for p in ("bitorch", "torch", "numpy")}
    return {"reference": "bitorch", "versions": versions, "quantizers": quant, "qconv": convs, "zoo_trainable": zoo}


def _flatten(record: dict) -> dict[str, np.ndarray]:
    # arrays -> "<group>/<case>/<what>"; every other value goes to the JSON "meta" entry
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {}
    for key, value in record.items():
        if key in ("quantizers", "qconv"):
            for case, fields in value.items():
                for what, v in fields.items():
                    if isinstance(v, np.ndarray):
                        arrays[f"{key}/{case}/{what}"] = v
                    else:
                        meta.setdefault(key, {}).setdefault(case, {})[what] = v
        else:
            meta[key] = value
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return arrays


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", choices=("larq", "bitorch"))
    ap.add_argument("--out", type=Path, default=OUT, help="fixture folder (default tests/fixtures/parity)")
    args = ap.parse_args(argv)
    record = record_larq() if args.reference == "larq" else record_bitorch()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.reference}.npz"
    np.savez_compressed(path, **_flatten(record))
    print(f"wrote {path} ({path.stat().st_size} bytes): {record['versions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
