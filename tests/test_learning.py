"""The model learns: the regularization study's 1-D curve, 1->64->64->64->1 LeakyReLU."""
import numpy as np
import pytest

import fastreg as fr


def _curve(rng, n):
    """A sum of sinusoids with random amplitudes and phases plus Gaussian noise."""
    amps = rng.uniform(0.5, 1.5, 3)
    freqs = np.array([1.0, 2.3, 4.1])
    phases = rng.uniform(0, 2 * np.pi, 3)

    def f(x):
        return (amps * np.sin(freqs * x + phases)).sum(axis=1, keepdims=True)
    x = rng.uniform(-3, 3, (n, 1))
    return x, f, 0.1


@pytest.mark.slow
def test_unregularized_curve_fit_reaches_ten_percent_of_variance():
    rng = np.random.default_rng(2026)
    x, f, noise = _curve(rng, 10_000)
    y = f(x) + noise * rng.standard_normal(x.shape)
    xv = rng.uniform(-3, 3, (2_000, 1))
    yv = f(xv) + noise * rng.standard_normal(xv.shape)
    model = fr.Sequential([fr.Dense(64, "leaky_relu"), fr.Dense(64, "leaky_relu"),
                           fr.Dense(64, "leaky_relu"), fr.Dense(1)], input_dim=1, seed=0)
    model.compile(loss="mse", optimizer=fr.Adam(1e-3), backend="numba")
    model.fit(x, y, epochs=60, batch_size=128, validation_data=(xv, yv), verbose=0)
    val_mse = model.evaluate(xv, yv)
    assert val_mse < 0.1 * float(np.var(yv)), (val_mse, float(np.var(yv)))
