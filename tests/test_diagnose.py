"""fr.diagnose: the overfitting guide's four bias/variance cases, and diagnose_model."""
import numpy as np
import pytest

import fastreg as fr
from fastreg.diagnose import Diagnosis, diagnose, diagnose_model


@pytest.mark.parametrize("train, val, verdict", [
    (20, 22, "high bias"),
    (1, 15, "high variance"),
    (0.5, 1, "neither"),
    (20, 30, "high bias and high variance"),
])
def test_the_guides_four_cases(train, val, verdict):
    d = diagnose(train, val, baseline=0.0)
    assert isinstance(d, Diagnosis)
    assert d.verdict == verdict
    assert d.avoidable_bias == pytest.approx(train)
    assert d.variance == pytest.approx(val - train)
    assert d.suggestion
    assert verdict in str(d)


def test_suggestions_point_the_right_way():
    assert "capacity" in diagnose(20, 22).suggestion
    assert "regulariz" in diagnose(1, 15).suggestion


def test_baseline_moves_the_bias():
    # a 20% train error is fine when humans make 18%
    assert diagnose(20, 22, baseline=18).verdict == "neither"
    assert diagnose(20, 22, baseline=18).avoidable_bias == pytest.approx(2)


def test_thresholds_are_parameters_and_inputs_are_checked():
    assert diagnose(3, 4, bias_threshold=2).verdict == "high bias"
    with pytest.raises(ValueError):
        diagnose(float("nan"), 1)
    with pytest.raises(TypeError):
        diagnose("a", 1)
    with pytest.raises(ValueError):
        diagnose(1, 2, bias_threshold=-1)


def _fitted(loss, y, epochs):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3)).astype(np.float32)
    units = 1 if loss != "sparse_categorical_crossentropy" else 3
    model = fr.Sequential([fr.Dense(16, "tanh"), fr.Dense(units)], input_dim=3, seed=0)
    model.compile(loss=loss, optimizer=fr.Adam(1e-2), backend="numba")
    yy = y(X)
    model.fit(X[:200], yy[:200], epochs=epochs, batch_size=32, verbose=0)
    return model, X, yy


def test_diagnose_model_loss_in_percent_of_the_constant_predictor():
    model, X, y = _fitted("mse", lambda X: X[:, :1] * 2.0 + 0.5, 40)
    d = diagnose_model(model, X[:200], y[:200], X[200:], y[200:])
    assert d.train_error < 5 and d.verdict == "neither"
    fresh = fr.Sequential([fr.Dense(1)], input_dim=3, seed=0)
    fresh.compile(loss="mse")
    d0 = diagnose_model(fresh, X[:200], y[:200], X[200:], y[200:])
    assert d0.high_bias  # an untrained model is far above the constant predictor's 100%


def test_diagnose_model_error_rate_for_classifiers():
    model, X, y = _fitted("sparse_categorical_crossentropy",
                          lambda X: (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 1), 30)
    d = diagnose_model(model, X[:200], y[:200], X[200:], y[200:], metric="error")
    pred = model.predict(X[200:]).argmax(axis=1)
    assert d.val_error == pytest.approx(100 * np.mean(pred != y[200:]))
    with pytest.raises(ValueError):
        diagnose_model(model, X, y, X, y, metric="accuracy")
    reg, Xr, yr = _fitted("mse", lambda X: X[:, :1], 1)
    with pytest.raises(ValueError):
        diagnose_model(reg, Xr, yr, Xr, yr, metric="error")


def test_model_diagnose_is_diagnose_model_and_exported():
    model, X, y = _fitted("mse", lambda X: X[:, :1] * 2.0 + 0.5, 5)
    a = model.diagnose(X[:200], y[:200], X[200:], y[200:], baseline=1.0)
    b = diagnose_model(model, X[:200], y[:200], X[200:], y[200:], baseline=1.0)
    assert a == b and fr.diagnose is diagnose and a.baseline == 1.0
    assert fr.sweep.__module__ == "fastreg.sweep"
