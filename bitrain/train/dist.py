"""torch.distributed glue: torchrun's environment -> process group, rank helpers, DDP wrap."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str = "cpu", timeout_s: float = 300.0, device: torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (no-op without it).

    gloo on the CPU, nccl on CUDA. The timeout makes a rank that lost its peers fail with an error
    instead of hanging for the default 30 minutes. ``device``: this rank's CUDA device when it is
    not cuda:LOCAL_RANK (``--gpus 2,3``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {}
        if device_type == "cuda":
            cuda = device if device is not None and device.index is not None else torch.device("cuda", info.local_rank)
            torch.cuda.set_device(cuda)
            kwargs["device_id"] = cuda
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return info


def get_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are the sums over all ranks (one differentiable
    all-reduce of [sum, sum of squares, count] per layer). nn.SyncBatchNorm only runs on GPUs;
    this one runs on any backend (gloo on the CPU). Same parameters, buffers and state_dict keys
    as BatchNorm1d/2d/3d, so checkpoints load into the plain model."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # all but the channel axis
        xf = x.float()
        count = torch.full((1,), float(x.numel() // x.shape[1]), device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises with
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """BatchNorm layers -> nn.SyncBatchNorm on CUDA, AllReduceBatchNorm elsewhere (in place;
    returns the root, which is new only when the root itself is a BatchNorm)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, AllReduceBatchNorm):
        new = AllReduceBatchNorm(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats)
        # the same Parameter/buffer objects: an optimizer built on the model keeps training them
        for name, p in model.named_parameters(recurse=False):
            setattr(new, name, p)
        for name, b in model.named_buffers(recurse=False):
            setattr(new, name, b)
        new.train(model.training)
        return new
    for name, child in model.named_children():
        model.add_module(name, convert_sync_batchnorm(child, device_type))
    return model


def wrap_ddp(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DDP-wrap ``model`` when a process group is up; the caller keeps the unwrapped module for saving.
    ``sync_bn`` converts its BatchNorm layers in place (the saved state_dict keeps its keys)."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model, device.type)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rng_state() -> dict:
    """This process's torch (and CUDA) generator states."""
    state: dict = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state, in rank order (a collective under DDP; in-process exchange, no file)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each forward, but every rank then updates its own with its
    own batch: before validation, all ranks must evaluate the same model that rank 0 saves.
    """
    if dist.is_available() and dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, src=0)
