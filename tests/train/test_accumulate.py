"""Gradient accumulation (``--accumulate N``, train/accumulate.py): N batches of B/N train like one of B,
the schedule and the loop's position count optimizer steps, an epoch's shorter last window steps too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import stop_after

from bitrain.errors import UserError
from bitrain.train.accumulate import Accumulation
from bitrain.train.options import LoopOptions, StopPolicy
from bitrain.train.trainer import Trainer


class ListLoader:
    """bitrain's loader protocol over fixed tensors, the last batch kept even when short."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self._start = 0

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= len(self):  # as DeviceLoader
            raise ValueError(f"start batch {start} outside 0..{len(self)}")
        self._start = start

    def __iter__(self):
        start, self._start = self._start, 0
        for i in range(start, len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield self.x[sl], self.y[sl]


def _data(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _net() -> nn.Module:  # no BatchNorm: a batch of B and N batches of B/N see the same function
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(batch: int, accumulate: int, n: int, schedule=None, epochs: int = 2) -> Trainer:
    x, y = _data(n)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    t = Trainer(
        model,
        opt,
        ListLoader(x, y, batch),
        epochs=epochs,
        schedule=schedule,
        options=LoopOptions(log_interval=0, accumulate=accumulate),
    )
    t.fit()
    return t


@pytest.mark.parametrize("n", [32, 40])  # 40: each epoch ends with a shorter window (timm steps on it)
def test_n_batches_of_b_over_n_train_like_one_batch_of_b(n):
    one = _train(batch=8, accumulate=1, n=n)
    four = _train(batch=2, accumulate=4, n=n)
    assert four.state.step == one.state.step == 2 * (-(-n // 8))
    assert four.state.samples == one.state.samples == 2 * n
    a, b = one.model.state_dict(), four.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["0.weight"], _net().state_dict()["0.weight"])  # it trained


def test_schedule_and_position_count_optimizer_steps():
    seen: list[int] = []
    t = _train(batch=4, accumulate=3, n=40, schedule=lambda step: seen.append(step) or 0.1, epochs=1)
    # 10 batches: windows of 3, 3, 3 and 1 -> 4 optimizer steps, the lr set per batch at its window's step
    assert t.steps_per_epoch == 4 and t.global_batch == 12
    assert seen[1:] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # seen[0]: the epoch's lr for on_epoch_start
    assert (t.state.epoch, t.state.batch, t.state.step, t.state.samples) == (1, 0, 4, 40)


def test_window_arithmetic_and_range_checks():
    a = Accumulation(every=4, batches=10)
    assert a.steps == 3 and [a.window_size(i) for i in range(3)] == [4, 4, 2]
    assert a.first_batch(2) == 8
    assert (
        StopPolicy().steps_per_epoch(range(10), 4) == 3 and StopPolicy(test_run=True).steps_per_epoch(range(10), 4) == 1
    )
    with pytest.raises(UserError, match="--accumulate must be >= 1"):
        LoopOptions(accumulate=0)


@pytest.mark.parametrize("batches,position", [(5, (2, 2)), (10, (4, 4))])  # mid-epoch; after the short window
def test_accumulated_run_resumes_bit_identical_between_windows(batches, position):
    """A checkpoint is only written between windows, so a resumed trainer continues exactly."""
    ref = _train(batch=4, accumulate=3, n=40, epochs=2)
    x, y = _data(40)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    first = Trainer(model, opt, ListLoader(x, y, 4), epochs=2, options=LoopOptions(log_interval=0, accumulate=3))
    stop_after(first, batches)  # the 5th batch is inside the second window, the 10th ends the epoch
    with pytest.raises(Exception, match="received test"):
        first.fit()
    payload = copy.deepcopy(first.state_dict())
    assert (payload["trainer"]["batch"], payload["trainer"]["step"]) == position  # stopped at the window's end
    model2 = _net()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    second = Trainer(model2, opt2, ListLoader(x, y, 4), epochs=2, options=LoopOptions(log_interval=0, accumulate=3))
    second.load_state_dict(payload)
    second.fit()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v), k


def test_ddp_all_reduces_once_per_window(tmp_path):
    """Under DDP (a one-rank gloo group, in process) the window's first batches skip the all-reduce."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x, y = _data(40)
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        t = Trainer(model, opt, ListLoader(x, y, 4), epochs=1, options=LoopOptions(log_interval=0, accumulate=3))
        assert isinstance(t.net, nn.parallel.DistributedDataParallel)
        reduces = []

        def counting_hook(state, bucket):
            reduces.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        t.net.register_comm_hook(None, counting_hook)
        t.fit()
        assert t.state.step == 4 and len(reduces) == 4  # 10 batches in windows of 3, 3, 3, 1
    finally:
        dist.destroy_process_group()


def test_a_mid_epoch_checkpoint_resumes_only_with_its_window_size():
    x, y = _data(40)
    t = Trainer(_net(), torch.optim.SGD(_net().parameters(), lr=0.1), ListLoader(x, y, 4), epochs=1)
    saved = {**_train(batch=4, accumulate=3, n=40, epochs=1).state_dict()["trainer"], "epoch": 0, "batch": 2}
    assert saved["accumulate"] == 3
    with pytest.raises(UserError, match="resume it with --accumulate 3"):
        t.load_state_dict({"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "trainer": saved})
    t.load_state_dict(
        {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "trainer": {**saved, "batch": 0}}
    )
    assert t.state.accumulate == 1
