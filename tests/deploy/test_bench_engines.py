"""``bitrain bench --inference --engine openvino``: OpenVINO's BinaryConvolution IR in the same rounds."""

from __future__ import annotations

import re

import pytest

from bitrain.cli import main

pytest.importorskip("openvino", reason="racing OpenVINO needs the openvino package (bitrain[openvino])")
pytestmark = pytest.mark.runtimes  # conftest: run last (forking after these runtimes start can crash)


def test_bench_inference_races_openvino(capsys):
    tiny = ["--model", "tiny_resnet_e", "--image-size", "8", "--in-channels", "1", "--num-classes", "10"]
    argv = ["bench", "--inference", *tiny, "--batch-size", "1,3", "--rounds", "3", "--threads", "1"]
    assert main([*argv, "--engine", "openvino"]) == 0
    out = capsys.readouterr().out
    for batch in (1, 3):
        assert re.search(
            rf"^batch {batch}: float .* img/s\), packed .* img/s\), openvino .* img/s\), medians of 3$", out, re.M
        )
        assert re.search(rf"^batch {batch}: ratio packed/openvino: \d+\.\d\d$", out, re.M)
        assert re.search(rf"^batch {batch}: predictions identical: {3 * batch}/{3 * batch} ", out, re.M)
        assert re.search(
            rf"^batch {batch}: predictions identical \(openvino vs float\): {3 * batch}/{3 * batch} ", out, re.M
        )
