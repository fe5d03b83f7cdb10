"""Learning-rate schedules: Keras 3's formulas, and PyTorch's per-step schedulers."""
import math

import numpy as np
import pytest

from fastreg import schedules

STEPS = np.arange(0, 400, dtype=np.float64)


def test_exponential_decay_formula_and_staircase():
    s = schedules.ExponentialDecay(0.1, decay_steps=50, decay_rate=0.5)
    np.testing.assert_allclose(s.rates(STEPS), 0.1 * 0.5 ** (STEPS / 50), rtol=1e-15)
    st = schedules.ExponentialDecay(0.1, 50, 0.5, staircase=True)
    assert st(49) == 0.1 and st(50) == 0.05 and st(149) == 0.025


def test_piecewise_constant_boundaries_belong_below():
    s = schedules.PiecewiseConstantDecay([100, 200], [1.0, 0.5, 0.1])
    assert [s(k) for k in (0, 100, 101, 200, 201, 10_000)] == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]
    with pytest.raises(ValueError, match="one more entry"):
        schedules.PiecewiseConstantDecay([1, 2], [1.0, 0.5])
    with pytest.raises(ValueError, match="increase"):
        schedules.PiecewiseConstantDecay([2, 1], [1.0, 0.5, 0.1])


def test_polynomial_decay_holds_and_cycles():
    s = schedules.PolynomialDecay(0.1, 100, end_learning_rate=0.01, power=2.0)
    assert s(0) == pytest.approx(0.1) and s(100) == pytest.approx(0.01) == s(500)
    assert s(50) == pytest.approx(0.09 * 0.25 + 0.01)
    c = schedules.PolynomialDecay(0.1, 100, end_learning_rate=0.0, cycle=True)
    assert c(150) == pytest.approx(0.1 * (1 - 150 / 200))


def test_cosine_decay_with_warmup():
    s = schedules.CosineDecay(0.0, decay_steps=100, alpha=0.1, warmup_target=1e-2,
                              warmup_steps=10)
    assert s(0) == 0.0 and s(5) == pytest.approx(5e-3)
    assert s(10) == pytest.approx(1e-2)
    assert s(60) == pytest.approx(1e-2 * (0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)) + 0.1))
    assert s(110) == pytest.approx(1e-3) == s(10_000)
    with pytest.raises(ValueError, match="never"):
        schedules.CosineDecay(0.0, 100)


@pytest.mark.parametrize("schedule", [
    schedules.ExponentialDecay(0.1, 30, 0.7, staircase=True),
    schedules.PiecewiseConstantDecay([10], [0.2, 0.1]),
    schedules.PolynomialDecay(0.1, 90, 0.001, 1.5, cycle=True),
    schedules.CosineDecay(0.05, 70, 0.2, 0.1, 20),
    schedules.InverseTimeDecay(0.1, 10, 0.5)])
def test_keras_gives_the_same_rates(schedule, monkeypatch):
    if "KERAS_BACKEND" not in __import__("os").environ:
        monkeypatch.setenv("KERAS_BACKEND", "jax")
    pytest.importorskip("jax")
    keras = pytest.importorskip("keras")
    peer = getattr(keras.optimizers.schedules, type(schedule).__name__)(**schedule.get_config())
    want = np.array([float(peer(k)) for k in range(0, 200, 7)])
    np.testing.assert_allclose(schedule.rates(np.arange(0, 200, 7)), want, rtol=1e-6)
    assert schedules.from_config(schedules.to_config(schedule)) == schedule


def test_torch_per_step_schedulers_give_the_same_rates():
    torch = pytest.importorskip("torch")
    pairs = [
        (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.98),
         schedules.ExponentialDecay(0.1, 1, 0.98)),
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=25, gamma=0.5),
         schedules.ExponentialDecay(0.1, 25, 0.5, staircase=True)),
        (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=150, eta_min=0.005),
         schedules.CosineDecay(0.1, 150, alpha=0.05)),
    ]
    for make, ours in pairs:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make(opt)
        got = []
        for _ in range(150):
            got.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        np.testing.assert_allclose(ours.rates(np.arange(150)), got, rtol=1e-9, atol=1e-15)
