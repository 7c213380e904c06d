"""The training loss as one object built outside the loop: cross-entropy with label smoothing, mixup
(gluoncv's ``--mixup``) and CutMix (timm's ``--cutmix``, ``--mixup-switch-prob``) drawn as pure functions
of (seed, step, rank), so resume needs no RNG state, and knowledge distillation from a teacher's logits.
Its options are range-checked here, once."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.errors import UserError

Mix = tuple[float, torch.Tensor]  # (lambda, a permutation of the batch)


def _key(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


def _beta(alpha: float, g: torch.Generator) -> float:
    a = torch._standard_gamma(torch.full((2,), float(alpha)), generator=g)  # Beta as a ratio of Gammas
    return float(a[0] / a.sum())


def mixup_params(seed: int, step: int, rank: int, batch: int, alpha: float) -> Mix:
    """(lambda ~ Beta(alpha, alpha), a permutation of the batch), drawn from a generator seeded by
    (seed, step, rank) so that a resumed run draws the same values."""
    g = torch.Generator().manual_seed(_key(seed, step, rank))
    return _beta(alpha, g), torch.randperm(batch, generator=g)


Box = tuple[int, int, int, int]  # rows y0:y1, columns x0:x1


def cutmix_params(
    seed: int, step: int, rank: int, batch: int, alpha: float, height: int, width: int
) -> tuple[float, torch.Tensor, Box]:
    """(lambda, a permutation, the box) of a CutMix step, a function of (seed, step, rank) as mixup's.
    timm's ``rand_bbox``: a box of sides ``sqrt(1 - lam)`` times the image's around a uniform centre,
    clipped to the image; lambda corrected to the share of the image left outside the box."""
    g = torch.Generator().manual_seed(_key(seed, step, rank) * 3 + 2)
    lam, perm = _beta(alpha, g), torch.randperm(batch, generator=g)
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = (int(torch.randint(0, n, (1,), generator=g)) for n in (height, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return 1 - (y1 - y0) * (x1 - x0) / (height * width), perm, (y0, y1, x0, x1)


def use_cutmix(seed: int, step: int, rank: int, switch_prob: float) -> bool:
    """With mixup and CutMix both on: whether step ``step`` uses CutMix (probability ``switch_prob``)."""
    g = torch.Generator().manual_seed(_key(seed, step, rank) * 3 + 1)
    return float(torch.rand((), generator=g)) < switch_prob


def cut_inputs(x: torch.Tensor, perm: torch.Tensor, box: Box) -> torch.Tensor:
    """x with ``box`` pasted from x[perm] (on x's device); x: (N, C, H, W)."""
    y0, y1, x0, x1 = box
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm.to(x.device), :, y0:y1, x0:x1]
    return out


def mix_inputs(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm]; x: (N, C, H, W)."""
    return lam * x + (1 - lam) * x[perm.to(x.device)]


def mixed_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The loss on mixed one-hot targets, which is the same mix of the two hard-label losses."""
    a = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    b = F.cross_entropy(logits, y[perm.to(y.device)], label_smoothing=label_smoothing)
    return lam * a + (1 - lam) * b


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et al.), per
    sample; at T = 1 ReActNet's distributional loss (the cross-entropy to the teacher's distribution
    minus its constant entropy)."""
    t = float(temperature)
    student = F.log_softmax(logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


class Loss:
    """What a train step minimises: ``(1 - a) * CE(logits, y) + a * T^2 * KL(teacher || student)``.

    ``label_smoothing`` in [0, 1); ``mixup_alpha`` > 0 turns mixup on, ``cutmix_alpha`` > 0 CutMix (None:
    off; both on: CutMix with probability ``mixup_switch_prob`` per step, as timm) until epoch
    ``mixup_off_epoch`` (0: never off), their draws a function of (``seed``, step, rank); ``teacher``
    (eval mode, no gradients, never saved) with ``distill_alpha`` = a in [0, 1] and
    ``distill_temperature`` = T > 0. Without a teacher the loss is the label loss alone.
    """

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        mixup_alpha: float | None = None,
        mixup_off_epoch: int = 0,
        cutmix_alpha: float | None = None,
        mixup_switch_prob: float = 0.5,
        seed: int = 123,
        teacher: nn.Module | None = None,
        distill_alpha: float = 1.0,
        distill_temperature: float = 1.0,
    ) -> None:
        _need(0 <= label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {label_smoothing}")
        _need(mixup_alpha is None or mixup_alpha > 0, f"--mixup-alpha must be positive, got {mixup_alpha}")
        _need(cutmix_alpha is None or cutmix_alpha > 0, f"--cutmix must be positive, got {cutmix_alpha}")
        _need(0 <= mixup_switch_prob <= 1, f"--mixup-switch-prob must be in [0, 1], got {mixup_switch_prob}")
        _need(distill_temperature > 0, f"--distill-temperature must be positive, got {distill_temperature}")
        _need(0 <= distill_alpha <= 1, f"--distill-alpha must be in [0, 1], got {distill_alpha}")
        self.label_smoothing, self.seed = label_smoothing, seed
        self.mixup_alpha, self.mixup_off_epoch = mixup_alpha, mixup_off_epoch
        self.cutmix_alpha, self.mixup_switch_prob = cutmix_alpha, mixup_switch_prob
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.distill_alpha, self.distill_temperature = distill_alpha, distill_temperature

    def to(self, device: torch.device | str) -> Loss:
        """Move the teacher to ``device``; returns self."""
        if self.teacher is not None:
            self.teacher = self.teacher.to(device)
        return self

    def mix(
        self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int, rank: int
    ) -> tuple[torch.Tensor, Mix | None]:
        """The step's (mixed) input and its mix, or ``(x, None)`` when mixup and CutMix are off at ``epoch``."""
        if not (self.mixup_alpha or self.cutmix_alpha) or (self.mixup_off_epoch and epoch >= self.mixup_off_epoch):
            return x, None
        if self.cutmix_alpha and (not self.mixup_alpha or use_cutmix(self.seed, step, rank, self.mixup_switch_prob)):
            lam, perm, box = cutmix_params(self.seed, step, rank, y.shape[0], self.cutmix_alpha, *x.shape[-2:])
            return cut_inputs(x, perm, box), (lam, perm)
        mix = mixup_params(self.seed, step, rank, y.shape[0], self.mixup_alpha)
        return mix_inputs(x, *mix), mix

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, mix: Mix | None = None) -> torch.Tensor:
        """The loss of ``logits`` (N, classes) for labels ``y`` (N,); the teacher sees the same (mixed) ``x``."""
        teacher_logits = self._teacher_logits(x)
        logits = logits.float()
        alpha = self.distill_alpha if teacher_logits is not None else 0.0
        loss = 0.0
        if alpha < 1:  # the label loss
            if mix is None:
                loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            else:
                loss = mixed_cross_entropy(logits, y, *mix, label_smoothing=self.label_smoothing)
            loss = loss * (1 - alpha) if alpha else loss
        if alpha > 0:  # the teacher's distribution on the same (mixed) input
            loss = loss + alpha * distillation_loss(logits, teacher_logits, self.distill_temperature)
        return loss

    @torch.no_grad()
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.teacher is None else self.teacher(x)


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)
