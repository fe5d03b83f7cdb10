"""fastreg.plots render to PNG without a display and draw the expected series."""
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import fastreg as fr  # noqa: E402
from fastreg import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    X = rng.uniform(-3, 3, (200, 1)).astype(np.float32)
    y = np.sin(X).astype(np.float32)
    models = []
    for lam in (0.0, 1.0):
        m = fr.Sequential([fr.Dense(16, "leaky_relu", regularizer=fr.L2(lam) if lam else None),
                           fr.Dense(1)], input_dim=1, seed=0)
        m.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numba")
        m.fit(X, y, epochs=3, batch_size=50, validation_data=(X[:50], y[:50]), verbose=0)
        models.append(m)
    return X, y, models


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_agg_without_a_display(monkeypatch):
    import sys
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    matplotlib, _ = plots._matplotlib()
    if "matplotlib.pyplot" not in sys.modules:
        assert matplotlib.get_backend().lower() == "agg"


def test_loss_curves(fitted, tmp_path):
    _, _, models = fitted
    path = tmp_path / "loss.png"
    fig = plots.loss_curves({"λ=0": models[0], "λ=1": models[1]}, path=path)
    assert _is_png(path)
    loss_ax, pen_ax = fig.axes
    assert len(loss_ax.get_lines()) == 4  # train + val for each model
    assert len(pen_ax.get_lines()) == 1   # only λ=1 has a penalty
    fig = plots.loss_curves(models[0].history)  # a single History, no penalty panel
    assert len(fig.axes) == 1 and len(fig.axes[0].get_lines()) == 2
    fig = plots.loss_curves([{"loss": [1.0, 0.5]}], labels=["a"])
    assert len(fig.axes[0].get_lines()) == 1


def test_predictions(fitted, tmp_path):
    X, y, models = fitted
    fig = plots.predictions(models, X, y, labels=["a", "b"], path=tmp_path / "p.png")
    assert _is_png(tmp_path / "p.png")
    ax, = fig.axes
    assert len(ax.get_lines()) == 2 and len(ax.collections) == 1  # curves + data points
    fig = plots.predictions(models * 2, X, y, panels=True)
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 4 and all(len(a.get_lines()) == 1 for a in visible)
    with pytest.raises(ValueError):
        plots.predictions(models, np.zeros((5, 2)), np.zeros(5))


def test_param_kde(fitted, tmp_path):
    _, _, models = fitted
    init = fr.Sequential([fr.Dense(16, "leaky_relu"), fr.Dense(1)], input_dim=1, seed=0)
    fig = plots.param_kde(models, labels=["λ=0", "λ=1"], init=init, path=tmp_path / "k.png")
    assert _is_png(tmp_path / "k.png")
    ax, = fig.axes
    assert len(ax.get_lines()) == 3
    # all-equal parameters (e.g. everything decayed to 0) draw a spike, not an error
    zeros = [np.zeros_like(w) for w in models[0].get_weights()]
    fig = plots.param_kde([zeros, models[0]])
    assert len(fig.axes[0].get_lines()) == 2
    theta = plots.parameters_of(models[0])
    assert theta.size == 16 + 16


def test_sweep_plot_curves_and_heatmap(tmp_path):
    rows = [{"l2": l2, "dropout": p, "best_val_loss": 0.1 + l2 + p, "final_loss": 0.05 + l2}
            for l2 in (0.0, 1e-3, 1e-1) for p in (0.0, 0.2)]
    fig = plots.sweep_plot(rows, "l2", ["final_loss", "best_val_loss"], hue="dropout",
                           path=tmp_path / "c.png")
    assert _is_png(tmp_path / "c.png")
    assert len(fig.axes[0].get_lines()) == 4  # 2 metrics x 2 dropout values
    assert fig.axes[0].get_xscale() == "symlog"  # 0 and decades
    fig = plots.sweep_plot(rows, "l2", "best_val_loss", hue="dropout", kind="heatmap",
                           path=tmp_path / "h.png")
    assert _is_png(tmp_path / "h.png")
    assert fig.axes[0].images[0].get_array().shape == (2, 3)
    with pytest.raises(ValueError):
        plots.sweep_plot(rows, "nope")
    with pytest.raises(ValueError):
        plots.sweep_plot(rows, "l2", kind="heatmap")


def test_param_kde_magnitude_panel(fitted):
    _, _, models = fitted
    fig = plots.param_kde(models, magnitude=True)
    left, right = fig.axes
    assert len(left.get_lines()) == 2 and len(right.get_lines()) == 2
