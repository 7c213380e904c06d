"""bitrain.binary.react: LearnableBias, RSign and RPReLU, values and gradients by hand."""

from __future__ import annotations

import pytest
import torch

from bitrain.binary.react import LearnableBias, RPReLU, RSign


def _x() -> torch.Tensor:
    # (N=2, C=3, 2, 2): zeros, the +-1 edges and values in between, per channel
    return torch.tensor(
        [
            [[[0.0, 1.0], [-1.0, 0.5]], [[-0.25, 2.0], [0.75, -3.0]], [[0.1, -0.1], [0.0, 1.5]]],
            [[[-0.5, 0.25], [1.25, -0.75]], [[0.0, -1.0], [1.0, 0.3]], [[-2.0, 0.9], [-0.9, 0.2]]],
        ]
    )


def test_learnable_bias_starts_at_zero_and_shifts_each_channel():
    lb = LearnableBias(3)
    x = _x()
    assert torch.equal(lb(x), x) and list(lb.state_dict()) == ["bias"]
    with torch.no_grad():
        lb.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    y = lb(x)
    for c, b in enumerate([0.5, -1.0, 2.0]):
        assert torch.equal(y[:, c], x[:, c] + b)
    flat = torch.arange(6.0).view(2, 3)  # (N, C) input: the same per-channel shift
    assert torch.equal(lb(flat), flat + torch.tensor([0.5, -1.0, 2.0]))
    g = torch.randn(2, 3, 2, 2)
    (lb(x) * g).sum().backward()
    assert torch.allclose(lb.bias.grad, g.sum(dim=(0, 2, 3)))  # dy/db = 1 at every position


def test_rsign_values_threshold_and_straight_through_gradients():
    rs = RSign(3)  # det_sign, no gradient cancel
    with torch.no_grad():
        rs.shift.bias.copy_(torch.tensor([0.0, -0.75, 0.1]))
    x = _x().requires_grad_()
    y = rs(x)
    shifted = x.detach() + torch.tensor([0.0, -0.75, 0.1]).view(1, 3, 1, 1)
    assert torch.equal(y, torch.where(shifted >= 0, 1.0, -1.0))  # sign(x + b), 0 -> +1
    assert y[1, 1, 1, 0] == 1.0  # x = 1.0, b = -0.75 -> +1; x = 0.75 - 0.75 = 0 -> +1 too
    assert y[0, 1, 1, 0] == 1.0 and y[0, 1, 0, 0] == -1.0
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)  # straight through, every position
    assert torch.allclose(rs.shift.bias.grad, g.sum(dim=(0, 2, 3)))


def test_rsign_with_approx_sign_passes_bireal_gradient_to_the_threshold():
    rs = RSign(3, method="approx_sign", clip_threshold=1.0)
    with torch.no_grad():
        rs.shift.bias.copy_(torch.tensor([0.25, 0.0, -0.5]))
    x = _x().requires_grad_()
    y = rs(x)
    g = torch.ones_like(y)
    y.backward(g)
    s = x.detach() + torch.tensor([0.25, 0.0, -0.5]).view(1, 3, 1, 1)
    local = (2 - 2 * s.abs()).clamp(min=0)  # Bi-Real: 2 - 2|s| inside [-1, 1], 0 outside
    assert torch.allclose(x.grad, local)
    assert torch.allclose(rs.shift.bias.grad, local.sum(dim=(0, 2, 3)))
    assert rs.shift.bias.grad[0] > 0 and x.grad[0, 1, 0, 1] == 0  # |2.0| > 1: nothing passes


def test_rprelu_values_and_gradients_of_all_three_parameters():
    act = RPReLU(3)
    assert torch.equal(act.prelu.weight, torch.full((3,), 0.25))
    assert set(act.state_dict()) == {"shift_in.bias", "prelu.weight", "shift_out.bias"}
    b1, slope, b2 = torch.tensor([0.5, -0.25, 0.0]), torch.tensor([0.1, 0.25, -0.5]), torch.tensor([1.0, 0.0, -2.0])
    with torch.no_grad():
        act.shift_in.bias.copy_(b1)
        act.prelu.weight.copy_(slope)
        act.shift_out.bias.copy_(b2)
    x = _x().requires_grad_()
    y = act(x)
    v = x.detach() + b1.view(1, 3, 1, 1)
    a = slope.view(1, 3, 1, 1)
    assert torch.allclose(y, torch.where(v >= 0, v, a * v) + b2.view(1, 3, 1, 1))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    d = torch.where(v > 0, 1.0, a)  # d y / d x = d y / d b1
    assert torch.allclose(x.grad, g * d)
    assert torch.allclose(act.shift_in.bias.grad, (g * d).sum(dim=(0, 2, 3)))
    assert torch.allclose(act.prelu.weight.grad, (g * torch.where(v > 0, 0.0, v)).sum(dim=(0, 2, 3)))
    assert torch.allclose(act.shift_out.bias.grad, g.sum(dim=(0, 2, 3)))


def test_rprelu_starts_as_prelu_and_learns_its_shifts():
    torch.manual_seed(0)
    act = RPReLU(3)
    x = torch.randn(8, 3, 4, 4)
    assert torch.equal(act(x), torch.nn.functional.prelu(x, torch.full((3,), 0.25)))
    opt = torch.optim.Adam(act.parameters(), lr=0.02)
    target = torch.nn.functional.prelu(x + 0.5, torch.full((3,), 0.1)) - 0.3  # b1 = 0.5, slope 0.1, b2 = -0.3
    for _ in range(200):
        opt.zero_grad()
        loss = ((act(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-6
    assert torch.allclose(act.shift_in.bias, torch.full((3,), 0.5), atol=1e-3)
    assert torch.allclose(act.prelu.weight, torch.full((3,), 0.1), atol=1e-3)
    assert torch.allclose(act.shift_out.bias, torch.full((3,), -0.3), atol=1e-3)


@pytest.mark.parametrize("method", ["det_sign", "approx_sign"])
def test_rsign_is_a_plus_minus_one_module_for_any_shape(method):
    rs = RSign(4, method=method)
    y = rs(torch.randn(5, 4))
    assert y.shape == (5, 4) and set(y.unique().tolist()) <= {-1.0, 1.0}
