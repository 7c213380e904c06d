"""Bop: the flip rule against a hand computation, one optimizer for all groups, exact resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary.bop import Bop, binary_parameters, build_bop
from bitrain.binary.layers import QConv2d, QLinear
from bitrain.errors import UserError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        QConv2d(3, 8, 3, padding=1, bits=32, bits_a=32),  # full-precision stem
        nn.BatchNorm2d(8),
        QConv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        QLinear(8 * 16, 4, bits=1),
        nn.Linear(4, 3),
    )


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = _batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_binary_parameters_are_the_one_bit_latent_weights():
    m = _model()
    assert binary_parameters(m) == [m[2].weight, m[5].weight]


def test_flip_rule_matches_hand_computation():
    layer = QLinear(4, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.2, 0.5, -0.9]]))
    inner_param = nn.Parameter(torch.zeros(1))
    opt = Bop([layer.weight], torch.optim.SGD([inner_param], lr=0.1), threshold=0.05, gamma=0.5)
    assert layer.weight.tolist() == [[1.0, -1.0, 1.0, -1.0]]  # latent weights start binary
    layer.weight.grad = torch.tensor([[0.2, -0.2, -0.2, 0.04]])
    inner_param.grad = torch.ones(1)
    opt.step()
    # m = 0.5 g = [0.1, -0.1, -0.1, 0.02]: flip where |m| > 0.05 and sign(m) == sign(w)
    assert opt.state[layer.weight]["momentum"][0].tolist() == pytest.approx([0.1, -0.1, -0.1, 0.02])
    assert layer.weight.tolist() == [[-1.0, 1.0, 1.0, -1.0]]
    assert inner_param.item() == pytest.approx(-0.1)  # the inner SGD step ran
    layer.weight.grad = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    opt.step()  # m halves to [0.05, -0.05, ...]: not > threshold, nothing flips
    assert layer.weight.tolist() == [[-1.0, 1.0, 1.0, -1.0]]


def test_one_optimizer_with_all_groups_and_lr_drives_inner():
    m = _model()
    opt = build_bop(m, "adam", lr=1e-2, threshold=1e-6, gamma=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 3 and opt.param_groups[0]["bop"]
    n_all = sum(len(g["params"]) for g in opt.param_groups)
    assert n_all == len(list(m.parameters()))
    for g in opt.param_groups:
        g["lr"] = 0.0  # what a trainer does each step: lr 0 freezes the inner optimizer
    before = m[6].weight.detach().clone()
    _train(m, opt, 2)
    assert torch.equal(m[6].weight, before)
    assert set(m[2].weight.unique().tolist()) <= {-1.0, 1.0}


def test_state_dict_resume_is_bit_identical():
    ref = _model()
    ref_opt = build_bop(ref, "adam", lr=1e-2, threshold=1e-7, gamma=1e-1, weight_decay=1e-4)
    _train(ref, ref_opt, 6)

    a = _model()
    a_opt = build_bop(a, "adam", lr=1e-2, threshold=1e-7, gamma=1e-1, weight_decay=1e-4)
    _train(a, a_opt, 3)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": a_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    b = _model()
    b_opt = build_bop(b, "adam", lr=1e-2, threshold=1e-7, gamma=1e-1, weight_decay=1e-4)
    b.load_state_dict(ckpt["model"])
    b_opt.load_state_dict(ckpt["opt"])
    assert b_opt.inner.state is b_opt.state
    _train(b, b_opt, 3, start=3)
    for (k, v1), v2 in zip(ref.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v1, v2), k
    flips = (ref[2].weight != _model()[2].weight.sign()).sum()
    assert flips > 0  # the run did flip weights, so the comparison means something
    s1, s2 = ref_opt.state_dict(), b_opt.state_dict()
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))


def test_bmxnet_groups_and_keywords_of_the_optimizer_factory():
    m = _model()
    opt = build_bop(m, "adam", lr=1e-3, momentum=0.9, wd=5e-4)  # what bitrain.train.optim passes
    decay, no_decay = opt.param_groups[1], opt.param_groups[2]
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[6].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(p) for p in (m[1].weight, m[1].bias, m[3].weight, m[3].bias, m[6].bias)
    }
    sgd = build_bop(_model(), "nag", lr=0.1, momentum=0.8)
    assert sgd.inner.param_groups[0]["momentum"] == 0.8 and sgd.inner.param_groups[0]["nesterov"]


def test_inner_by_callable_and_errors():
    m = _model()
    opt = build_bop(m, torch.optim.SGD, lr=0.1, momentum=0.9)
    assert isinstance(opt.inner, torch.optim.SGD) and opt.inner.param_groups[0]["momentum"] == 0.9
    with pytest.raises(UserError, match="inner optimizer 'lamb'.*adam"):
        build_bop(_model(), "lamb", lr=0.1)
    with pytest.raises(UserError, match="no 1-bit"):
        build_bop(nn.Sequential(nn.Linear(2, 2)), "sgd", lr=0.1)
    with pytest.raises(UserError, match="gamma"):
        build_bop(_model(), "sgd", lr=0.1, gamma=0.0)
