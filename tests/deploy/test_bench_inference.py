"""``bitrain bench --inference`` (cli/bench_inference.py): the packed export against its float model; its
output format and exit codes (not the speed: timings on a shared CPU are noise)."""

from __future__ import annotations

import re

import pytest

from bitrain.cli import main


def test_bench_inference_prints_ratios_agreement_and_layers(capsys):
    tiny = ["--model", "tiny_resnet_e", "--image-size", "8", "--in-channels", "1", "--num-classes", "10"]
    assert (
        main(["bench", "--inference", *tiny, "--batch-size", "1,3", "--rounds", "2", "--layers", "--threads", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("bitrain bench --inference: tiny_resnet_e 1x8x8, 4 packed layers, kernel ")
    assert re.search(r"^allocator: ", out, re.M)
    assert re.search(
        r"^weights: 73,728 binary weights, 294,912 bytes as float32 -> 9,216 bytes packed \(32\.0x\)", out, re.M
    )
    for batch in (1, 3):
        ratio = re.search(rf"^batch {batch}: ratio packed/float: (\d+\.\d\d)$", out, re.M)
        assert ratio and float(ratio.group(1)) > 0
        assert re.search(
            rf"^batch {batch}: predictions identical: {2 * batch}/{2 * batch} \(max \|logit difference\| 0\)$",
            out,
            re.M,
        )
        assert re.search(
            rf"^batch {batch}: layers ratio packed/float: \d+\.\d\d-\d+\.\d\d; the packed layers and units take",
            out,
            re.M,
        )
    # each block runs as one fused unit: conv + BatchNorm + its shortcut, the next three on packed inputs
    units = re.findall(
        r"^  unit (\S+): QConv2d \(\d+, \d+, 3, 3\) \+ BatchNorm2d \+ (x|shortcut \(AvgPool2d, Conv2d, BatchNorm2d\)) "
        r"on \S+( \(packed by the unit before\))?: float [0-9.]+ ms, packed [0-9.]+ ms, ratio packed/float: \d+\.\d\d$",
        out,
        re.M,
    )
    before = " (packed by the unit before)"
    expected = [("2", "x", ""), ("3", "x", before), ("4", "shortcut (AvgPool2d, Conv2d, BatchNorm2d)", before)]
    assert units == (expected + [("5", "x", before)]) * 2
    assert not re.search(r"^  layer ", out, re.M)  # no binary layer outside a unit


@pytest.mark.parametrize(
    "flags,needle",
    [(["--batch-size", "1,0"], "--batch-size"), (["--rounds", "0"], "--rounds"), (["--kernel", "gpu"], "--kernel")],
)
def test_bench_inference_bad_input_is_exit_2(flags, needle, capsys):
    assert main(["bench", "--inference", "--model", "tiny_resnet_e", "--image-size", "8", *flags]) == 2
    assert needle in capsys.readouterr().err


def test_inference_is_picked_wherever_the_flag_stands(capsys):
    """``--inference`` selects the packed benchmark and its own options, before or after them."""
    assert main(["bench", "--model", "tiny_resnet_e", "--image-size", "8", "--inference", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
    assert main(["bench", "--layers"]) == 2  # the training-loop benchmark has no --layers
    assert "--layers" in capsys.readouterr().err
