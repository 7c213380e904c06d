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
    assert y.tolist() == [1.0 if v > 0 else 0.0 for v in POINTS]  # larq: heaviside, 0 at 0
    assert g.tolist() == [_within(v, T) for v in POINTS]


@pytest.mark.parametrize("t", [T, 1.0, 3.0])
def test_steheaviside_is_bitorchs_minus_one_plus_one(t):
    """bitorch's SteHeaviside: where(x > 0, 1, -1), gradient where |x| <= 1 (its own bound) and |x| <= t."""
    y, g = _grad(quant.get_quantizer("steheaviside"), _x(), t)
    assert y.tolist() == [1.0 if v > 0 else -1.0 for v in POINTS]  # 0 and -0.0 -> -1, unlike det_sign
    assert g.tolist() == [_within(v, min(t, 1.0)) for v in POINTS]
    assert not quant.QUANTIZERS["steheaviside"].plus_minus_one  # +-1 but 0 -> -1: not packed as det_sign's signs


def test_ste_tern_threshold_005():
    y, g = _grad(quant.get_quantizer("ste_tern", bits=2), _x(), 1.0)
    assert y.tolist() == [(_sign_ref(v) if abs(v) >= 0.05 else 0.0) for v in POINTS]
    assert g.tolist() == [_within(v, 1.0) for v in POINTS]


def test_magnitude_aware_sign_activation_is_per_channel_like_larq():
    """larq scales by mean|x| over every axis but the channel axis: for NCHW the batch and H, W (dim 1 kept)."""
    x = torch.tensor([[[[0.5, -1.5]], [[-0.25, 0.0]]], [[[1.0, 2.0]], [[0.75, -0.5]]]], requires_grad=True)
    y = quant.get_quantizer("magnitude_aware_sign")(x, 1.0)  # (2, 2, 1, 2): channel 0 mean|x| 1.25, channel 1 0.375
    assert y.flatten().tolist() == [1.25, -1.25, -0.375, 0.375, 1.25, 1.25, 0.375, -0.375]
    (g,) = torch.autograd.grad((y * torch.arange(1.0, 9.0).view_as(y)).sum(), x)
    # alpha * upstream (alpha stop-gradient), cancelled where |x| > 1
    want = [1.25 * 1, 0.0, 0.375 * 3, 0.375 * 4, 1.25 * 5, 0.0, 0.375 * 7, 0.375 * 8]
    assert g.flatten().tolist() == want
    assert quant.magnitude_aware_sign(torch.tensor([-0.5, 0.0, 2.0])).tolist() == [-0.5, 0.0, 2.0]  # 1-D: no mean
    nc = quant.magnitude_aware_sign(torch.tensor([[1.0, -4.0], [-3.0, 2.0]]))  # (N, C): per feature over the batch
    assert nc.tolist() == [[2.0, -3.0], [-2.0, 3.0]]


def test_magnitude_aware_sign_weight_is_per_output_channel():
    w = torch.tensor([[[[0.5, -1.5]]], [[[-0.25, 0.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    q = quant.get_quantizer("magnitude_aware_sign", 1, "weight")
    y = q(w, 1.0)
    assert y.flatten().tolist() == [1.0, -1.0, -0.125, 0.125]  # alpha = mean|w| per output channel: 1.0, 0.125
    (g,) = torch.autograd.grad((y * torch.arange(1.0, 5.0).view_as(y)).sum(), w)
    # Bi-Real magnitude-aware gradient: alpha * upstream, cancelled where |w| > 1
    assert g.flatten().tolist() == [1.0 * 1, 0.0, 0.125 * 3, 0.125 * 4]


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_round_k_bit_bmxnet_clip_gradient(bits):
    """BMXNet round: round_ste(clip(x, 0, 1) * n) / n; gradient the clip's (1 on [0, 1], edges included)."""
    n = 2**bits - 1
    y, g = _grad(quant.get_quantizer("round", bits=bits), _x(torch.float64), T, bits)
    ref = [math.floor(min(max(v, 0.0), 1.0) * n + 0.5) / n for v in POINTS]
    assert torch.allclose(y, torch.tensor(ref, dtype=torch.float64))
    assert g.tolist() == [(1.0 if 0 <= v <= 1 else 0.0) * _within(v, T) for v in POINTS]
    _, g_inf = _grad(quant.get_quantizer("round", bits=bits), _x(torch.float64), math.inf, bits)
    assert g_inf.tolist() == [1.0 if 0 <= v <= 1 else 0.0 for v in POINTS]  # 0 on [-t, 0) and (1, t] too


def _bmxnet_dorefa_ref(x: list[float], bits: int, t: float = math.inf):
    """BMXNet dorefa in float64 by hand: 2 round(v n) / n - 1, v = 0.5 tanh(x) / max|tanh(x)| + 0.5, and
    d/dx_i of sum(out): (1 - th_i^2) / m + [|th_i| = m] sign(th_i) (1 - th_i^2) * sum_k(-th_k / m^2)."""
    n = 2**bits - 1
    th = [math.tanh(v) for v in x]
    m = max(abs(v) for v in th)
    out = [2 * math.floor((0.5 * v / m + 0.5) * n + 0.5) / n - 1 for v in th]
    dm = sum(-v / m**2 for v in th)  # d sum(out) / dm = sum_k 2 * 0.5 * (-th_k / m^2)
    g = [(1 - v * v) / m + (abs(v) == m) * math.copysign(1.0, v) * (1 - v * v) * dm for v in th]
    return out, [gi * _within(v, t) for gi, v in zip(g, x)]


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("t", [math.inf, 1.0])
def test_dorefa_is_bmxnets_tanh_form_with_gradient_through_the_max(bits, t):
    y, g = _grad(quant.get_quantizer("dorefa", bits=bits), _x(torch.float64), t, bits)
    ref, gref = _bmxnet_dorefa_ref(POINTS, bits, t)
    assert torch.allclose(y, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(g, torch.tensor(gref, dtype=torch.float64), atol=1e-12)
    # the max element (x = 3.0) gets the gradient through max|tanh| too: not (1 - th^2) / m alone
    i = POINTS.index(3.0)
    assert abs(g[i].item() - (1 - math.tanh(3.0) ** 2) / math.tanh(3.0)) > 1e-3
    # weights take the same function (BMXNet's dorefa is one function for both)
    assert torch.equal(quant.get_quantizer("dorefa", bits, "weight")(y.new_tensor(POINTS)), y)


def test_dorefa_ties_at_the_max_each_get_the_full_gradient():
    # MXNet's max passes the whole gradient to every element equal to it (torch's would split it)
    w = torch.tensor([-2.0, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(quant.dorefa(w, bits=2).sum(), w)
    _, gref = _bmxnet_dorefa_ref([-2.0, 0.3, 2.0], 2)
    assert torch.allclose(g, torch.tensor(gref, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_quantizer_is_larqs_clip_and_round_half_to_even(bits):
    n = 2**bits - 1
    y, g = _grad(quant.get_quantizer("dorefa_quantizer", bits=bits), _x(torch.float64), math.inf, bits)
    ref = torch.round(torch.tensor([min(max(v, 0.0), 1.0) * n for v in POINTS], dtype=torch.float64)) / n
    assert torch.equal(y, ref)
    assert g.tolist() == [1.0 if 0 <= v <= 1 else 0.0 for v in POINTS]  # gradient of the clip
    half = torch.tensor([0.5], dtype=torch.float64)  # tf.round(0.5 n): halves to even
    assert quant.dorefa_quantizer(half, bits=1).item() == 0.0 and quant.round_ste(half, bits=1).item() == 1.0
    assert quant.dorefa_quantizer(half, bits=2).item() == pytest.approx(2 / 3)  # 1.5 -> 2


def test_round_half_away_from_zero_like_bmxnet():
    y = quant.round_ste(torch.tensor([1 / 6, 0.5, 5 / 6]), bits=2)  # x*3 = 0.5, 1.5, 2.5
    assert torch.allclose(y, torch.tensor([1 / 3, 2 / 3, 1.0]))


@pytest.mark.parametrize("bits", [2, 3])
def test_dorefa_quantizer_weights_tanh_normalised_max_stopped(bits):
    n = 2**bits - 1
    w = torch.tensor([-2.0, -0.3, 0.0, 0.1, 0.7, 1.5], dtype=torch.float64, requires_grad=True)
    f = quant.get_quantizer("dorefa_quantizer", bits=bits, kind="weight")
    y, g = _grad(f, w, math.inf, bits)
    th = torch.tanh(w.detach())
    m = th.abs().max()
    ref = 2 * torch.round((th / (2 * m) + 0.5) * n) / n - 1
    assert torch.equal(y, ref) and y.min() >= -1 and y.max() <= 1
    assert torch.allclose(g, (1 - th**2) / m)
    zeros = torch.zeros(3)  # tf.math.divide_no_nan: all-zero weights give 0 / 0 = 0, not NaN
    assert quant.dorefa_quantizer_weights(zeros, bits=2).tolist() == pytest.approx([1 / 3] * 3)


def test_32_bit_activations():
    x = _x(torch.float64)
    xs = torch.tensor(POINTS, dtype=torch.float64)
    y, g = _grad(quant.get_quantizer("identity", bits=32), x)
    assert torch.equal(y, xs) and torch.equal(g, torch.ones_like(xs))
    y, g = _grad(quant.get_quantizer("relu", bits=32), x)
    assert torch.equal(y, xs.clamp(min=0)) and g.tolist() == [1.0 if v > 0 else 0.0 for v in POINTS]
    y, g = _grad(quant.get_quantizer("clip", bits=32), x)
    assert torch.equal(y, xs.clamp(-1, 1))
    assert g.tolist() == [1.0 if abs(v) <= 1 else 0.0 for v in POINTS]  # MXNet's clip_grad: 1 at exactly +-1
    y, g = _grad(quant.get_quantizer("leaky_clip", bits=32), x)
    assert y.tolist() == pytest.approx([v if abs(v) <= 1 else 0.1 * v for v in POINTS])
    assert g.tolist() == pytest.approx([1.0 if abs(v) <= 1 else 0.1 for v in POINTS])
    y, g = _grad(quant.get_quantizer("approx_sign", bits=32), x)
    poly = [-1.0 if v <= -1 else 2 * v + v * v if v < 0 else 2 * v - v * v if v < 1 else 1.0 for v in POINTS]
    assert y.tolist() == pytest.approx(poly)
    assert g.tolist() == pytest.approx([2 - 2 * abs(v) if abs(v) < 1 else 0.0 for v in POINTS])


@pytest.mark.parametrize("name", ["relu", "clip", "leaky_clip", "approx_sign"])
def test_32_bit_activations_cancel_the_gradient_like_bmxnets_qactivation_but_identity(name):
    """BMXNet's QActivation runs gradcancel before every activation, 32-bit ones included."""
    _, g_inf = _grad(quant.get_quantizer(name, bits=32), _x(torch.float64))
    _, g = _grad(quant.get_quantizer(name, bits=32), _x(torch.float64), T)
    assert g.tolist() == [gi * _within(v, T) for gi, v in zip(g_inf.tolist(), POINTS)]
    _, g_id = _grad(quant.get_quantizer("identity", bits=32), _x(), T)
    assert g_id.tolist() == [1.0] * len(POINTS)  # the full-precision pass-through: no cancel


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


@pytest.mark.parametrize("name", ["round", "dorefa_quantizer"])
@pytest.mark.parametrize("bits,x", [(1, 0.49999997), (2, 0.166666657), (3, 0.0714285672)])
def test_k_bit_rounding_just_below_a_half_rounds_down(name, bits, x):
    """floor(p + 0.5) in float32 rounded these up (p = x (2^k - 1) is 0.49999997); every reference gives 0."""
    t = torch.tensor([x], dtype=torch.float32)
    assert float((t * (2**bits - 1))[0]) < 0.5
    assert quant.get_quantizer(name, bits)(t, bits=bits).item() == 0.0
    assert quant.round_half_up(t * (2**bits - 1)).item() == 0.0


def test_round_exact_half_rounds_up_like_bmxnet():
    for bits in (1, 2, 3):
        n = 2**bits - 1
        half = torch.tensor([0.5 / n], dtype=torch.float32)  # p = 0.5 exactly: roundf gives 1
        assert quant.get_quantizer("round", bits)(half, bits=bits).item() == pytest.approx(1 / n)


def test_dorefa_tanh_form_rounds_just_below_a_half_down():
    # tanh(10) is 1.0 in float32, so v = 0.5 tanh(y) + 0.5; y = -2^-24 makes v = 0.49999997, the float below 1/2
    y = quant.dorefa(torch.tensor([10.0, -(2.0**-24)]), bits=1)
    assert y.tolist() == [1.0, -1.0]  # floor(v + 0.5) would give +1 for the second


@pytest.mark.parametrize("name", ["dorefa", "dorefa_quantizer"])
def test_dorefa_weight_rounding_matches_a_float64_reference(name):
    torch.manual_seed(0)
    w = torch.randn(4096)
    for bits in (2, 3, 4):
        got = quant.get_quantizer(name, bits, "weight")(w, bits=bits)
        th = torch.tanh(w.double())
        v = th / (2 * th.abs().max()) + 0.5
        n = 2**bits - 1
        want = 2 * (torch.floor(v * n + 0.5) if name == "dorefa" else torch.round(v * n)) / n - 1
        assert (got.double() - want).abs().max() < 1e-6


def test_a_k_bit_quantizer_keeps_the_bits_it_was_asked_for():
    w = torch.linspace(-2, 2, 101)
    q2 = quant.get_quantizer("dorefa", 2, "weight")
    assert torch.equal(q2(w), quant.dorefa(w, bits=2))  # 2-bit without passing bits again
    assert len(q2(w).unique()) == 4 and len(quant.get_quantizer("round", 3)(w.clamp(0, 1)).unique()) == 8
    assert torch.equal(q2(w, bits=3), quant.dorefa(w, bits=3))  # an explicit bits still wins
