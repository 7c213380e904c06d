"""The training losses besides plain cross-entropy: mixup (gluoncv's ``--mixup``) as pure functions of
(seed, step, rank), resume-safe with no global RNG; and knowledge distillation from a teacher's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mixup_params(seed: int, step: int, rank: int, batch: int, alpha: float) -> tuple[float, torch.Tensor]:
    """(lambda ~ Beta(alpha, alpha), a permutation of the batch), drawn from a generator seeded by
    (seed, step, rank) so that a resumed run draws the same values."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    a = torch._standard_gamma(torch.full((2,), float(alpha)), generator=g)  # Beta as a ratio of Gammas
    return float(a[0] / a.sum()), torch.randperm(batch, generator=g)


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
