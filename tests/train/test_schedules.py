import pytest

from bitrain.errors import UserError
from bitrain.train.schedules import lr_at, make_schedule

BASE = dict(lr=0.1, steps_per_epoch=10, epochs=10)


def test_warmup_is_linear_from_warmup_lr_to_lr():
    f = make_schedule(mode="cosine", warmup_epochs=2, warmup_lr=0.01, **BASE)
    assert f(0) == pytest.approx(0.01)
    assert f(10) == pytest.approx(0.01 + (0.1 - 0.01) * 10 / 20)
    assert f(19) == pytest.approx(0.01 + 0.09 * 19 / 20)
    assert f(20) == pytest.approx(0.1)  # warmup over: cosine starts at lr


def test_step_mode_drops_by_factor_and_steps_shift_with_warmup():
    f = make_schedule(mode="step", lr_steps=[3, 6], lr_factor=0.1, warmup_epochs=1, **BASE)
    # BMXNet shifts the step epochs by the warmup: drops after (3-1) and (6-1) main-schedule epochs
    assert f(10) == pytest.approx(0.1)
    assert f(10 + 19) == pytest.approx(0.1)
    assert f(10 + 20) == pytest.approx(0.01)
    assert f(10 + 50) == pytest.approx(0.001)
    no_warm = make_schedule(mode="step", lr_steps=[3, 6], lr_factor=0.1, **BASE)
    assert no_warm(29) == pytest.approx(0.1) and no_warm(30) == pytest.approx(0.01)


def test_cosine_poly_linear_shapes():
    cos = make_schedule(mode="cosine", **BASE)
    assert cos(0) == pytest.approx(0.1)
    assert cos(50) == pytest.approx(0.05)
    assert cos(100) == pytest.approx(0.0, abs=1e-12)
    poly = make_schedule(mode="poly", **BASE)
    assert poly(50) == pytest.approx(0.1 * 0.5**2)  # power 2 as BMXNet
    lin = make_schedule(mode="linear", **BASE)
    assert lin(25) == pytest.approx(0.075)


def test_schedule_is_a_pure_function_of_the_step():
    f = make_schedule(mode="cosine", warmup_epochs=1, **BASE)
    values = [f(s) for s in range(100)]
    assert values == [f(s) for s in range(100)]
    assert all(a <= b + 1e-15 for a, b in zip(values[:10], values[1:11]))  # warmup rises
    assert all(a >= b - 1e-15 for a, b in zip(values[10:], values[11:]))  # cosine falls


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="--lr-mode"):
        make_schedule(mode="exp", **BASE)
    with pytest.raises(UserError):
        lr_at(0, mode="exp", **BASE)
