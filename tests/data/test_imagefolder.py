"""Image-folder loader: tree scanning, worker-count independence, set_epoch, transforms, errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitrain.data import build_data
from bitrain.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    color_jitter,
    pca_lighting,
    random_resized_crop_box,
    scan_split,
    transform,
)
from bitrain.errors import UserError

CLASSES = ("ant", "bee", "cow")


def make_tree(root: Path, n_train=6, n_val=3, seed=0) -> Path:
    """Random JPEG/PNG images of varied sizes (some grey, some RGBA) in train/ and val/."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(a)
                if i % 4 == 1:
                    img = img.convert("L")
                elif i % 4 == 2:
                    img = img.convert("RGBA")
                img.save(d / (f"{i:02d}.png" if i % 4 >= 2 else f"{i:02d}.jpg"))
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image, not listed")
    return root


def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_scan_split_labels_and_info(tmp_path):
    root = make_tree(tmp_path)
    classes, paths, labels = scan_split(root, "train")
    assert classes == list(CLASSES) and len(paths) == 18
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert all(p.endswith((".jpg", ".png")) for p in paths)
    tr, va, info = build_data("imagefolder", data_dir=str(root), batch_size=4, num_workers=0, image_size=16)
    assert (info.num_classes, info.in_channels, info.image_size, info.num_train, info.num_val) == (3, 3, 16, 18, 9)
    assert info.mean == IMAGENET_MEAN and info.std == IMAGENET_STD
    assert len(tr) == 4 and tr.num_samples == 16 and len(va) == 3 and va.num_samples == 9
    ys = torch.cat([y for _, y in va])
    assert ys.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, _ = next(iter(tr))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32


@pytest.mark.parametrize("aug", ["low", "medium", "high"])
def test_batches_do_not_depend_on_num_workers(tmp_path, aug):
    root = make_tree(tmp_path)
    runs = []
    for workers in (0, 2):
        tr, va, _ = build_data(
            "imagefolder",
            data_dir=str(root),
            batch_size=4,
            num_workers=workers,
            augmentation=aug,
            image_size=16,
            seed=3,
        )
        runs.append((_epoch(tr, 1), _epoch(va, 0)))
    assert _same(runs[0][0], runs[1][0]) and _same(runs[0][1], runs[1][1])


def test_set_epoch_purity_and_start(tmp_path):
    root = make_tree(tmp_path)
    tr, _, _ = build_data(
        "imagefolder", data_dir=str(root), batch_size=4, num_workers=1, augmentation="high", image_size=16
    )
    e2 = _epoch(tr, 2)
    assert not _same(_epoch(tr, 1), e2)  # reshuffled and re-augmented
    assert _same(_epoch(tr, 2, start=2), e2[2:])
    fresh, _, _ = build_data(
        "imagefolder", data_dir=str(root), batch_size=4, num_workers=0, augmentation="high", image_size=16
    )
    assert _same(_epoch(fresh, 2, start=3), e2[3:])
    assert len(list(tr)) == len(tr)  # start applied to one iteration only


def test_two_rank_shards(tmp_path):
    root = make_tree(tmp_path, n_train=7, n_val=3)  # 21 train, 9 val
    trs, vals = [], []
    for r in range(2):
        tr, va, _ = build_data(
            "imagefolder", data_dir=str(root), batch_size=4, num_workers=0, rank=r, world_size=2, image_size=8
        )
        trs.append(tr)
        vals.append(va)
    assert len(trs[0]) == len(trs[1]) == 2
    idx = [sum(t.epoch_batches(5), []) for t in trs]
    assert not set(idx[0]) & set(idx[1]) and len(set(idx[0]) | set(idx[1])) == 16
    val_idx = sum(vals[0].epoch_batches(0), []) + sum(vals[1].epoch_batches(0), [])
    assert val_idx == list(range(9))
    assert sum(len(y) for _, y in vals[0]) + sum(len(y) for _, y in vals[1]) == 9


def test_corrupt_images_are_replaced_named_once_and_counted(tmp_path, capsys):
    root = make_tree(tmp_path)
    bad = root / "train" / "bee" / "00.jpg"  # sample 6; sample 7 (bee/01) replaces it
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    tr, _, _ = build_data(
        "imagefolder", data_dir=str(root), batch_size=18, num_workers=0, augmentation="none", image_size=8
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a line on stderr, not a Python warning with a source line
        x, y = next(iter(tr))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"skipping unreadable image {bad} (")
    assert err[0].endswith("; using the next file in its place")
    assert x.shape[0] == 18 and tr.num_skipped == 1 and tr.skipped_files == {str(bad)}
    order = tr.epoch_batches(0)[0]
    pos_bad, pos_next = order.index(6), order.index(7)
    assert torch.equal(x[pos_bad], x[pos_next]) and y[pos_bad] == y[pos_next] == 1
    list(tr)
    assert capsys.readouterr().err == ""  # named once per file; still counted
    assert tr.num_skipped == 2


def _corrupt_val(root: Path) -> Path:
    bad = root / "val" / "bee" / "01.jpg"  # val sample 4 of 9
    bad.write_bytes(b"\xff\xd8 truncated jpeg")
    return bad


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_val_image_is_left_out_and_counted(tmp_path, capsys, workers):
    root = make_tree(tmp_path)
    _, va_ok, _ = build_data("imagefolder", data_dir=str(root), batch_size=4, num_workers=0, image_size=8)
    clean = _epoch(va_ok, 0)
    bad = _corrupt_val(root)
    _, va, _ = build_data("imagefolder", data_dir=str(root), batch_size=4, num_workers=workers, image_size=8)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _epoch(va, 0)
    # batch 1 (samples 4..7) lost sample 4; no duplicate of another file in its place
    assert [len(y) for _, y in got] == [4, 3, 1]
    assert torch.cat([y for _, y in got]).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert torch.equal(got[1][0], clean[1][0][1:]) and torch.equal(got[0][0], clean[0][0])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"skipping unreadable image {bad} (") and err[0].endswith("; left out of validation")
    assert err[1:] == ["val: 1 unreadable image skipped; the metrics are over the other 8"]
    assert va.num_left_out == 1 and va.skipped_files == {str(bad)}
    again = _epoch(va, 0)  # the same pass again: the same batches, nothing printed again
    assert _same(got, again) and capsys.readouterr().err == "" and va.num_skipped == 2


def test_val_metrics_are_over_the_readable_images_only(tmp_path):
    from bitrain.train.evaluation import evaluate

    root = make_tree(tmp_path)
    _, va_ok, _ = build_data("imagefolder", data_dir=str(root), batch_size=4, num_workers=0, image_size=8)
    clean = _epoch(va_ok, 0)
    _corrupt_val(root)
    _, va, _ = build_data("imagefolder", data_dir=str(root), batch_size=4, num_workers=0, image_size=8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    m = evaluate(model, va)
    x = torch.cat([x for x, _ in clean])
    y = torch.cat([y for _, y in clean])
    keep = torch.arange(9) != 4
    with torch.no_grad():
        logits = model(x[keep])
    assert m["samples"] == 8
    assert m["acc1"] == pytest.approx(float((logits.argmax(1) == y[keep]).float().mean()))
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y[keep])), rel=1e-5)


def test_corrupt_val_image_two_rank_shards_stay_exact(tmp_path, capsys):
    root = make_tree(tmp_path)
    bad = _corrupt_val(root)
    ys = []
    for r in range(2):
        _, va, _ = build_data(
            "imagefolder", data_dir=str(root), batch_size=2, num_workers=0, rank=r, world_size=2, image_size=8
        )
        ys.append(torch.cat([y for _, y in _epoch(va, 0)]).tolist())
    assert ys[0] + ys[1] == [0, 0, 0, 1, 1, 2, 2, 2]  # each readable file once, the bad one nowhere
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith(f"skipping unreadable image {bad} (") for line in err) == 1
    assert err[1:] == ["val (rank 1): 1 unreadable image skipped; the metrics are over the other 4"]  # 4..8


def test_val_of_unreadable_images_only_is_a_user_error(tmp_path):
    root = make_tree(tmp_path, n_train=2, n_val=1)
    for p in (root / "val").rglob("*.*g"):
        p.write_bytes(b"junk")
    _, va, _ = build_data("imagefolder", data_dir=str(root), batch_size=2, num_workers=0, image_size=8)
    with pytest.raises(UserError, match="3 unreadable images in a row"):
        list(va)


def test_train_run_names_each_bad_file_once_on_one_line(tmp_path, capfd):
    from conftest import read_rows, run_cli

    root = make_tree(tmp_path / "data")
    bad_train = root / "train" / "cow" / "02.png"
    bad_train.write_bytes(b"\x89PNG junk")
    bad_val = _corrupt_val(root)
    run = tmp_path / "run"
    assert (
        run_cli(
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            root,
            "--image-size",
            "8",
            "--cpu",
            "--model",
            "tiny_resnet_e",
            "--batch-size",
            "6",
            "--epochs",
            "2",
            "--prefix",
            run,
        )
        == 0
    )
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "unreadable" in line]
    assert sum(str(bad_train) in line for line in lines) == 1 and sum(str(bad_val) in line for line in lines) == 1
    assert lines.count("val: 1 unreadable image skipped; the metrics are over the other 8") == 1
    assert "Warning" not in err and "for x, y in" not in err
    assert len(read_rows(run, "val")) == 2


def test_all_corrupt_is_a_user_error(tmp_path):
    root = make_tree(tmp_path, n_train=2, n_val=1)
    for p in (root / "train").rglob("*.*g"):
        p.write_bytes(b"junk")
    tr, _, _ = build_data("imagefolder", data_dir=str(root), batch_size=2, num_workers=0, image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="unreadable images in a row"):
            next(iter(tr))


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="--data-dir is required for imagenet"):
        build_data("imagenet", batch_size=2)
    with pytest.raises(UserError, match="not a folder"):
        build_data("imagenet", data_dir=str(tmp_path / "nope"), batch_size=2)
    with pytest.raises(UserError, match="missing folder .*train"):
        build_data("imagefolder", data_dir=str(tmp_path), batch_size=2)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        build_data("imagefolder", data_dir=str(tmp_path), batch_size=2)
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(UserError, match="no images"):
        build_data("imagefolder", data_dir=str(tmp_path), batch_size=2)
    root = make_tree(tmp_path / "t")
    (root / "val" / "zebra").mkdir()
    with pytest.raises(UserError, match="classes not in the train split: zebra"):
        build_data("imagefolder", data_dir=str(root), batch_size=2)
    (root / "val" / "zebra").rmdir()
    with pytest.raises(UserError, match=r"--batch-size 10 .* 9 samples"):
        build_data("imagefolder", data_dir=str(root), batch_size=10, world_size=2)


def test_val_transform_resize_then_centre_crop(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = transform(str(tmp_path / "x.png"), 16, "medium", None)
    short = math.ceil(16 / 0.875)  # 19, as 256 for 224
    ref = Image.fromarray(a).resize((round(60 * short / 40), short), Image.BILINEAR)
    x0, y0 = (ref.size[0] - 16) // 2, (ref.size[1] - 16) // 2
    assert out.shape == (16, 16, 3) and np.array_equal(out, np.asarray(ref)[y0 : y0 + 16, x0 : x0 + 16])


def test_random_resized_crop_box_ranges():
    rng = np.random.default_rng(0)
    areas, aspects = [], []
    for _ in range(2000):
        x0, y0, cw, ch = random_resized_crop_box(300, 200, rng)
        assert 0 <= x0 and x0 + cw <= 300 and 0 <= y0 and y0 + ch <= 200 and cw > 0 and ch > 0
        areas.append(cw * ch / 60000)
        aspects.append(cw / ch)
    areas, aspects = np.array(areas), np.array(aspects)
    # area ~ U(0.08, 1), minus the tries that do not fit (large areas at extreme aspects)
    assert areas.min() > 0.07 and areas.max() <= 1.0 and 0.3 < np.median(areas) < 0.55
    assert aspects.min() > 0.74 and aspects.max() < 1.35
    # impossible tries fall back to the centre crop with the aspect clamped into [3/4, 4/3]
    assert random_resized_crop_box(400, 20, np.random.default_rng(0), scale=(1.0, 1.0)) == (186, 0, 27, 20)


def test_train_flip_happens_about_half_the_time(tmp_path):
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))  # bright to the right
    Image.fromarray(ramp).save(tmp_path / "r.png")
    flips = []
    for i in range(400):
        out = transform(str(tmp_path / "r.png"), 32, "low", np.random.default_rng([0, 0, i]))
        flips.append(int(out[0, 0, 0]) > int(out[0, -1, 0]))
    assert 0.42 < np.mean(flips) < 0.58
    unflipped = [transform(str(tmp_path / "r.png"), 32, "crop", np.random.default_rng([0, 0, i])) for i in range(50)]
    assert all(int(o[0, 0, 0]) < int(o[0, -1, 0]) for o in unflipped)


def test_colour_jitter_and_lighting():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(color_jitter(a, np.random.default_rng(1), strength=0.0), a, rtol=1e-6)
    shifted = pca_lighting(a, np.random.default_rng(2))
    delta = shifted - a
    assert np.allclose(delta, delta[0, 0], atol=1e-4) and 0 < np.abs(delta[0, 0]).max() < 30  # one RGB offset
    grey = np.full((4, 4, 3), 100, np.float32)
    # contrast and saturation leave a flat grey image alone; brightness scales it
    j = color_jitter(grey, np.random.default_rng(3))
    assert np.allclose(j, j[0, 0, 0]) and 60 <= j[0, 0, 0] <= 140
