"""bitrain eval: the trainer's numbers, a hand-written pass, every source kind, the train split, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import read_rows, run_cli

from bitrain.cli.eval import evaluate_file
from bitrain.cli.reader import load_model
from bitrain.errors import UserError

# dummy 1x12x12, 10 classes: 64 train / 16 val images; one val batch of 16 in --test-run is the whole val set
SHAPE, N_TRAIN, N_VAL = (1, 12, 12), 64, 16
DUMMY = ("--dataset", "dummy", "--dummy-shape", "1,12,12", "--dummy-size", str(N_TRAIN))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval") / "run"
    rc = run_cli(
        "train",
        *DUMMY,
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--test-run",
        "--cpu",
        "--log-interval",
        "0",
        "--lr",
        "0.05",
        "--prefix",
        d,
    )
    assert rc == 0
    return d


def _hand_metrics(model: torch.nn.Module, split: int, n: int) -> dict[str, float]:
    """Top-1/top-5/loss computed here, independent of bitrain's loaders and metrics."""
    from bitrain.data import make_dummy

    x, y = make_dummy(SHAPE, 10, n, split)
    x = (torch.from_numpy(x).float() / 255.0 - 0.5) / 0.21  # the dummy set's mean/std
    y = torch.from_numpy(y)
    with torch.no_grad():
        logits = model.eval()(x)
    top5 = logits.topk(5, dim=1).indices
    return {
        "acc1": (top5[:, 0] == y).double().mean().item(),
        "acc5": (top5 == y[:, None]).any(1).double().mean().item(),
        "loss": F.cross_entropy(logits, y).item(),
        "samples": len(y),
    }


def test_eval_reproduces_the_trainers_validation_row(run):
    val = read_rows(run, "val")[-1]
    r = evaluate_file(run / "checkpoints" / "last.pt", device="cpu", batch_size=5)  # 5: a partial last batch
    assert r["samples"] == N_VAL and r["split"] == "val" and r["dataset"] == "dummy"
    assert r["acc1"] == pytest.approx(float(val["acc1"]), abs=1e-12)
    assert r["acc5"] == pytest.approx(float(val["acc5"]), abs=1e-12)
    assert r["loss"] == pytest.approx(float(val["loss"]), rel=1e-5)


@pytest.mark.parametrize("split,n,index", [("val", N_VAL, 1), ("train", N_TRAIN, 0)])
def test_eval_matches_a_hand_written_pass(run, split, n, index):
    model, margs, config, *_ = load_model(run / "checkpoints" / "last.pt")
    assert margs["name"] == "tiny_resnet_e" and config["dataset"] == "dummy"
    want = _hand_metrics(model, index, n)
    # batch 48 does not divide 64: the train split is read whole, in order, without augmentation
    got = evaluate_file(run / "checkpoints" / "last.pt", split=split, batch_size=48, device="cpu")
    assert got["samples"] == want["samples"] == n
    assert got["acc1"] == pytest.approx(want["acc1"], abs=1e-12)
    assert got["acc5"] == pytest.approx(want["acc5"], abs=1e-12)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_run_dir_final_weights_and_packed_export_give_the_same_numbers(run, capsys):
    ref = evaluate_file(run / "checkpoints" / "last.pt", device="cpu")
    best = evaluate_file(run / "checkpoints" / "best.pt", device="cpu")
    packed = run / "packed.safetensors"  # beside config.yaml: eval finds its data set there
    assert run_cli("export", run / "checkpoints" / "last.pt", packed) == 0
    capsys.readouterr()
    results = {}
    for name, src, extra in (("dir", run, ()), ("final", run / "model.safetensors", ()), ("packed", packed, ())):
        assert run_cli("eval", src, "--cpu", "--json", *extra) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["dir"]["source"].endswith("best.pt")  # a run dir means its best checkpoint
    assert results["dir"]["loss"] == pytest.approx(best["loss"], rel=1e-6)
    for r in (results["final"], results["packed"]):  # the final weights are the last checkpoint's
        assert r["samples"] == N_VAL
        assert r["acc1"] == pytest.approx(ref["acc1"], abs=1e-12)
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-4)  # packed: xnor-popcount arithmetic


def test_plain_output_line(run, capsys):
    assert run_cli("eval", run / "checkpoints" / "last.pt", "--cpu") == 0
    line = capsys.readouterr().out.strip()
    assert "tiny_resnet_e on dummy val (16 images): top-1 " in line and "top-5" in line and "loss" in line


def test_errors_exit_2_with_one_line(run, tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    no_meta = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(no_meta))
    packed = tmp_path / "p.safetensors"  # written by the Python API without a config: no data set recorded
    from bitrain.deploy.export import export_packed

    loaded = load_model(run / "checkpoints" / "last.pt")
    export_packed(loaded.model, packed, model_args=loaded.model_args)
    cases = [
        (("eval", tmp_path / "missing.pt"), "does not exist"),
        (("eval", bad), "unreadable or unsafe"),
        (("eval", no_meta), "no bitrain metadata"),
        (("eval", tmp_path), "without checkpoints/best.pt"),
        (("eval", packed, "--cpu"), "pass --dataset"),
        (("eval", run / "checkpoints" / "last.pt", "--split", "test"), "invalid choice"),
        (("eval", run / "checkpoints" / "last.pt", "--batch-size", "0", "--cpu"), "--batch-size"),
        # digits is 1x8x8: the model was built for 12 px
        (("eval", run / "checkpoints" / "last.pt", "--dataset", "digits", "--cpu"), "image_size=12"),
    ]
    for args, msg in cases:
        capsys.readouterr()
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (args, err)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from bitrain.console import progress

    loader = [(torch.zeros(1), torch.zeros(1))] * 3
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert progress(loader, "eval") is loader
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("CI", "true")
    assert progress(loader, "eval") is loader  # a CI log gets no bar either
    monkeypatch.delenv("CI", raising=False)
    wrapped = progress(loader, "eval")
    assert wrapped is not loader and len(list(wrapped)) == 3


def test_split_is_checked_in_the_api(run):
    with pytest.raises(UserError, match="--split"):
        evaluate_file(run, split="test")


def _image_tree(root, per_class: int = 5, size: int = 20):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c, level in (("dark", 60), ("light", 190)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = np.clip(level + rng.integers(-40, 40, (size, size + 4 * i, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_train_split_is_whole_and_unaugmented(tmp_path, capsys):
    tree = _image_tree(tmp_path / "tree")
    run = tmp_path / "run"
    assert (
        run_cli(
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            tree,
            "--image-size",
            "16",
            "--model",
            "tiny_resnet_e",
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--test-run",
            "-j",
            "0",
            "--cpu",
            "--log-interval",
            "0",
            "--prefix",
            run,
        )
        == 0
    )
    model, *_ = load_model(run / "checkpoints" / "last.pt")
    r1 = evaluate_file(run, split="train", batch_size=3, num_workers=0, device="cpu")
    r2 = evaluate_file(run, split="train", batch_size=10, num_workers=0, device="cpu")
    assert r1["samples"] == r2["samples"] == 10  # 10 train images, none dropped
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)  # fixed transform: batch size does not matter
    # by hand: the val transform (resize short side to ceil(16 / 0.875) = 19, centre crop 16) of every file
    from bitrain.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, transform

    files = sorted((tree / "train").rglob("*.png"))
    x = torch.stack([torch.tensor(transform(str(f), 16, "none", None)).permute(2, 0, 1) for f in files]).float()
    x = (x / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    y = torch.tensor([0 if f.parent.name == "dark" else 1 for f in files])
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    assert r1["loss"] == pytest.approx(loss, rel=1e-4)
    val = evaluate_file(run, num_workers=0, device="cpu")
    assert val["samples"] == 4 and val["dataset"] == "imagefolder"
