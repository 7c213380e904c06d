"""Speed options on the CPU: autocast bfloat16/float16 (GradScaler for float16), channels_last,
torch.compile (the saved model stays the unwrapped one), and a step loop without host syncs
except at log intervals. ``BITRAIN_TEST_DEVICE=cuda`` runs the same tests on the GPU
(``benchmarks/gpu_check.sh`` does)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import read_rows, run_cli

from bitrain.data import build_data
from bitrain.models import build_model
from bitrain.train.options import LoopOptions, Placement, StopPolicy
from bitrain.train.saver import CheckpointSaver
from bitrain.train.trainer import Trainer

BATCH = 64  # digits: 1442 train samples -> 22 steps per epoch
DEVICE = torch.device(os.environ.get("BITRAIN_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"BITRAIN_TEST_DEVICE={DEVICE}: no CUDA device", allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_thread():
    # bf16/fp16 kernels on a busy 2-core CPU: one thread per test is the fastest and steadiest
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float32_is_float32():
    # on a GPU, float32 convs and matmuls would run in TF32 (10-bit mantissa): the comparisons of two
    # float32 runs below are made at float32 precision
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def digits():
    return build_data("digits", batch_size=BATCH, device=DEVICE, seed=3)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny_resnet_e", num_classes=10, in_channels=1, image_size=8, bits=32, bits_a=32)


def _trainer(
    digits,
    model: nn.Module | None = None,
    *,
    epochs: int = 1,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    compile: bool = False,
    test_run: bool = False,
    run_dir: Path | None = None,
    log_interval: int = 0,
) -> Trainer:
    train, val, _ = digits
    model = model if model is not None else _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Trainer(
        model,
        opt,
        train,
        val,
        epochs=epochs,
        saver=CheckpointSaver(run_dir / "checkpoints") if run_dir is not None else None,
        placement=Placement(device=DEVICE, dtype=dtype, compile=compile, channels_last=channels_last),
        stop=StopPolicy(test_run=test_run),
        options=LoopOptions(log_interval=log_interval),
    )


def _capture_conv_dtypes(model: nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    return seen


def test_bfloat16_autocast_computes_in_bf16_and_keeps_float32_weights(digits):
    model = _model()
    seen = _capture_conv_dtypes(model)
    before = [p.detach().clone() for p in model.parameters()]
    t = _trainer(digits, model, dtype=torch.bfloat16, epochs=3, test_run=True)
    out = t.fit()
    assert len(seen) == 3 and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p.cpu()) for a, p in zip(before, model.parameters()))  # it stepped
    assert not t.scaler.is_enabled()  # bf16 has float32's range: no loss scaling
    assert math.isfinite(out["val"]["loss"])


def test_float16_autocast_uses_a_grad_scaler_saved_in_the_checkpoint(digits, tmp_path):
    model = _model()
    seen = _capture_conv_dtypes(model)
    t = _trainer(digits, model, dtype=torch.float16, run_dir=tmp_path, epochs=3, test_run=True)
    out = t.fit()
    assert len(seen) == 3 and set(seen) == {torch.float16}
    assert t.scaler.is_enabled()
    assert math.isfinite(out["val"]["loss"])
    payload = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert payload["scaler"]["scale"] == t.scaler.get_scale() > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_float16_grad_scaler_skips_a_step_with_overflowing_gradients(digits):
    t = _trainer(digits, dtype=torch.float16)
    digits[0].set_epoch(0)
    batches = iter(digits[0])
    t.train_step(*next(batches))  # a normal step initialises the scale
    huge = float(torch.finfo(torch.float32).max)
    t.scaler.update(huge)  # a scale that turns every gradient into inf
    before = {k: v.clone() for k, v in t.model.named_parameters()}
    t.train_step(*next(batches))
    for k, p in t.model.named_parameters():
        assert torch.equal(p, before[k]), f"{k} changed on an overflowing step"
    assert t.scaler.get_scale() == huge * 0.5  # backed off by the default factor


def test_channels_last_trains_the_same_as_contiguous(digits):
    a = _trainer(digits, _model(), epochs=4, test_run=True)
    b = _trainer(digits, _model(), epochs=4, test_run=True, channels_last=True)
    conv_w = [m.weight for m in b.model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert conv_w and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_w)
    ra, rb = a.fit(), b.fit()
    assert rb["val"]["loss"] == pytest.approx(ra["val"]["loss"], rel=1e-4)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-5), k


@pytest.mark.slow
def test_compile_trains_like_eager_and_saves_the_unwrapped_model(digits, tmp_path):
    eager = _trainer(digits, _model(), epochs=3, test_run=True)
    compiled = _trainer(digits, _model(), epochs=3, test_run=True, compile=True, run_dir=tmp_path)
    assert compiled.net is not compiled.model  # forward runs the compiled module
    re, rc = eager.fit(), compiled.fit()
    assert rc["val"]["loss"] == pytest.approx(re["val"]["loss"], rel=1e-3)
    keys = set(torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert keys == set(_model().state_dict()) and not any("_orig_mod" in k for k in keys)


class _SyncCounter:
    """Counts device->host reads (.item(), .tolist(), bool/float/int of a tensor) with the loop
    position they happen at: (inside train_step?, trainer.state.batch)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")

    def __init__(self, trainer: Trainer, monkeypatch) -> None:
        self.events: list[tuple[bool, int]] = []
        self.in_step = False
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(orig, trainer))
        step = trainer.train_step

        def counted_step(x, y):
            self.in_step = True
            try:
                return step(x, y)
            finally:
                self.in_step = False

        monkeypatch.setattr(trainer, "train_step", counted_step)

    def _wrap(self, orig, trainer):
        def read(tensor, *args, **kwargs):
            self.events.append((self.in_step, trainer.state.batch))
            return orig(tensor, *args, **kwargs)

        return read


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_no_host_sync_in_the_step_loop_except_at_log_intervals(digits, monkeypatch, amp_dtype):
    interval = 5
    t = _trainer(digits, epochs=1, log_interval=interval, dtype=amp_dtype)
    counter = _SyncCounter(t, monkeypatch)
    t.fit()
    steps = t.steps_per_epoch
    assert steps == 22
    assert not [e for e in counter.events if e[0]], "train_step read a tensor on the host"
    batches = {b for _, b in counter.events}
    between = {b for b in batches if 0 < b < steps and b % interval}
    assert not between, f"host reads after batches {sorted(between)} (log interval {interval})"
    assert {5, 10, 15, 20} <= batches  # the detector sees the log intervals' one read each


def test_cli_dtype_channels_last_test_run(tmp_path):
    device = ["--cpu"] if DEVICE.type == "cpu" else ["--gpus", str(DEVICE.index or 0)]
    for i, flags in enumerate((["--dtype", "bfloat16", "--channels-last"], ["--dtype", "float16"])):
        run = tmp_path / f"r{i}"
        assert run_cli("train", *device, "--test-run", "--epochs", "2", "--prefix", run, *flags) == 0
        assert (run / "model.safetensors").is_file()
        val = read_rows(run, "val")
        assert len(val) == 2 and all(math.isfinite(float(r["loss"])) for r in val)
