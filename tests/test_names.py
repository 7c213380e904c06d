"""bitrain.names is the one home of every list of valid names: each registry, the config's choices
and the README's flag table agree with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bitrain import names
from bitrain.binary import quantizers as quant
from bitrain.binary.layers import binary_layer_config
from bitrain.cli import config as C
from bitrain.data.sets import DATA_SETS
from bitrain.errors import UserError
from bitrain.models import arch_options, build_model, list_models
from bitrain.models.common import init_weights, resolve_stem
from bitrain.train.evaluation import autocast_dtype
from bitrain.train.optim import OPTIMIZERS, build_optimizer
from bitrain.train.schedules import make_schedule

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _choices(field: str) -> tuple:
    return tuple(C.FIELDS[field].metadata["choices"])


def test_config_choices_are_the_names():
    assert _choices("dataset") == tuple(DATA_SETS)
    assert _choices("augmentation") == names.AUGMENTATIONS
    assert _choices("bits") == _choices("bits_a") == names.BITS
    assert _choices("approximation") == names.APPROXIMATIONS
    assert _choices("initialization") == names.INITIALIZATIONS
    assert _choices("initial_layers") == names.STEMS
    assert _choices("optimizer") == names.OPTIMIZERS
    assert _choices("lr_mode") == names.LR_MODES
    assert _choices("dtype") == names.DTYPES
    assert set(names.ARCH_OPTIONS) <= set(C.FIELDS) and set(names.ARCH_FLAGS) <= set(names.ARCH_OPTIONS)


def test_every_dataset_name_is_built():
    from bitrain.data import DATASETS, build_data

    assert DATASETS == tuple(DATA_SETS)
    with pytest.raises(UserError, match="valid|choose|unknown"):
        build_data("no-such-set", batch_size=8, device="cpu")
    # the in-memory sets that need no files build; the others fail on their missing files, not on the name
    for name in DATA_SETS:
        try:
            build_data(name, batch_size=8, device="cpu", data_dir="/nonexistent-bitrain-test")
        except UserError as e:
            assert "no-such" not in str(e) and "unknown data set" not in str(e), (name, e)


def test_quantizer_registry_matches_the_names():
    kbit = {n for n, q in quant.QUANTIZERS.items() if q.resolve(4) is not None}
    assert kbit == set(names.KBIT_QUANTIZERS)
    assert quant.VALID_BITS == names.BITS
    for bits in names.BITS:  # every width has quantizers, for weights and for activations
        assert quant.valid_methods(bits, "activation") and quant.valid_methods(bits, "weight")
    for q in quant.SPECS:  # each record is reachable under each of its names, for each width it takes
        for name in (q.name, *q.aliases):
            assert quant.QUANTIZERS[name] is q
            for bits in q.bits:
                assert quant.get_quantizer(name, bits) is not None


def test_each_quantizer_is_one_row_of_the_names_and_one_spec():
    """``names.QUANTIZER_NAMES`` (names, widths; torch-free) and ``quantizers.SPECS`` (functions, properties)
    list the same quantizers in the same order, and every width fact is read from the names."""
    assert [q.name for q in quant.SPECS] == [q.name for q in names.QUANTIZER_NAMES]
    for q, row in zip(quant.SPECS, names.QUANTIZER_NAMES):
        assert (q.bits, q.aliases) == (row.bits, row.aliases)
        # a 32-bit form of its own exactly where it also takes a smaller width (approx_sign's polynomial)
        assert (q.fp_fn is not None) == (32 in row.bits and len(row.bits) > 1), q.name
    assert names.KBIT_QUANTIZERS == ("round", "dorefa", "dorefa_quantizer")
    assert set(names.QUANTIZERS_BY_NAME) == quant.ALL_NAMES
    for bits in names.BITS:
        for kind in ("activation", "weight"):
            assert quant.valid_methods(bits, kind) == names.quantizers_for(bits, kind)
            assert names.default_quantizer(bits, kind) in names.quantizers_for(bits, kind)
            for name in names.QUANTIZERS_BY_NAME:  # the torch-free rule and the records agree
                assert names.fits(name, bits, kind) == (quant.QUANTIZERS[name].resolve(bits, kind) is not None)


def test_flag():
    assert names.flag("clip_threshold") == "--clip-threshold" and names.flag("bits") == "--bits"


def test_optimizer_lr_mode_dtype_registries_match_the_names():
    assert (*OPTIMIZERS, "bop") == names.OPTIMIZERS
    model = build_model("lenet", num_classes=10, in_channels=1, image_size=28)
    for name in names.OPTIMIZERS:
        assert isinstance(build_optimizer(model, name, lr=0.01), torch.optim.Optimizer)
    for mode in names.LR_MODES:
        assert make_schedule(lr=0.1, mode=mode, steps_per_epoch=2, epochs=3)(0) > 0
    assert [autocast_dtype(d) for d in names.DTYPES] == [None, torch.bfloat16, torch.float16]
    with pytest.raises(UserError, match="--dtype"):
        autocast_dtype("float8")


def test_model_names_registries_match_the_names():
    for method in names.INITIALIZATIONS:
        init_weights(nn.Linear(3, 2), method)
    for stem in names.STEMS:
        resolve_stem(stem, 224)
    for approximation in names.APPROXIMATIONS:
        with binary_layer_config(approximation=approximation):
            pass
    taken = {o for m in list_models() for o in arch_options(m)}
    assert taken == set(names.ARCH_OPTIONS)  # every architecture option is taken by some model


def test_readme_flag_table_lists_the_names():
    for field, values in (
        ("dataset", tuple(DATA_SETS)),
        ("optimizer", names.OPTIMIZERS),
        ("lr-mode", names.LR_MODES),
        ("logger", names.LOGGERS),
    ):
        m = re.search(rf"`--{field} \{{([^}}]*)\}}`", README)
        assert m and tuple(m.group(1).split(",")) == values, field


def test_the_names_and_the_help_need_no_torch():
    """Nor the trackers (--logger mlflow, wandb): they are imported when a run asks for them."""
    code = (
        "import sys, contextlib, io, bitrain.names, bitrain.data.sets, bitrain.cli.config\n"
        "import bitrain.binary.layer_config, bitrain.binary.geometry\n"
        "from bitrain.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main(['--help']), main(['train', '--help'])]\n"
        "heavy = {'torch', 'mlflow', 'wandb'} & set(sys.modules)\n"
        "sys.exit(1 if heavy or codes != [0, 0] else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
