"""The Python API's first touches: summary() prints, EarlyStopping says what it did, a 1-D
input gets the reshape it needs, fit progress off a terminal is complete."""
import numpy as np
import pytest

import fastreg as fr


def _model(input_dim=3, **compile_kw):
    model = fr.Sequential([fr.Dense(8, "relu"), fr.Dense(1)], input_dim=input_dim, seed=0)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numpy", **compile_kw)
    return model


def test_summary_prints_and_returns_the_text(capsys):
    model = _model()
    text = model.summary()
    printed = capsys.readouterr().out
    assert printed.strip() == text.strip()
    assert "dense_0: 3->8 relu" in text and "total params: 41" in text
    assert repr(model) == text          # repr does not print
    assert capsys.readouterr().out == ""


def test_multitask_summary_prints_and_returns(capsys):
    model = fr.MultiTask([fr.Dense(4, "relu")], {"a": ([fr.Dense(1)], "mse")}, input_dim=2)
    text = model.summary()
    assert capsys.readouterr().out.strip() == text.strip() and "head 'a'" in text


def _plateau_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3)).astype(np.float32)
    y = X @ np.array([1.0, -2.0, 0.5], np.float32)
    Xv = rng.standard_normal((32, 3)).astype(np.float32)
    yv = rng.standard_normal(32).astype(np.float32) * 5     # unrelated: val_loss stalls
    return X, y, Xv, yv


def test_early_stopping_verbose_says_when_and_which_weights(capsys):
    X, y, Xv, yv = _plateau_data()
    model = _model()
    stop = fr.EarlyStopping(patience=2, verbose=1)
    model.fit(X, y, epochs=60, batch_size=16, validation_data=(Xv, yv), callbacks=[stop],
              verbose=0)
    out = capsys.readouterr().out
    assert stop.stopped_epoch is not None
    assert f"early stopping at epoch {stop.stopped_epoch + 1}" in out
    assert f"restored the weights of epoch {stop.best_epoch + 1}" in out
    assert out.count("early stopping") == 1


def test_fit_progress_reports_early_stopping_once(capsys):
    X, y, Xv, yv = _plateau_data()
    model = _model()
    stop = fr.EarlyStopping(patience=2)          # quiet itself: fit's progress says it
    model.fit(X, y, epochs=60, batch_size=16, validation_data=(Xv, yv), callbacks=[stop],
              verbose=2)
    out = capsys.readouterr().out
    assert out.count("early stopping at epoch") == 1
    assert f"restored the weights of epoch {stop.best_epoch + 1}" in out
    model.fit(X, y, epochs=60, batch_size=16, validation_data=(Xv, yv),
              callbacks=[fr.EarlyStopping(patience=2)], verbose=0)
    assert capsys.readouterr().out == ""


def test_fit_progress_off_a_terminal_is_complete_lines(capsys):
    X, y, Xv, yv = _plateau_data()
    _model().fit(X, y, epochs=2, batch_size=16, validation_data=(Xv, yv), verbose=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["Epoch", "1/2"], ["Epoch", "2/2"]]
    assert all("val_loss" in line and "…" not in line for line in lines)


@pytest.mark.parametrize("width,needle", [(64, "X.reshape(1, -1)"), (1, "X.reshape(-1, 1)")])
def test_one_sample_gets_the_right_reshape_hint(width, needle):
    model = _model(input_dim=width)
    x = np.zeros(width if width > 1 else 5, np.float32)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        model.predict(x)
    if width == 64:
        with pytest.raises(ValueError, match="looks like one sample of 64 features"):
            model.predict(x)
