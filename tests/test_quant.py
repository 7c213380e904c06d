"""Quantizers: forward values and gradients against hand-written references, registry, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from bitrain.binary import quantizers as quant
from bitrain.binary import schedule
from bitrain.errors import UserError

T = 0.7  # a gradient-cancel threshold that is not a float32 edge case of its own
# many points, including 0, -0.0, the cancel edges +-T exactly, +-1 and just past them
POINTS = [-3.0, -1.5, -1.0, -0.99, -T, -0.5, -0.05, -1e-6, -0.0, 0.0, 1e-6, 0.05, 0.3, 0.5, T, 0.99, 1.0, 1.2, 3.0]


def _x(dtype=torch.float32):
    return torch.tensor(POINTS, dtype=dtype, requires_grad=True)


def _grad(fn, x, *args):
    y = fn(x, *args)
    (g,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), g


def _sign_ref(v):
    return 1.0 if v >= 0 else -1.0  # -0.0 >= 0 is True: 0 and -0.0 -> +1


def _within(v, t):
    return 1.0 if abs(v) <= t else 0.0


@pytest.mark.parametrize("name", ["det_sign", "ste_sign", "sign"])
@pytest.mark.parametrize("t", [T, 1.0, math.inf])
def test_det_sign_values_and_ste_gradient_with_cancel(name, t):
    y, g = _grad(quant.get_quantizer(name), _x(), t)
    assert y.tolist() == [_sign_ref(v) for v in POINTS]
    assert g.tolist() == [_within(v, t) for v in POINTS]  # |x| == t passes, |x| > t is cancelled


def test_det_sign_float64_edges_and_never_zero():
    y, g = _grad(quant.det_sign, _x(torch.float64), T)
    assert set(y.tolist()) == {-1.0, 1.0}
    assert g.tolist() == [_within(v, T) for v in POINTS]


@pytest.mark.parametrize("name", ["approx_sign", "sign_approx_sign", "approxsign"])
@pytest.mark.parametrize("t", [T, math.inf])
def test_approx_sign_bi_real_gradient(name, t):
    y, g = _grad(quant.get_quantizer(name, bits=1), _x(), t)
    assert y.tolist() == [_sign_ref(v) for v in POINTS]
    ref = [(2 - 2 * abs(v) if abs(v) <= 1 else 0.0) * _within(v, t) for v in POINTS]
    assert torch.allclose(g, torch.tensor(ref), atol=1e-6)


def test_swish_sign_gradient_beta5():
    y, g = _grad(quant.swish_sign, _x(torch.float64), math.inf)
    assert y.tolist() == [_sign_ref(v) for v in POINTS]
    b = 5.0
    ref = [b * (2 - b * v * math.tanh(b * v / 2)) / (1 + math.cosh(b * v)) for v in POINTS]
    assert torch.allclose(g, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    # it is the derivative of the SignSwish 2 sigmoid(bx) (1 + bx (1 - sigmoid(bx))) - 1
    xs = torch.tensor(POINTS, dtype=torch.float64, requires_grad=True)
    s = torch.sigmoid(b * xs)
    (g2,) = torch.autograd.grad((2 * s * (1 + b * xs * (1 - s)) - 1).sum(), xs)
    assert torch.allclose(g, g2, atol=1e-10)
    assert g[POINTS.index(0.0)].item() == pytest.approx(5.0)


def test_ste_heaviside_zero_one():
    y, g = _grad(quant.ste_heaviside, _x(), T)
    assert y.tolist() == [1.0 if v > 0 else 0.0 for v in POINTS]
    assert g.tolist() == [_within(v, T) for v in POINTS]


def test_ste_tern_threshold_005():
    y, g = _grad(quant.get_quantizer("ste_tern", bits=2), _x(), 1.0)
    assert y.tolist() == [(_sign_ref(v) if abs(v) >= 0.05 else 0.0) for v in POINTS]
    assert g.tolist() == [_within(v, 1.0) for v in POINTS]


def test_magnitude_aware_sign_per_output_channel():
    w = torch.tensor([[[[0.5, -1.5]]], [[[-0.25, 0.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    y = quant.magnitude_aware_sign(w, 1.0)
    assert y.flatten().tolist() == [1.0, -1.0, -0.125, 0.125]  # alpha = mean|w| per channel: 1.0, 0.125
    (g,) = torch.autograd.grad((y * torch.arange(1.0, 5.0).view_as(y)).sum(), w)
    # Bi-Real magnitude-aware gradient: alpha * upstream, cancelled where |w| > 1
    assert g.flatten().tolist() == [1.0 * 1, 0.0, 0.125 * 3, 0.125 * 4]


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_round_k_bit_ste(bits):
    n = 2**bits - 1
    y, g = _grad(quant.get_quantizer("round", bits=bits), _x(torch.float64), T, bits)
    ref = [math.floor(min(max(v, 0.0), 1.0) * n + 0.5) / n for v in POINTS]
    assert torch.allclose(y, torch.tensor(ref, dtype=torch.float64))
    assert g.tolist() == [_within(v, T) for v in POINTS]  # straight through, only the cancel


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_activation_form(bits):
    n = 2**bits - 1
    y, g = _grad(quant.get_quantizer("dorefa", bits=bits), _x(torch.float64), math.inf, bits)
    ref = [math.floor(min(max(v, 0.0), 1.0) * n + 0.5) / n for v in POINTS]
    assert torch.allclose(y, torch.tensor(ref, dtype=torch.float64))
    assert g.tolist() == [1.0 if 0 <= v <= 1 else 0.0 for v in POINTS]  # gradient of the clip


def test_round_half_away_from_zero_like_bmxnet():
    y = quant.round_ste(torch.tensor([1 / 6, 0.5, 5 / 6]), bits=2)  # x*3 = 0.5, 1.5, 2.5
    assert torch.allclose(y, torch.tensor([1 / 3, 2 / 3, 1.0]))


@pytest.mark.parametrize("bits", [2, 3])
def test_dorefa_weight_form_tanh_normalised(bits):
    n = 2**bits - 1
    w = torch.tensor([-2.0, -0.3, 0.0, 0.1, 0.7, 1.5], dtype=torch.float64, requires_grad=True)
    f = quant.get_quantizer("dorefa", bits=bits, kind="weight")
    y, g = _grad(f, w, math.inf, bits)
    th = torch.tanh(w.detach())
    m = th.abs().max()
    ref = 2 * torch.floor((th / (2 * m) + 0.5) * n + 0.5) / n - 1
    assert torch.equal(y, ref) and y.min() >= -1 and y.max() <= 1
    assert torch.allclose(g, (1 - th**2) / m)


def test_32_bit_activations():
    x = _x(torch.float64)
    xs = torch.tensor(POINTS, dtype=torch.float64)
    y, g = _grad(quant.get_quantizer("identity", bits=32), x)
    assert torch.equal(y, xs) and torch.equal(g, torch.ones_like(xs))
    y, g = _grad(quant.get_quantizer("relu", bits=32), x)
    assert torch.equal(y, xs.clamp(min=0)) and g.tolist() == [1.0 if v > 0 else 0.0 for v in POINTS]
    y, g = _grad(quant.get_quantizer("clip", bits=32), x)
    assert torch.equal(y, xs.clamp(-1, 1))
    y, g = _grad(quant.get_quantizer("leaky_clip", bits=32), x)
    assert y.tolist() == pytest.approx([v if abs(v) <= 1 else 0.1 * v for v in POINTS])
    assert g.tolist() == pytest.approx([1.0 if abs(v) <= 1 else 0.1 for v in POINTS])
    y, g = _grad(quant.get_quantizer("approx_sign", bits=32), x)
    poly = [-1.0 if v <= -1 else 2 * v + v * v if v < 0 else 2 * v - v * v if v < 1 else 1.0 for v in POINTS]
    assert y.tolist() == pytest.approx(poly)
    assert g.tolist() == pytest.approx([2 - 2 * abs(v) if abs(v) < 1 else 0.0 for v in POINTS])


def test_registry_and_errors():
    assert quant.get_quantizer(None) is None
    f = lambda x: x  # noqa: E731
    assert quant.get_quantizer(f) is f
    assert quant.get_quantizer("ste_sign") is quant.det_sign is quant.QUANTIZERS["sign"].fn
    with pytest.raises(UserError, match="unknown quantizer 'nope'.*det_sign"):
        quant.get_quantizer("nope")
    with pytest.raises(UserError, match="does not fit 32-bit"):
        quant.get_quantizer("det_sign", bits=32)
    with pytest.raises(UserError, match="does not fit 2-bit"):
        quant.get_quantizer("det_sign", bits=2)
    with pytest.raises(UserError, match="bits=9"):
        quant.get_quantizer("round", bits=9)
    assert quant.default_method(1) == "det_sign" and quant.default_method(4, "weight") == "dorefa"
    assert quant.default_method(32) == "identity" and quant.default_method(3) == "round"


def test_progressive_sign_schedule_and_eval_sign():
    p = schedule.ProgressiveSign(epochs=10)
    x = torch.tensor([-0.5, -0.01, 0.0, 0.01, 0.5], requires_grad=True)
    y0 = p(x)
    assert torch.allclose(y0, x.detach())  # temperature 0: hardtanh(x), identity on [-1, 1]
    p.set_epoch(5)
    temp = 1 - 4.0 ** (-10 * 0.5)
    assert p.temperature().item() == pytest.approx(temp)
    y = p(x)
    assert torch.allclose(y, torch.clamp(x.detach() / (1 - temp), -1, 1))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones(5))  # straight through
    p.eval()
    assert p(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    p.train()
    p.step()
    assert p.epoch == 6 and p.progress.item() == pytest.approx(0.6)
    assert p.state_dict() == {}  # the position is not model state: the trainer sets it per epoch


def test_quantizer_scheduler_identity_to_sign_and_set_quantizer_epoch():
    s = schedule.QuantizerScheduler(epochs=4)
    model = torch.nn.Sequential(torch.nn.Identity(), s)
    x = torch.tensor([-0.5, 0.25, 2.0])
    assert torch.allclose(s(x), x)
    assert schedule.set_quantizer_epoch(model, 1) == 1
    assert torch.allclose(s(x), 0.75 * x + 0.25 * torch.tensor([-1.0, 1.0, 1.0]))
    schedule.set_quantizer_epoch(model, 4)
    assert s(x).tolist() == [-1.0, 1.0, 1.0]
    schedule.set_quantizer_epoch(model, 9)  # clamped at the end of the schedule
    assert s(x).tolist() == [-1.0, 1.0, 1.0]
    with pytest.raises(UserError, match="epochs"):
        schedule.QuantizerScheduler(epochs=0)


def test_compiled_forward_backward_matches_eager():
    torch._dynamo.reset()

    def f(x):
        return (quant.det_sign(x, T) * 2 + quant.approx_sign(x, 1.0)).sum()

    x = _x()
    (g_eager,) = torch.autograd.grad(f(x), x)
    cf = torch.compile(f, fullgraph=False, backend="aot_eager")
    (g_comp,) = torch.autograd.grad(cf(x), x)
    assert torch.equal(g_eager, g_comp)
    y = torch.compile(lambda v: quant.det_sign(v, T), backend="aot_eager")(_x())
    assert y.tolist() == [_sign_ref(v) for v in POINTS]  # -0.0 -> +1 under compile too


@pytest.mark.parametrize("name", ["round", "dorefa"])
@pytest.mark.parametrize("bits,x", [(1, 0.49999997), (2, 0.166666657), (3, 0.0714285672)])
def test_k_bit_rounding_just_below_a_half_rounds_down(name, bits, x):
    """floor(p + 0.5) in float32 rounded these up (p = x (2^k - 1) is 0.49999997); every reference gives 0."""
    t = torch.tensor([x], dtype=torch.float32)
    assert float((t * (2**bits - 1))[0]) < 0.5
    assert quant.get_quantizer(name, bits)(t, bits=bits).item() == 0.0
    n = 2**bits - 1
    half = torch.tensor([0.5 / n], dtype=torch.float32)  # an exact half still rounds up, as BMXNet's round
    assert quant.get_quantizer(name, bits)(half, bits=bits).item() == pytest.approx(1 / n)


def test_dorefa_weight_rounding_matches_a_float64_reference():
    torch.manual_seed(0)
    w = torch.randn(4096)
    for bits in (2, 3, 4):
        got = quant.get_quantizer("dorefa", bits, "weight")(w, bits=bits)
        th = torch.tanh(w.double())
        v = th / (2 * th.abs().max()) + 0.5
        n = 2**bits - 1
        want = 2 * torch.floor(v * n + 0.5) / n - 1
        assert (got.double() - want).abs().max() < 1e-6


def test_a_k_bit_quantizer_keeps_the_bits_it_was_asked_for():
    w = torch.linspace(-2, 2, 101)
    q2 = quant.get_quantizer("dorefa", 2, "weight")
    assert torch.equal(q2(w), quant.dorefa_weight(w, bits=2))  # 2-bit without passing bits again
    assert len(q2(w).unique()) == 4 and len(quant.get_quantizer("round", 3)(w.clamp(0, 1)).unique()) == 8
    assert torch.equal(q2(w, bits=3), quant.dorefa_weight(w, bits=3))  # an explicit bits still wins
