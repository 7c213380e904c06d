"""train/loss.py: the Loss object's values (label smoothing, mixup, distillation), its mixup draws as a
function of (seed, step, rank), and its range checks (one home, for the API and the CLI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.errors import UserError
from bitrain.train.loss import Loss, cutmix_params, distillation_loss, mix_inputs, mixup_params, use_cutmix


def _batch(n: int = 8, classes: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, classes, generator=g), torch.arange(n) % classes, torch.randn(n, 3, 4, 4, generator=g)


def test_plain_and_label_smoothed_cross_entropy():
    logits, y, x = _batch()
    assert torch.equal(Loss()(logits, y, x), F.cross_entropy(logits, y))
    want = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.equal(Loss(label_smoothing=0.1)(logits, y, x), want)


def test_mixup_mixes_inputs_and_targets_with_the_draw_of_seed_step_rank():
    logits, y, x = _batch()
    loss = Loss(mixup_alpha=0.2, seed=7)
    mixed, mix = loss.mix(x, y, epoch=0, step=3, rank=1)
    lam, perm = mixup_params(7, 3, 1, 8, 0.2)
    assert mix[0] == lam and torch.equal(mix[1], perm)
    assert torch.equal(mixed, mix_inputs(x, lam, perm))
    want = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert loss(logits, y, mixed, mix).item() == pytest.approx(want.item(), rel=1e-6)
    again = Loss(mixup_alpha=0.2, seed=7).mix(x, y, epoch=5, step=3, rank=1)[1]
    assert again[0] == lam  # a resumed run draws the same
    assert loss.mix(x, y, epoch=0, step=4, rank=1)[1][0] != lam


def test_mixup_is_off_without_alpha_and_from_its_off_epoch():
    _, y, x = _batch()
    assert Loss().mix(x, y, 0, 0, 0) == (x, None)
    off = Loss(mixup_alpha=0.2, mixup_off_epoch=2)
    assert off.mix(x, y, 1, 0, 0)[1] is not None
    assert off.mix(x, y, 2, 0, 0) == (x, None)


def test_cutmix_box_area_matches_the_corrected_lambda_and_pastes_the_permuted_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 12, 10, generator=g)
    inside = torch.zeros(12, 10, dtype=torch.bool)
    lams = []
    for step in range(40):
        lam, perm, (y0, y1, x0, x1) = cutmix_params(7, step, 0, 8, 1.0, 12, 10)
        assert 0 <= y0 <= y1 <= 12 and 0 <= x0 <= x1 <= 10
        assert lam == 1 - (y1 - y0) * (x1 - x0) / 120  # timm's correction: the share left outside the box
        lams.append(lam)
        mixed, mix = Loss(cutmix_alpha=1.0, seed=7).mix(x, torch.arange(8), epoch=0, step=step, rank=0)
        assert mix[0] == lam and torch.equal(mix[1], perm)
        inside.zero_()
        inside[y0:y1, x0:x1] = True
        assert torch.equal(mixed[:, :, inside], x[perm][:, :, inside])
        assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
    assert len(set(lams)) > 10 and min(lams) < 0.5 < max(lams)


def test_cutmix_is_a_function_of_seed_step_rank_and_mixes_labels_by_its_lambda():
    logits, y, x = _batch()
    a = cutmix_params(3, 5, 1, 8, 1.0, 4, 4)
    b = cutmix_params(3, 5, 1, 8, 1.0, 4, 4)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert any(cutmix_params(3, s, 1, 8, 1.0, 4, 4)[2] != a[2] for s in range(6, 10))
    loss = Loss(cutmix_alpha=1.0, seed=3)
    mixed, (lam, perm) = loss.mix(x, y, epoch=0, step=5, rank=1)
    assert lam == a[0]
    want = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert loss(logits, y, mixed, (lam, perm)).item() == pytest.approx(want.item(), rel=1e-6)


def test_mixup_switch_prob_picks_cutmix_as_timm():
    _, y, x = _batch()
    for p, share in ((0.0, 0.0), (1.0, 1.0)):
        loss = Loss(mixup_alpha=0.2, cutmix_alpha=1.0, mixup_switch_prob=p, seed=3)
        cut = [loss.mix(x, y, 0, step, 0)[1][0] == cutmix_params(3, step, 0, 8, 1.0, 4, 4)[0] for step in range(20)]
        assert sum(cut) / 20 == share
    picks = sum(use_cutmix(3, step, 0, 0.3) for step in range(1000))
    assert 250 < picks < 350
    loss = Loss(mixup_alpha=0.2, cutmix_alpha=1.0, seed=3)
    for step in range(10):  # the mix of a step is the one its switch draw picks
        lam = loss.mix(x, y, 0, step, 0)[1][0]
        pick = cutmix_params if use_cutmix(3, step, 0, 0.5) else None
        want = pick(3, step, 0, 8, 1.0, 4, 4)[0] if pick else mixup_params(3, step, 0, 8, 0.2)[0]
        assert lam == want
    assert Loss(cutmix_alpha=1.0, mixup_off_epoch=2).mix(x, y, 2, 0, 0) == (x, None)


def test_distillation_mixes_label_and_teacher_loss_by_alpha():
    logits, y, x = _batch()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    t_logits = teacher(x).detach()
    for alpha, temp in ((0.0, 1.0), (0.3, 2.0), (1.0, 4.0)):
        loss = Loss(teacher=teacher, distill_alpha=alpha, distill_temperature=temp)
        want = (1 - alpha) * F.cross_entropy(logits, y) + alpha * distillation_loss(logits, t_logits, temp)
        assert loss(logits, y, x).item() == pytest.approx(want.item(), rel=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1)"),
        ({"label_smoothing": -0.1}, "--label-smoothing must be in [0, 1)"),
        ({"mixup_alpha": 0.0}, "--mixup-alpha must be positive"),
        ({"distill_temperature": 0.0}, "--distill-temperature must be positive"),
        ({"distill_alpha": 1.5}, "--distill-alpha must be in [0, 1]"),
        ({"distill_alpha": -0.5}, "--distill-alpha must be in [0, 1]"),
        ({"cutmix_alpha": 0.0}, "--cutmix must be positive"),
        ({"mixup_switch_prob": 1.5}, "--mixup-switch-prob must be in [0, 1]"),
    ],
)
def test_range_checks_name_the_option(kwargs, needle):
    with pytest.raises(UserError) as e:
        Loss(**kwargs)
    assert needle in str(e.value)
