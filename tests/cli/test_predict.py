"""bitrain predict: a hand-written pass, folders and bad files, text and JSON output, checkpoint vs
packed export, the in-memory and image-folder validation transforms, class names, exit codes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from bitrain.cli.predict import Predictor, image_files
from bitrain.cli.reader import load_model
from bitrain.data.build import load_digits_split
from bitrain.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, transform
from bitrain.data.sets import DATA_SETS

N_GOOD = 6


@pytest.fixture(scope="module")
def digits_val():
    _, _, x, y = load_digits_split()
    return x[:N_GOOD], y[:N_GOOD]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict") / "run"
    args = (
        "--dataset",
        "digits",
        "--model",
        "tiny_resnet_e",
        "--epochs",
        "1",
        "--test-run",
        "--cpu",
        "--log-interval",
        "0",
        "--prefix",
        d,
    )
    assert run_cli("train", *args) == 0
    return d


@pytest.fixture()
def images(tmp_path, digits_val):
    """digits val images as PNGs in a tree (sorted names != write order), a corrupt PNG, a text file."""
    x, _ = digits_val
    root = tmp_path / "imgs"
    paths = [root / "a" / "b" / "0.png", root / "a" / "z.png", root / "b.png", root / "c" / "1.png", root / "d.png"]
    paths.append(root / "e.png")
    for p, a in zip(paths, x):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a[0]).save(p)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.txt").write_text("not an image")
    return root, [str(p) for p in paths]


def _hand_probs(model_path, x: np.ndarray) -> torch.Tensor:
    """Softmax of the model on digits images normalised here: (x / 255 - mean) / std."""
    model = load_model(model_path).model
    mean, std = DATA_SETS["digits"].mean[0], DATA_SETS["digits"].std[0]
    t = (torch.from_numpy(x).double() / 255 - mean) / std
    with torch.no_grad():
        return model(t.float()).softmax(1)


def _json(capsys, *args) -> tuple[int, dict, str]:
    rc = run_cli("predict", *args, "--json", "--cpu")
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


def test_folder_json_matches_a_hand_written_pass(run, images, digits_val, capsys):
    root, paths = images
    rc, doc, err = _json(capsys, run, root, "--top-k", "3", "--batch-size", "4")
    assert rc == 1  # one corrupt file: the rest predicted, the run says it was not all
    assert doc["model"] == "tiny_resnet_e" and doc["dataset"] == "digits"
    got = [r["path"] for r in doc["predictions"]]
    assert got == sorted(paths) and len(got) == N_GOOD  # walked recursively in sorted order; notes.txt not listed
    lines = [line for line in err.splitlines() if "skipping" in line]
    assert len(lines) == 1 and lines[0].startswith(f"bitrain predict: skipping {root / 'bad.png'}: unreadable image (")
    assert doc["errors"] == [{"path": str(root / "bad.png"), "error": lines[0].split(": ", 2)[2]}]
    assert "notes.txt" not in err
    want = _hand_probs(run, digits_val[0][[paths.index(p) for p in got]])
    for r, w in zip(doc["predictions"], want):
        top = r["top"]
        assert [c["index"] for c in top] == w.topk(3).indices.tolist()  # most probable first
        assert [c["prob"] for c in top] == pytest.approx(w.topk(3).values.tolist(), abs=1e-6)
        assert all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:])) and sum(c["prob"] for c in top) <= 1 + 1e-6
        assert all(c["class"] == str(c["index"]) for c in top)  # digits' names are the digits


def test_text_output_and_each_bad_input_named_once(run, images, capsys, tmp_path):
    root, paths = images
    (tmp_path / "empty").mkdir()
    rc = run_cli("predict", run, paths[0], root / "notes.txt", tmp_path / "nope.png", tmp_path / "empty", "--cpu")
    out, err = capsys.readouterr()
    assert rc == 1
    (line,) = out.splitlines()
    path, top = line.split(": ", 1)
    assert path == paths[0]
    entries = [e.rsplit(" ", 1) for e in top.split(" | ")]
    assert len(entries) == 5 and all(name in "0123456789" for name, _ in entries)  # --top-k defaults to 5
    probs = [float(p) for _, p in entries]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    skipped = [e for e in err.splitlines() if "skipping" in e]
    assert len(skipped) == 3
    assert f"skipping {tmp_path / 'nope.png'}: no such file or folder" in skipped[0]
    assert f"skipping {tmp_path / 'empty'}: a folder without image files" in skipped[1]
    assert f"skipping {root / 'notes.txt'}: unreadable image" in skipped[2]
    assert "1 image predicted, 3 inputs skipped" in err
    # all of them: 0 (with --top-k over the class count: every class once)
    assert run_cli("predict", run, *paths, "--cpu", "--top-k", "50") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == N_GOOD and all(len(line.split(" | ")) == 10 for line in lines)


def test_packed_export_predicts_like_its_checkpoint(run, images, capsys, tmp_path):
    root, _ = images
    export = tmp_path / "elsewhere" / "model-1bit.safetensors"  # away from the run: its config travels in it
    assert run_cli("export", run / "checkpoints" / "best.pt", export) == 0
    capsys.readouterr()
    _, from_ckpt, _ = _json(capsys, run / "checkpoints" / "best.pt", root, "--top-k", "10")
    _, from_export, _ = _json(capsys, export, root, "--top-k", "10")
    assert from_export["source"] == str(export) and from_export["dataset"] == "digits"
    a, b = from_ckpt["predictions"], from_export["predictions"]
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == N_GOOD
    assert [r["top"][0]["index"] for r in a] == [r["top"][0]["index"] for r in b]
    for ra, rb in zip(a, b):  # plain 1-bit layers: integer counts both ways
        assert [c["prob"] for c in ra["top"]] == pytest.approx([c["prob"] for c in rb["top"]], abs=1e-6)


def test_in_memory_sets_take_the_image_as_it_is_grayscale_and_centre_cropped(run, digits_val, tmp_path):
    x = digits_val[0][0, 0]
    Image.fromarray(x).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([x] * 3, -1)).save(tmp_path / "rgb.png")  # R = G = B: grayscale is exact
    wide = np.random.default_rng(0).integers(0, 256, (8, 24), dtype=np.uint8)
    wide[:, 8:16] = x
    Image.fromarray(wide).save(tmp_path / "wide.png")  # 24x8: the centre 8x8 is the digit
    p = Predictor(run)
    assert (p.size, p.channels, p.classes) == (8, 1, [str(i) for i in range(10)])
    for name in ("gray", "rgb", "wide"):
        got = p.read(str(tmp_path / f"{name}.png"))
        assert got.shape == (1, 8, 8) and np.array_equal(got[0], x), name
    Image.fromarray(np.full((40, 30), 77, dtype=np.uint8)).save(tmp_path / "big.png")
    assert np.array_equal(p.read(str(tmp_path / "big.png")), np.full((1, 8, 8), 77))  # scaled to the model's size


def _folder_model(tmp_path):
    """A hand-written checkpoint of a 3-class image-folder model (16 px) and its data folder."""
    from bitrain.models import build_model
    from bitrain.train.checkpoint import save_checkpoint

    data = tmp_path / "data"
    for c in ("ant", "bee", "cow"):
        (data / "train" / c).mkdir(parents=True)
    args = {"name": "tiny_resnet_e", "num_classes": 3, "in_channels": 3, "image_size": 16}
    torch.manual_seed(0)
    model = build_model(**args)
    for m in model.modules():  # BatchNorm statistics off the defaults, so the classes differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    config = {"dataset": "imagefolder", "data_dir": str(data), "image_size": 16}
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_args": args, "config": config})
    return tmp_path / "ckpt.pt", data, model.eval()


def test_image_folder_model_val_transform_and_folder_names(tmp_path, capsys):
    ckpt, data, model = _folder_model(tmp_path)
    rng = np.random.default_rng(1)
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(pics / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 20), dtype=np.uint8)).save(pics / "b.png")  # grey: RGB for this model
    rc, doc, _ = _json(capsys, ckpt, pics, "--top-k", "2")
    assert rc == 0 and doc["errors"] == []
    paths = [str(pics / "a.jpg"), str(pics / "b.png")]
    assert [r["path"] for r in doc["predictions"]] == paths
    x = torch.from_numpy(np.stack([transform(p, 16, "none", None) for p in paths])).permute(0, 3, 1, 2).double()
    x = (x / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(x.float()).softmax(1).topk(2)
    for r, idx, prob in zip(doc["predictions"], want.indices.tolist(), want.values.tolist()):
        assert [c["index"] for c in r["top"]] == idx
        assert [c["class"] for c in r["top"]] == [("ant", "bee", "cow")[i] for i in idx]  # train/<class> folders
        assert [c["prob"] for c in r["top"]] == pytest.approx(prob, abs=1e-6)
    shutil.rmtree(data)  # the data folder gone: indices only, said once
    rc, doc, err = _json(capsys, ckpt, pics)
    assert rc == 0 and all(c["class"] is None for r in doc["predictions"] for c in r["top"])
    assert f"class names: {data / 'train'} is not there (pass --data-dir); indices only" in err
    assert run_cli("predict", ckpt, pics / "a.jpg", "--cpu") == 0
    assert capsys.readouterr().out.split(": ", 1)[1].startswith("#")


def test_usage_and_model_errors_exit_2(run, images, tmp_path, capsys):
    root, paths = images
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    cases = [
        ((tmp_path / "garbage.pt", paths[0]), "is unreadable or unsafe"),
        ((tmp_path / "missing", paths[0]), "does not exist"),
        ((run, paths[0], "--top-k", "0"), "--top-k must be at least 1"),
        ((run, paths[0], "--batch-size", "0"), "--batch-size must be at least 1"),
        ((run, paths[0], "--dataset", "cifar10"), "--dataset cifar10 has 3-channel images, the model takes 1"),
        ((run, root / "bad.png", tmp_path / "nope.png"), "none of the 2 inputs held a readable image"),
    ]
    for args, message in cases:
        assert run_cli("predict", *args, "--cpu") == 2, message
        assert message in capsys.readouterr().err
    assert run_cli("--help") == 0 and "  predict  top-k classes" in capsys.readouterr().out


def test_image_files_and_class_name_records(tmp_path):
    (tmp_path / "B").mkdir()
    for name in ("B/x.JPG", "a.png", "c.txt", "B/y.webp"):
        (tmp_path / name).write_bytes(b"")
    files, bad = image_files([tmp_path, tmp_path / "c.txt"])
    assert files == [str(tmp_path / n) for n in ("B/x.JPG", "B/y.webp", "a.png", "c.txt")] and bad == []
    for spec in DATA_SETS.values():  # every name list numbers all the classes, once each
        assert not spec.classes or len(set(spec.classes)) == len(spec.classes) == spec.num_classes, spec.name
    assert DATA_SETS["fashion-mnist"].classes[9] == "Ankle boot" and DATA_SETS["cifar10"].classes[3] == "cat"
