"""``bitrain summary``: parameters, bits, memory, MACs and compression of a model."""

from __future__ import annotations

from collections.abc import Sequence

from bitrain.cli.train import main as train_main
from bitrain.cli.train import model_args, print_summary, resolve_config


def main(argv: Sequence[str]) -> int:
    """``bitrain summary --model NAME [train flags]``: params, bits, memory, MACs, compression

    With ``--dataset`` the model is built for that data set's input, as ``bitrain train --dry-run``
    does; without, for ImageNet as BMXNet's print_summary: 3 channels, 1000 classes, the model's
    published input size (``--image-size`` overrides it).
    """
    argv = list(argv)
    if any(a == "--dataset" or a.startswith("--dataset=") for a in argv) or "--config" in argv:
        return train_main([*argv, "--dry-run"])
    from types import SimpleNamespace

    from bitrain.models import build_model, model_info

    cfg, _, _ = resolve_config([*argv, "--dry-run"])
    size = cfg.image_size if any(a.startswith("--image-size") for a in argv) else model_info(cfg.model).image_size
    info = SimpleNamespace(num_classes=1000, in_channels=3, image_size=size)
    print_summary(build_model(**model_args(cfg, info)), info, cfg.plot_network)
    return 0
