"""train/loss.py: the Loss object's values (label smoothing, mixup, distillation), its mixup draws as a
function of (seed, step, rank), and its range checks (one home, for the API and the CLI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.errors import UserError
from bitrain.train.loss import Loss, distillation_loss, mix_inputs, mixup_params


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
    ],
)
def test_range_checks_name_the_option(kwargs, needle):
    with pytest.raises(UserError) as e:
        Loss(**kwargs)
    assert needle in str(e.value)
