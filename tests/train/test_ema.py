"""The weights' EMA (``--model-ema``, train/ema.py): its values after k steps by hand, its place in the
checkpoint, exact resume, and a CLI run's val_ema rows, best.pt and model.safetensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import final_weights, read_rows, run_cli, stop_after
from test_accumulate import ListLoader, _data

from bitrain.errors import UserError
from bitrain.train import checkpoint as ckpt
from bitrain.train.ema import ModelEMA, trained_weights
from bitrain.train.options import LoopOptions
from bitrain.train.trainer import Trainer


def _net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _trainer(epochs: int = 1, **ema) -> Trainer:
    x, y = _data(40)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    options = LoopOptions(log_interval=0, model_ema=0.8, **ema)
    return Trainer(model, opt, ListLoader(x, y, 8), ListLoader(x, y, 20), epochs=epochs, options=options)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_after_k_steps_equals_the_hand_computation(monkeypatch, warmup):
    t = _trainer(model_ema_warmup=warmup)
    start = {k: v.clone() for k, v in t.model.named_parameters()}
    after: list[dict[str, torch.Tensor]] = []
    real = ModelEMA.update

    def record(self, model, step):
        after.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return real(self, model, step)

    monkeypatch.setattr(ModelEMA, "update", record)
    t.fit()
    assert len(after) == 5
    want = dict(start)
    for step, w in enumerate(after):
        d = min(0.8, (1 + step) / (10 + step)) if warmup else 0.8
        want = {k: d * want[k] + (1 - d) * w[k] for k in want}
    got = dict(t.ema.module.named_parameters())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    # buffers (BatchNorm's statistics, its counter) are copied, not averaged
    bn, ema_bn = t.model[1], t.ema.module[1]
    assert torch.equal(ema_bn.num_batches_tracked, bn.num_batches_tracked)
    assert ModelEMA(nn.Linear(1, 1), 0.999, warmup=True).decay_at(0) == pytest.approx(0.1)


def test_checkpoint_holds_the_chosen_model_under_model_and_resumes_exactly():
    ref = _trainer(epochs=2, model_ema_eval=True)
    ref.fit()
    first = _trainer(epochs=2, model_ema_eval=True)
    stop_after(first, 3)
    with pytest.raises(Exception, match="received test"):
        first.fit()
    payload = copy.deepcopy(first.state_dict())
    for k, v in first.ema.module.state_dict().items():  # readers load "model": here the EMA
        assert torch.equal(payload["model"][k], v)
    for k, v in first.model.state_dict().items():
        assert torch.equal(trained_weights(payload)[k], v)
    second = _trainer(epochs=2, model_ema_eval=True)
    second.load_state_dict(payload)
    second.fit()
    for a, b in ((second.model, ref.model), (second.ema.module, ref.ema.module), (second.final_model, ref.ema.module)):
        for k, v in b.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), k


def test_range_checks():
    with pytest.raises(UserError, match="--model-ema must be in"):
        LoopOptions(model_ema=1.0)
    with pytest.raises(UserError, match="need --model-ema"):
        LoopOptions(model_ema_eval=True)


def test_cli_logs_val_ema_and_exports_the_chosen_ema(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--cpu", "--epochs", "2", "--batch-size", "256", "--log-interval", "0", "--bn-recalibrate", "2"]
    assert run_cli("train", *args, "--model-ema", "0.5", "--model-ema-eval", "--prefix", run) == 0
    val, val_ema = read_rows(run, "val"), read_rows(run, "val_ema")
    assert [r["epoch"] for r in val_ema] == ["0", "1"] and [r["step"] for r in val_ema] == [r["step"] for r in val]
    assert "validation (EMA): accuracy=" in (run / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tb = [(e.step, e.value) for e in ea.Scalars("accuracy/validation-ema")]
    assert tb == [(int(r["samples"]), pytest.approx(float(r["acc1"]))) for r in val_ema]
    last = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["ema"]["model_is_ema"] and last["config"]["model_ema"] == 0.5
    weights = final_weights(run)
    for k, v in weights.items():  # model.safetensors: the EMA, not the trained weights
        assert torch.equal(v, last["model"][k]), k
    assert any(not torch.equal(v, last["ema"]["trained"][k]) for k, v in weights.items())
    best = max(float(r["acc1"]) for r in val_ema)
    assert ckpt.load_checkpoint(run / "checkpoints" / "best.pt")["trainer"]["best_acc"] == best
    # best.pt is the EMA's: eval reads it, and its packed export, at the EMA's validated top-1
    packed = tmp_path / "packed.safetensors"
    assert run_cli("export", run / "checkpoints" / "best.pt", packed) == 0
    capsys.readouterr()
    for path in (run / "checkpoints" / "best.pt", packed):
        assert run_cli("eval", path, "--cpu") == 0
        assert f"top-1 {best:.4f}" in capsys.readouterr().out
