"""``bitrain models``: the zoo as a table (name, family, input size, parameters, binary share)."""

from __future__ import annotations

from collections.abc import Sequence

from bitrain.errors import UserError


def main(argv: Sequence[str]) -> int:
    """``bitrain models``: the zoo as a table."""
    from bitrain.cli.args import PROG, ArgParser

    ArgParser(
        prog=f"{PROG} models",
        description="The model zoo: parameters (1000 classes, 3 channels, "
        "default input size) and the share of them in 1-bit layers.",
    ).parse_args(list(argv))
    import torch

    from bitrain.binary.layers import binary_layers
    from bitrain.models import build_model, list_models, model_info

    print(f"{'name':<18} {'family':<10} {'input':>5} {'params':>9} {'binary':>7}")
    for name in list_models():
        mi = model_info(name)
        try:
            with torch.device("meta"):  # shapes only: no memory, no init cost
                model = build_model(name, num_classes=1000, in_channels=3, image_size=mi.image_size)
        except UserError:  # the *_flex models need --block-config: no fixed size
            print(f"{name:<18} {mi.family:<10} {mi.image_size:>5} {'(flex)':>9} {'-':>7}")
            continue
        total = sum(p.numel() for p in model.parameters())
        binary = sum(m.weight.numel() for m in binary_layers(model))
        print(f"{name:<18} {mi.family:<10} {mi.image_size:>5} {total / 1e6:>8.2f}M {100 * binary / total:>6.1f}%")
    return 0
