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
        # float64 keeps sums exact well past 2**24 samples; MPS has no float64.
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.sums = torch.zeros(3, device=device, dtype=dtype)  # correct@1, correct@5, summed loss
        self.count = 0  # samples: known on the host, so it costs no device op

    def reset(self) -> None:
        self.sums.zero_()
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """logits: (N, C); target: (N,) class indices; loss_sum: scalar, summed over the N samples."""
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == target[:, None]  # (N, k), at most one True per row
        # correct@1 = hits in column 0; correct@5 = all hits (one per row at most)
        self.sums[:2] += torch.stack([hit[:, 0].sum(), hit.sum()]).to(self.sums.dtype)
        self.sums[2] += loss_sum.detach().to(self.sums.dtype)
        self.count += target.shape[0]

    def compute(self) -> dict[str, float]:
        """One host sync (and an all-reduce under DDP): {'acc1', 'acc5', 'loss', 'samples'}."""
        sums = torch.cat([self.sums, self.sums.new_tensor([self.count])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        c1, c5, loss, n = sums.tolist()
        if n == 0:
            return {"acc1": float("nan"), "acc5": float("nan"), "loss": float("nan"), "samples": 0}
        return {"acc1": c1 / n, "acc5": c5 / n, "loss": loss / n, "samples": int(n)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.detach().cpu().clone(), "count": torch.tensor(self.count)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        sums = state["sums"]
        if sums.numel() == 4:  # the first checkpoint format kept the count in the tensor
            self.sums.copy_(sums[:3].to(self.sums.device, self.sums.dtype))
            self.count = int(sums[3])
        else:
            self.sums.copy_(sums.to(self.sums.device, self.sums.dtype))
            self.count = int(state["count"])
