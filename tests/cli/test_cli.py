"""The ``bitrain`` command: subcommand table, BMXNet-style command lines, summary."""

from __future__ import annotations

from conftest import run_cli


def test_help_lists_every_command(capsys):
    assert run_cli("--help") == 0
    out = capsys.readouterr().out
    for name in ("train", "eval", "summary", "models", "export", "plot", "bench"):
        assert f"  {name} " in out


def test_unknown_command_is_exit_2_with_a_suggestion(capsys):
    assert run_cli("trian") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'train'" in err[0]


def test_a_bmxnet_command_line_without_subcommand_means_train(tmp_path):
    assert (
        run_cli(
            "--model", "tiny_resnet_e", "--dataset", "digits", "--test-run", "--epochs", "1", "--prefix", tmp_path / "r"
        )
        == 0
    )
    assert (tmp_path / "r" / "model.safetensors").is_file()


def test_summary_defaults_to_imagenet_input(capsys):
    """Without --dataset: 3x224x224 and 1000 classes, as BMXNet's print_summary."""
    assert run_cli("summary", "--model", "resnet18_e1") == 0
    out = capsys.readouterr().out
    # ResNetE-18: 11,157,504 binary weights (hand-counted in tests/binary/test_summary.py) + float layers
    assert (
        "Total params                      11,689,640 (11,157,504 at 1 bit" in out
    )  # parameters only: BatchNorm statistics are buffers
    assert "Buffers (BatchNorm statistics)    9,734" in out
    assert "1000" in out
    assert run_cli("summary", "--model", "resnet18_e1", "--image-size", "32") == 0
    small = capsys.readouterr().out
    assert "11,157,504 at 1 bit" in small and "Combined FLOPs" in small
    assert small != out  # the MACs follow the input size


def test_summary_for_a_dataset_builds_for_its_input(capsys):
    assert run_cli("summary", "--dataset", "digits") == 0
    out = capsys.readouterr().out
    assert "Total params                      77,290" in out  # tiny_resnet_e, 1 channel, 10 classes


def test_output_into_a_closed_pipe_is_not_an_error():
    """`bitrain models | head -1`: the reader leaves early; no traceback, exit 0."""
    import subprocess
    import sys

    p = subprocess.run(
        f"{sys.executable} -m bitrain models | head -1", shell=True, capture_output=True, text=True, timeout=120
    )
    assert p.stdout.startswith("name") and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr
