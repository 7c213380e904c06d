"""Device-resident loader: order, sharding, set_epoch purity, augmentation, normalisation."""

from __future__ import annotations

import pytest
import torch

from bitrain.data.loader import DeviceLoader, epoch_permutation, mix_seed, val_shard
from bitrain.errors import UserError


def _indexed(n: int, c: int = 1, s: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose labels are their own index, so batches reveal which samples they hold."""
    images = (torch.arange(n * c * s * s) % 251).to(torch.uint8).view(n, c, s, s)
    return images, torch.arange(n)


def _loader(n=37, bs=4, train=True, **kw) -> DeviceLoader:
    images, labels = _indexed(n)
    return DeviceLoader(images, labels, batch_size=bs, train=train, mean=(0.5,), std=(0.25,), **kw)


def _labels(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


def test_mix_seed_and_permutation_are_pure():
    assert mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(2, 1)
    p0, p0b, p1 = epoch_permutation(50, 7, 0), epoch_permutation(50, 7, 0), epoch_permutation(50, 7, 1)
    assert torch.equal(p0, p0b) and not torch.equal(p0, p1)
    assert sorted(p0.tolist()) == list(range(50))


def test_train_epoch_reshuffles_drops_tail_and_counts():
    ld = _loader(n=37, bs=4)
    assert len(ld) == 9 and ld.num_samples == 36
    e0 = _labels(ld)
    assert len(e0) == 9 and all(len(b) == 4 for b in e0)
    flat = sum(e0, [])
    assert len(set(flat)) == 36  # no repeats inside an epoch
    assert flat == epoch_permutation(37, 123, 0)[:36].tolist()
    ld.set_epoch(1)
    assert sum(_labels(ld), []) != flat
    ld.set_epoch(0)
    assert _labels(ld) == e0


def test_set_epoch_start_and_purity():
    ld = _loader(n=40, bs=4, pad=1, flip=True)
    ld.set_epoch(3)
    full = [(x.clone(), y.clone()) for x, y in ld]
    # batch k alone, with start=k, without reading batches 0..k-1
    for k in (0, 5, 9):
        fresh = _loader(n=40, bs=4, pad=1, flip=True)
        fresh.set_epoch(3, start=k)
        got = list(fresh)
        assert len(got) == 10 - k
        assert torch.equal(got[0][0], full[k][0]) and torch.equal(got[0][1], full[k][1])
    # start applies once: the next iteration is the whole epoch again
    ld.set_epoch(3, start=8)
    assert len(list(ld)) == 2 and len(list(ld)) == 10
    # reading other epochs in between changes nothing
    ld.set_epoch(0)
    list(ld)
    ld.set_epoch(3)
    again = list(ld)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, full))
    with pytest.raises(ValueError):
        ld.set_epoch(0, start=11)


def test_two_rank_train_shards_disjoint_and_cover_epoch():
    n, bs = 43, 4
    ranks = [_loader(n=n, bs=bs, rank=r, world_size=2) for r in range(2)]
    for ld in ranks:
        ld.set_epoch(2)
    got = [_labels(ld) for ld in ranks]
    assert len(got[0]) == len(got[1]) == n // (2 * bs) == len(ranks[0])
    s0, s1 = set(sum(got[0], [])), set(sum(got[1], []))
    assert not s0 & s1
    perm = epoch_permutation(n, 123, 2).tolist()
    assert s0 | s1 == set(perm[: 2 * bs * (n // (2 * bs))])  # the epoch minus the dropped tail
    # global step k of 2 ranks x 4 == step k of 1 rank x 8, augmentation included
    single = _loader(n=n, bs=2 * bs, pad=1, flip=True)
    pair = [_loader(n=n, bs=bs, rank=r, world_size=2, pad=1, flip=True) for r in range(2)]
    for ld in (single, *pair):
        ld.set_epoch(2)
    for (xs, ys), (x0, y0), (x1, y1) in zip(single, *pair):
        assert torch.equal(ys, torch.cat([y0, y1])) and torch.equal(xs, torch.cat([x0, x1]))


@pytest.mark.parametrize("n,world,bs", [(37, 2, 5), (10, 3, 4), (7, 4, 1), (3, 4, 2)])
def test_val_shards_cover_every_sample_once(n, world, bs):
    seen = []
    for r in range(world):
        ld = _loader(n=n, bs=bs, train=False, rank=r, world_size=world)
        batches = _labels(ld)
        assert len(batches) == len(ld)
        assert all(len(b) <= bs for b in batches)
        assert sum(map(len, batches)) == ld.num_samples == val_shard(n, r, world)[1] - val_shard(n, r, world)[0]
        seen += sum(batches, [])
    assert seen == list(range(n))  # fixed order, each sample exactly once


def test_val_is_normalised_and_unaugmented():
    images = torch.randint(0, 256, (9, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    ld = DeviceLoader(images, torch.zeros(9, dtype=torch.long), batch_size=4, train=False, mean=mean, std=std)
    x = torch.cat([b for b, _ in ld])
    ref = (images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and x.shape == (9, 3, 5, 5)
    torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=0)


def test_dtype_and_channels_last():
    images, labels = _indexed(16, c=3, s=6)
    ld = DeviceLoader(
        images,
        labels,
        batch_size=8,
        train=True,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        pad=2,
        flip=True,
        dtype=torch.bfloat16,
        channels_last=True,
    )
    x, y = next(iter(ld))
    assert x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    ld2 = DeviceLoader(images, labels, batch_size=8, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, pad=2, flip=True)
    x2, _ = next(iter(ld2))
    assert x2.is_contiguous()
    torch.testing.assert_close(x.float(), x2, atol=0.02, rtol=0.01)


def _coord_images(n: int, s: int) -> torch.Tensor:
    """Channel 0 holds row+1, channel 1 col+1 (0 is reserved for the zero padding)."""
    ar = torch.arange(1, s + 1, dtype=torch.uint8)
    img = torch.stack([ar.view(s, 1).expand(s, s), ar.view(1, s).expand(s, s)])
    return img.expand(n, 2, s, s).contiguous()


def test_crop_offsets_in_range_and_flip_half_the_time():
    n, s, pad = 2048, 8, 3
    ld = DeviceLoader(
        _coord_images(n, s),
        torch.zeros(n, dtype=torch.long),
        batch_size=256,
        train=True,
        mean=(0.0, 0.0),
        std=(1.0, 1.0),
        pad=pad,
        flip=True,
        seed=5,
    )
    x = torch.cat([b for b, _ in ld]).mul(255).round().long()  # back to raw pixel values
    rows, cols = x[:, 0], x[:, 1]  # (N, s, s)
    ar = torch.arange(s)
    # rows: valid entries are (i + dy + 1); recover dy from any valid pixel of each sample
    dys, dxs, flips = [], [], []
    for r, c in zip(rows, cols):
        rr, cc = r.amax(1), c.amax(0)  # per output row / column: source index + 1, or 0 if padding
        ri = (rr - 1 - ar)[rr > 0]
        assert ri.numel() and (ri == ri[0]).all()  # a rigid shift
        dys.append(int(ri[0]))
        fwd = (cc - 1 - ar)[cc > 0]
        bwd = (cc - 1 - (s - 1 - ar))[cc > 0]
        if (fwd == fwd[0]).all() and not (bwd == bwd[0]).all():
            flips.append(0)
            dxs.append(int(fwd[0]))
        else:
            assert (bwd == bwd[0]).all()
            flips.append(1)
            dxs.append(int(bwd[0]))
        # padded pixels are exactly zero in both channels
        assert ((r == 0) == (c == 0)).all()
    dys, dxs, flips = map(torch.tensor, (dys, dxs, flips))
    assert dys.min() == -pad and dys.max() == pad and dxs.min() == -pad and dxs.max() == pad
    counts = torch.bincount(dys + pad, minlength=2 * pad + 1).float() / n
    assert (counts - 1 / (2 * pad + 1)).abs().max() < 0.04  # uniform offsets
    assert 0.45 < flips.float().mean() < 0.55


def test_flip_only_and_no_augmentation():
    n, s = 512, 6
    imgs = _coord_images(n, s)
    kw = dict(batch_size=128, train=True, mean=(0.0, 0.0), std=(1.0, 1.0))
    x = torch.cat([b for b, _ in DeviceLoader(imgs, torch.zeros(n, dtype=torch.long), flip=True, **kw)])
    cols = x[:, 1, 0].mul(255).round()
    flipped = (cols[:, 0] == s).float()
    assert ((cols[:, 0] == 1) | (cols[:, 0] == s)).all()
    assert 0.4 < flipped.mean() < 0.6
    x = torch.cat([b for b, _ in DeviceLoader(imgs, torch.zeros(n, dtype=torch.long), **kw)])
    assert torch.equal(x.mul(255).round().to(torch.uint8), imgs[: x.shape[0]])


def test_batch_size_errors_name_both_numbers():
    images, labels = _indexed(10)
    with pytest.raises(UserError, match=r"--batch-size 6 .* 5 samples"):
        DeviceLoader(images, labels, batch_size=6, train=True, mean=(0.5,), std=(0.25,), world_size=2)
    with pytest.raises(UserError, match="batch-size"):
        DeviceLoader(images, labels, batch_size=0, train=False, mean=(0.5,), std=(0.25,))
    # val may be smaller than a batch: one partial batch
    assert len(DeviceLoader(images, labels, batch_size=64, train=False, mean=(0.5,), std=(0.25,))) == 1
