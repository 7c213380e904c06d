"""Packaged recipes: each one trains (--test-run, small dummy data of its shape) so none rots;
--config takes a recipe name; every recipe states the published result it aims at.
Also the zoo table of ``bitrain models`` that the recipes pick their models from."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import run_cli

from bitrain.cli.config import FIELDS, RECIPES_DIR, list_recipes, load_yaml, read_yaml

# recipe -> (command-line overrides that shrink it to seconds on a CPU, the published top-1 in %)
SMALL_IMAGENET = ("--dataset", "dummy", "--dummy-shape", "3,64,64", "--dummy-size", "8", "--batch-size", "2")
SMALL_28 = ("--dataset", "dummy", "--dummy-shape", "1,28,28", "--dummy-size", "8", "--batch-size", "2")
RECIPES = {
    "digits": ((), "97"),
    "cifar10_resnet18": (
        ("--dataset", "dummy", "--dummy-shape", "3,32,32", "--dummy-size", "8", "--batch-size", "2"),
        "90",
    ),
    "fashion_mnist": (SMALL_28, "92.86"),
    "mnist": (SMALL_28, "99"),
    "imagenet_resnete18": (SMALL_IMAGENET, "60.0"),
    "imagenet_densenet28": (SMALL_IMAGENET, "61.7"),
    "imagenet_meliusnet22": (SMALL_IMAGENET, "62.9"),
    "reactnet_imagenet": (SMALL_IMAGENET, "69.4"),  # in stages (tests/cli/test_stages.py)
    "fashion_mnist_stages": (SMALL_28, "94.0"),
}


def _text(name: str) -> str:
    return (RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8")


def test_the_packaged_recipes():
    assert list_recipes() == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_states_its_target_and_usage(name):
    text = _text(name)
    target = re.search(r"^# target: (.*)$", text, re.M)
    assert target and f"{RECIPES[name][1]} %" in target.group(1), target
    assert f"--config {name}" in text
    raw = yaml.safe_load(text)
    assert set(raw) - {"stages"} <= set(FIELDS) and raw["model"] and raw["dataset"]
    assert (read_yaml(name) if "stages" in raw else load_yaml(name)) == raw  # a bare name finds the packaged file


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_a_test_run(name, tmp_path):
    overrides, _ = RECIPES[name]
    run = tmp_path / name
    rc = run_cli(
        "train",
        "--config",
        name,
        *overrides,
        "--epochs",
        "1",
        "--test-run",
        "--cpu",
        "--log-interval",
        "0",
        "--prefix",
        run,
    )
    assert rc == 0
    recipe = yaml.safe_load(_text(name))
    used = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("model", "optimizer", "lr", "lr_mode", "clip_threshold", "bits", "bits_a"):
        if key in recipe:
            assert used[key] == recipe[key], key  # the recipe was applied ...
    assert used["epochs"] == 1 and used["test_run"] is True  # ... and the command line overrides it
    last = run / "stages" / recipe["stages"][-1]["name"] if "stages" in recipe else run
    assert (run / "model.safetensors").is_file() and (last / "checkpoints" / "last.pt").is_file()


def test_unknown_recipe_lists_the_valid_ones(capsys):
    assert run_cli("train", "--config", "cifar10_resnet81", "--dry-run") == 2
    err = capsys.readouterr().err
    assert "not a recipe" in err and "did you mean 'cifar10_resnet18'" in err and "imagenet_meliusnet22" in err


def test_a_file_path_still_wins(tmp_path):
    own = tmp_path / "digits.yaml"
    own.write_text("lr: 0.5\n")
    assert load_yaml(own) == {"lr": 0.5}


def test_models_table(capsys):
    from bitrain.models import list_models

    assert run_cli("models") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["name", "family", "input", "params", "binary"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == list_models()
    # ResNet-18 at 1000 classes: 11.69 M parameters (as torchvision's), nearly all in binary convs
    name, family, size, params, binary = rows["resnet18_e1"]
    assert (family, size, params) == ("resnet_e", "224", "11.69M")
    assert 90.0 < float(binary.rstrip("%")) < 100.0
    assert rows["tiny_resnet_e"][2] == "8"
    assert rows["densenet_flex"][3] == "(flex)"  # needs --block-config: no fixed size
    shares = [float(r[4].rstrip("%")) for r in rows.values() if r[4] != "-"]
    assert all(0.0 < s <= 100.0 for s in shares)
    assert rows["binary_alexnet"][4] == "100.0%"  # larq's BinaryAlexNet binarises every layer's weights
