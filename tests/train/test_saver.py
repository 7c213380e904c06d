"""train/saver.py and the Trainer's parts around it: which checkpoint files exist after which epoch
(numbered / best / last / forced / mid-epoch), the named resume arithmetic of TrainState, and
callbacks attached before or after a resumed payload continuing its state."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from bitrain.data.loader import DeviceLoader
from bitrain.train import checkpoint as ckpt
from bitrain.train.callbacks import Callback
from bitrain.train.options import LoopOptions, StopPolicy
from bitrain.train.saver import CheckpointSaver
from bitrain.train.state import Interrupted, TrainState
from bitrain.train.trainer import Trainer


def _loaders():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4
    x = (y * 60).view(-1, 1, 1, 1).to(torch.uint8) + torch.randint(0, 40, (64, 1, 4, 4), generator=g, dtype=torch.uint8)
    norm = {"mean": (0.5,), "std": (0.25,)}
    return DeviceLoader(x, y, batch_size=16, train=True, seed=1, **norm), DeviceLoader(
        x, y, batch_size=32, train=False, **norm
    )


def _trainer(saver, epochs, **stop) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    train, val = _loaders()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(
        model, opt, train, val, epochs=epochs, saver=saver, stop=StopPolicy(**stop), options=LoopOptions(log_interval=0)
    )


def _files(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_epoch_files_policy():
    saver = CheckpointSaver("unused", name="net", save_frequency=2)
    assert saver.epoch_files(0, 0.5, is_best=True, forced=False) == ["best.pt"]
    assert saver.epoch_files(1, 0.25, is_best=False, forced=False) == ["net_0001_acc_0.2500.pt"]
    assert saver.epoch_files(2, 0.25, is_best=False, forced=True) == ["net_0002_acc_0.2500.pt"]
    assert CheckpointSaver("unused", save_frequency=0).epoch_files(9, float("nan"), False, False) == []
    assert CheckpointSaver("unused").epoch_files(9, 0.75, False, True) == ["model_0009_acc_0.7500.pt"]


def test_files_after_each_epoch(tmp_path):
    folder = tmp_path / "checkpoints"
    saver = CheckpointSaver(folder, name="net", save_frequency=2, extra={"note": "kept"})
    t = _trainer(saver, epochs=1)
    t.fit()
    assert _files(folder) == ["best.pt", "last.pt"]
    t.epochs = 2
    t.fit()
    numbered = [f for f in _files(folder) if f.startswith("net_0001_acc_")]
    assert len(numbered) == 1 and {"best.pt", "last.pt", "last.prev.pt"} <= set(_files(folder))
    payload = ckpt.load_checkpoint(folder / "last.pt")
    assert payload["note"] == "kept" and payload["trainer"]["epoch"] == 2
    assert ckpt.load_checkpoint(folder / numbered[0])["trainer"]["epoch"] == 2
    best = ckpt.load_checkpoint(folder / "best.pt")["trainer"]
    assert best["best_acc"] == t.state.best_acc


def test_interrupt_at_forces_a_numbered_file_and_no_saver_writes_nothing(tmp_path):
    folder = tmp_path / "checkpoints"
    with pytest.raises(Interrupted):
        _trainer(CheckpointSaver(folder, name="net", save_frequency=0), epochs=3, interrupt_at=1).fit()
    assert [f for f in _files(folder) if f.startswith("net_0000_acc_")]
    _trainer(None, epochs=1).fit()  # no saver: nothing anywhere
    assert _files(tmp_path) == ["checkpoints"]


def test_mid_epoch_last_every_n_steps(tmp_path):
    folder = tmp_path / "checkpoints"
    steps_seen = []
    saver = CheckpointSaver(folder, checkpoint_interval=3, save_frequency=0)
    original = saver.save

    def spy(payload, also=()):
        steps_seen.append((payload["trainer"]["step"], payload["trainer"]["batch"], list(also)))
        original(payload, also)

    saver.save = spy
    _trainer(saver, epochs=2).fit()  # 4 steps per epoch
    assert steps_seen == [(3, 3, []), (4, 0, ["best.pt"]), (6, 2, []), (8, 0, steps_seen[-1][2])]


def test_resume_arithmetic_has_names():
    s = TrainState.at_epoch(3, steps_per_epoch=10, global_batch=32)
    assert (s.epoch, s.batch, s.step, s.samples) == (3, 0, 30, 960)
    s.advance(32), s.advance(32)
    assert (s.batch, s.step, s.samples) == (2, 32, 1024)
    assert s.epoch_first_step == 30 and s.samples_before_epoch(32) == 960
    assert s.finish_epoch(1.5) == 3 and (s.epoch, s.batch, s.epoch_times) == (4, 0, [1.5])


class _Counter(Callback):
    def __init__(self) -> None:
        self.rows = 0

    def on_row(self, row) -> None:
        self.rows += 1

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state) -> None:
        self.rows = state["rows"]


@pytest.mark.parametrize("attach_first", [True, False])
def test_callbacks_continue_a_resumed_payload_whichever_comes_first(tmp_path, attach_first):
    folder = tmp_path / "checkpoints"
    first = _trainer(CheckpointSaver(folder), epochs=1)
    first.attach([_Counter()])
    first.fit()
    payload = ckpt.load_checkpoint(folder / "last.pt")
    assert payload["callbacks"] == {"_Counter": {"rows": 2}}  # the train and val rows of epoch 0
    resumed, counter = _trainer(CheckpointSaver(folder), epochs=2), _Counter()
    if attach_first:
        resumed.attach([counter])
        resumed.load_state_dict(payload)
    else:
        resumed.load_state_dict(payload)
        resumed.attach([counter])
    assert counter.rows == 2
    resumed.fit()
    assert counter.rows == 4
