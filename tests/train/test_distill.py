"""Validation you can trust (BatchNorm re-estimated before each validation), knowledge distillation from a
teacher (--teacher, --distill-temperature, --distill-alpha) and two-step training (--init-from)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_same_weights, final_weights, read_rows, run_cli

from bitrain import build_data, build_model, build_optimizer, make_schedule
from bitrain.train.evaluation import evaluate
from bitrain.train.loss import Loss, distillation_loss
from bitrain.train.options import LoopOptions
from bitrain.train.trainer import Trainer

QUICK = ("--cpu", "--epochs", "2", "--batch-size", "128", "--log-interval", "0")


@pytest.fixture(scope="module")
def digits():
    return build_data("digits", batch_size=128, device="cpu", seed=0)


def _model(bits: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return build_model("tiny_resnet_e", num_classes=10, in_channels=1, image_size=8, bits=bits, bits_a=bits)


def _trainer(digits, model=None, *, epochs: int = 2, bn_recalibrate: int = 0, loss: Loss | None = None) -> Trainer:
    train, val, _ = digits
    model = model or _model()
    return Trainer(
        model,
        build_optimizer(model, "adam", lr=0.01),
        train,
        val,
        epochs=epochs,
        schedule=make_schedule(lr=0.01, mode="cosine", steps_per_epoch=len(train), epochs=epochs),
        loss=loss,
        options=LoopOptions(log_interval=0, bn_recalibrate=bn_recalibrate),
    )


# ------------------------------------------------------------------ BatchNorm re-estimation


def test_recalibration_gives_the_exact_average_over_the_first_batches(digits):
    t = _trainer(digits, bn_recalibrate=3)
    t.fit()
    # by hand: reset, exact average (momentum None) over the first 3 train batches of epoch 0's order
    ref = copy.deepcopy(t.model)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    train = digits[0]
    train.set_epoch(0)
    with torch.no_grad():
        for i, (x, _) in enumerate(train):
            if i == 3:
                break
            ref(x)
    got, want = t.model.state_dict(), ref.state_dict()
    for k in want:
        if "running" in k:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), k
    assert all(m.momentum == 0.1 for m in t.model.modules() if isinstance(m, nn.BatchNorm2d))


def test_validation_is_the_figure_of_the_saved_weights(digits):
    t = _trainer(digits, bn_recalibrate=5)
    result = t.fit()
    again = evaluate(t.model, digits[1])  # the model as it is saved, evaluated afresh
    assert again["acc1"] == result["val"]["acc1"] and again["loss"] == pytest.approx(result["val"]["loss"], rel=1e-6)


def test_recalibration_changes_only_batchnorm_buffers(digits):
    a, b = _trainer(digits, bn_recalibrate=0), _trainer(digits, bn_recalibrate=4)
    a.fit(), b.fit()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        if "running" in k or "num_batches_tracked" in k:  # BatchNorm buffers
            continue
        assert torch.equal(sa[k], sb[k]), k  # weights, and so training, are unchanged
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if "running_mean" in k)


def test_recalibration_cost_is_reported_once(tmp_path, capsys):
    assert run_cli("train", *QUICK, "--prefix", tmp_path / "run", "--bn-recalibrate", "2") == 0
    out = capsys.readouterr().out
    assert out.count("BatchNorm statistics re-estimated over 2 train batches") == 1
    assert run_cli("train", *QUICK, "--prefix", tmp_path / "r2", "--bn-recalibrate", "-1") == 2


# ------------------------------------------------------------------ distillation


def test_distillation_loss_is_the_kl_of_softened_distributions():
    torch.manual_seed(0)
    s, t = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10)
    for temp in (1.0, 4.0):
        p_t = F.softmax(t / temp, -1)
        want = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
        assert distillation_loss(s, t, temp).item() == pytest.approx(want.item(), rel=1e-5)
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    loss = distillation_loss(s, t, 1.0)
    loss.backward()  # d/ds KL(t || s) = (softmax(s) - softmax(t)) / N at T = 1
    assert torch.allclose(s.grad, (F.softmax(s, -1) - F.softmax(t, -1)).detach() / 6, atol=1e-6)


def test_alpha_zero_is_the_label_loss_and_alpha_one_follows_the_teacher(digits):
    teacher = _model(bits=32)
    plain = _trainer(digits, epochs=1)
    plain.fit()
    ignored = _trainer(digits, epochs=1, loss=Loss(teacher=copy.deepcopy(teacher), distill_alpha=0.0))
    ignored.fit()
    assert_same_weights(plain.model.state_dict(), ignored.model.state_dict())
    distilled = _trainer(digits, epochs=1, loss=Loss(teacher=copy.deepcopy(teacher), distill_alpha=1.0))
    x, y = next(iter(digits[0]))
    with torch.no_grad():
        want = distillation_loss(distilled.net(x), teacher.eval()(x))
    distilled.net.train()
    got = distilled.train_step(x, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    teacher_used = distilled.loss.teacher
    assert all(not p.requires_grad for p in teacher_used.parameters()) and not teacher_used.training


@pytest.fixture(scope="module")
def float_teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "fp"
    assert run_cli("train", *QUICK, "--bits", "32", "--bits-a", "32", "--prefix", run) == 0
    return run


def test_teacher_run_resumes_bit_identically(tmp_path, float_teacher):
    args = (*QUICK, "--teacher", float_teacher, "--distill-alpha", "0.7", "--distill-temperature", "2")
    assert run_cli("train", *args, "--prefix", tmp_path / "ref") == 0
    assert run_cli("train", *args, "--prefix", tmp_path / "cut", "--interrupt-at", "1") == 3
    assert run_cli("train", "--prefix", tmp_path / "cut", "--resume", "auto") == 0  # the teacher from the checkpoint
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "cut"))
    assert len(read_rows(tmp_path / "cut", "val")) == 2


def test_teacher_and_init_from_errors_are_one_line(tmp_path, float_teacher, capsys):
    cases = [
        (("--teacher", tmp_path / "missing.pt"), "does not exist"),
        (
            ("--dataset", "dummy", "--dummy-shape", "1,8,8", "--dummy-classes", "4", "--teacher", float_teacher),
            "num_classes",
        ),
        (("--init-from", float_teacher, "--model", "lenet"), "do not fit"),
        (("--distill-alpha", "1.5"), "--distill-alpha"),
    ]
    for extra, msg in cases:
        capsys.readouterr()
        assert run_cli("train", *QUICK, "--prefix", tmp_path / "x", "--overwrite", *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (extra, err)
    assert run_cli("export", float_teacher / "checkpoints" / "last.pt", tmp_path / "fp.safetensors") == 0
    capsys.readouterr()
    assert run_cli("train", *QUICK, "--prefix", tmp_path / "y", "--init-from", tmp_path / "fp.safetensors") == 2
    assert "packed 1-bit export" in capsys.readouterr().err


def test_init_from_starts_from_the_weights_of_step_one(tmp_path, float_teacher):
    from bitrain.cli.train import init_weights_from

    # step 1 of a two-step training: binary activations, float weights; step 2 starts from it with binary weights
    step1 = tmp_path / "step1"
    assert run_cli("train", *QUICK, "--bits", "32", "--prefix", step1) == 0
    model = _model(bits=1)
    init_weights_from(model, str(step1 / "model.safetensors"))
    assert_same_weights(model.state_dict(), final_weights(step1))
    assert run_cli("train", *QUICK, "--prefix", tmp_path / "step2", "--init-from", step1 / "model.safetensors") == 0
    assert max(float(r["acc1"]) for r in read_rows(tmp_path / "step2", "val")) > 0.5
