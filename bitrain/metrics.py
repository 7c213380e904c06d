"""Top-1 / top-5 accuracy and mean loss, accumulated on the device and exact over the epoch.

Each update adds sums (correct@1, correct@5, summed loss, sample count) into one small device
tensor: no host sync per batch, and the epoch value is sum / count over every sample, not a mean
of batch means. ``compute()`` syncs once and, under torch.distributed, all-reduces the sums so
every rank sees the metric over all ranks' samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: metric names, and the BMXNet/mxnet names used in log lines and TensorBoard tags
METRIC_NAMES = {"acc1": "accuracy", "acc5": "top_k_accuracy_5", "loss": "loss"}


class EpochMetrics:
    """Running sums of one split's metrics; ``reset()`` at each epoch start (as BMXNet)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # float64 keeps counts exact well past 2**24 samples; MPS has no float64.
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.sums = torch.zeros(4, device=device, dtype=dtype)  # correct1, correct5, loss_sum, n

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """logits: (N, C); target: (N,) class indices; loss_sum: scalar, summed over the N samples."""
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (N, k)
        hit = top == target[:, None]
        dt = self.sums.dtype
        n = torch.full((), target.shape[0], dtype=dt, device=self.sums.device)
        batch = torch.stack([hit[:, 0].sum().to(dt), hit.any(dim=1).sum().to(dt), loss_sum.detach().to(dt), n])
        self.sums += batch

    def compute(self) -> dict[str, float]:
        """One host sync (and an all-reduce under DDP): {'acc1', 'acc5', 'loss', 'samples'}."""
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        c1, c5, loss, n = sums.tolist()
        if n == 0:
            return {"acc1": float("nan"), "acc5": float("nan"), "loss": float("nan"), "samples": 0}
        return {"acc1": c1 / n, "acc5": c5 / n, "loss": loss / n, "samples": int(n)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sums.copy_(state["sums"].to(self.sums.device, self.sums.dtype))
