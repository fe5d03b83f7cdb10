"""The public API: fit/predict/evaluate, weights, persistence, callbacks and every bad input."""
import os
import warnings

import numpy as np
import pytest

import fastreg as fr

from netutil import fresh_rng, make_data, make_model, randn


def _regression(rng, n=200, d=3):
    X = randn(rng, (n, d))
    y = (np.sin(X).sum(axis=1, keepdims=True) + 0.05 * rng.standard_normal((n, 1))).astype(np.float32)
    return X, y


def _mlp(seed=0, **kw):
    return fr.Sequential([fr.Dense(16, "relu", dropout=0.1, regularizer=fr.L2(1e-4)),
                          fr.Dense(1)], seed=seed, **kw)


def test_issue_example_runs_and_records_history():
    rng = fresh_rng()
    X, y = _regression(rng, 400, 1)
    Xv, yv = _regression(rng, 100, 1)
    model = fr.Sequential([
        fr.Dense(64, activation="leaky_relu", dropout=0.1, regularizer=fr.L2(1e-4)),
        fr.Dense(64, activation="tanh", dropout=0.1, regularizer=fr.ElasticNet(l1=1e-5, l2=1e-4)),
        fr.Dense(1)], input_dim=1, seed=0)
    model.compile(loss="mse", optimizer=fr.Adam(lr=1e-3), backend="numba")
    history = model.fit(X, y, epochs=5, batch_size=128, validation_data=(Xv, yv),
                        callbacks=[fr.EarlyStopping(patience=10, restore_best_weights=True)],
                        verbose=0)
    for key in ("loss", "val_loss", "penalty"):
        assert len(history.history[key]) == 5 and np.isfinite(history.history[key]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert model.predict(Xv).shape == (100, 1)
    assert model.evaluate(Xv, yv) == pytest.approx(float(np.mean((model.predict(Xv) - yv) ** 2)),
                                                   rel=1e-5)
    weights = model.get_weights()
    assert [w.shape for w in weights] == [(1, 64), (64,), (64, 64), (64,), (64, 1), (1,)]
    assert history.history["penalty"][-1] == pytest.approx(model.penalty(), rel=0.05)


def test_predict_returns_probabilities_for_cross_entropies():
    rng = fresh_rng()
    X = randn(rng, (60, 4))
    model = make_model((4, 8, 3), loss="sparse_categorical_crossentropy", backend="numba")
    p = model.predict(X)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    model = make_model((4, 8, 2), loss="binary_crossentropy", backend="numba")
    p = model.predict(X)
    assert ((p > 0) & (p < 1)).all()


def test_last_partial_batch_is_used():
    rng = fresh_rng()
    X, y = _regression(rng, 10, 2)
    model = _mlp(input_dim=2)
    model.compile(optimizer=fr.SGD(0.1), backend="numba")
    model.fit(X, y, epochs=1, batch_size=4, verbose=0)
    assert model._network.counters.step == 3  # 4 + 4 + 2


def test_shuffle_is_seeded_and_fit_is_reproducible():
    rng = fresh_rng()
    X, y = _regression(rng, 90, 2)
    out = []
    for _ in range(2):
        model = _mlp(seed=5, input_dim=2)
        model.compile(backend="numba")
        model.fit(X, y, epochs=3, batch_size=16, verbose=0)
        out.append(model.get_weights())
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_set_get_weights_and_save_load_roundtrip(tmp_path):
    rng = fresh_rng()
    X, y = _regression(rng, 64, 3)
    model = _mlp(input_dim=3)
    model.compile(optimizer=fr.AdamW(1e-3, weight_decay=1e-2), backend="numba")
    model.fit(X, y, epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = fr.load_model(path)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    # training continues identically from the saved optimizer state and counters
    model.fit(X, y, epochs=1, batch_size=16, verbose=0)
    loaded.fit(X, y, epochs=1, batch_size=16, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    w = [x * 0.5 for x in model.get_weights()]
    model.set_weights(w)
    for a, b in zip(w, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_restores_best_even_without_running_out_of_patience():
    rng = fresh_rng()
    X, y = _regression(rng, 200, 2)
    Xv, yv = _regression(rng, 50, 2)
    model = _mlp(input_dim=2)
    model.compile(optimizer=fr.Adam(0.05), backend="numba")
    es = fr.EarlyStopping(patience=100)
    hist = model.fit(X, y, epochs=8, batch_size=32, validation_data=(Xv, yv), callbacks=[es],
                     verbose=0)
    best = int(np.argmin(hist.history["val_loss"]))
    assert es.best_epoch == best
    assert model.evaluate(Xv, yv) == pytest.approx(min(hist.history["val_loss"]), rel=1e-6)


def test_early_stopping_stops_after_patience():
    rng = fresh_rng()
    X, y = _regression(rng, 100, 2)
    model = _mlp(input_dim=2)
    model.compile(optimizer=fr.SGD(1e-12), backend="numba")  # no progress at all
    es = fr.EarlyStopping(monitor="loss", patience=2, min_delta=1.0)
    hist = model.fit(X, y, epochs=20, batch_size=50, callbacks=[es], verbose=0)
    assert len(hist.history["loss"]) == 3 and es.stopped_epoch == 2


def test_early_stopping_on_missing_metric_is_a_clear_error():
    rng = fresh_rng()
    X, y = _regression(rng, 20, 2)
    model = _mlp(input_dim=2)
    model.compile(backend="numba")
    before = model.get_weights()
    with pytest.raises(ValueError, match="validation_data"):
        model.fit(X, y, epochs=2, callbacks=[fr.EarlyStopping()], verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_stops_with_warning_and_finite_weights():
    rng = fresh_rng()
    X, y = _regression(rng, 128, 2)
    y = y * 1e30
    model = _mlp(input_dim=2)
    model.compile(optimizer=fr.SGD(10.0), backend="numba")
    with pytest.warns(RuntimeWarning, match="epoch 1") as record:
        hist = model.fit(X, y, epochs=5, batch_size=16, verbose=0)
    assert record[0].filename == __file__            # points at the user's fit call
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert len(hist.history.get("loss", [])) == 0


def test_failed_fit_leaves_weights_untouched():
    rng = fresh_rng()
    X, y = _regression(rng, 64, 2)
    model = _mlp(input_dim=2)
    model.compile(backend="numba")
    before = model.get_weights()

    class Boom(fr.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.fit(X, y, epochs=4, batch_size=16, callbacks=[Boom()], verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert model._network.counters.step == 0


def test_verbose_prints_progress(capsys):
    rng = fresh_rng()
    X, y = _regression(rng, 64, 2)
    model = _mlp(input_dim=2)
    model.compile(backend="numba")
    model.fit(X, y, epochs=2, batch_size=16, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "loss" in out
    model.fit(X, y, epochs=2, batch_size=16, verbose=0)
    assert capsys.readouterr().out == ""


def test_standalone_dropout_on_inputs_and_folding():
    model = fr.Sequential([fr.Dropout(0.2), fr.Dense(4, "relu", dropout=0.5), fr.Dropout(0.5),
                           fr.Dense(1)], input_dim=3)
    blocks = model._blocks()
    assert blocks[0].in_drop == pytest.approx(0.2)
    assert blocks[0].out_drop == pytest.approx(0.75)
    model.compile(backend="numba")
    rng = fresh_rng()
    X, y = _regression(rng, 40, 3)
    model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(model.predict(X)).all()


# ---------------------------------------------------------------- bad inputs
@pytest.fixture
def compiled():
    model = _mlp(input_dim=3)
    model.compile(backend="numba")
    return model


@pytest.mark.parametrize("X,y,match", [
    (np.full((10, 3), np.nan), np.zeros(10), "NaN"),
    (np.full((10, 3), np.inf), np.zeros(10), "inf"),
    (np.zeros(10), np.zeros(10), "2-D"),
    (np.zeros((10, 4)), np.zeros(10), "4 features"),
    (np.zeros((10, 3)), np.zeros(9), "9 rows"),
    (np.zeros((10, 3)), np.full(10, np.nan), "NaN"),
    (np.zeros((10, 3)), np.zeros((10, 2)), "2 columns"),
])
def test_bad_data_is_rejected_and_model_untouched(compiled, X, y, match):
    before = compiled.get_weights()
    with pytest.raises(ValueError, match=match):
        compiled.fit(X, y, verbose=0)
    for a, b in zip(before, compiled.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_labels_outside_range():
    model = make_model((3, 4, 3), loss="sparse_categorical_crossentropy", backend="numba")
    with pytest.raises(ValueError, match="outside 0..2"):
        model.fit(np.zeros((4, 3)), np.array([0, 1, 2, 3]), verbose=0)
    with pytest.raises(ValueError, match="integer"):
        model.fit(np.zeros((4, 3)), np.array([0, 1.5, 2, 1]), verbose=0)


def test_bce_targets_outside_unit_interval():
    model = make_model((3, 4, 1), loss="binary_crossentropy", backend="numba")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.fit(np.zeros((2, 3)), np.array([0.0, 2.0]), verbose=0)


@pytest.mark.parametrize("make,match", [
    (lambda: fr.Dense(4, dropout=1.0), r"\[0, 1\)"),
    (lambda: fr.Dense(4, dropout=-0.1), r"\[0, 1\)"),
    (lambda: fr.Dropout(1.5), r"\[0, 1\)"),
    (lambda: fr.L2(-1e-4), ">= 0"),
    (lambda: fr.L1(float("nan")), "finite"),
    (lambda: fr.ElasticNet(l1=-1, l2=0), ">= 0"),
    (lambda: fr.MaxNorm(0), "> 0"),
    (lambda: fr.Adam(lr=0), "> 0"),
    (lambda: fr.SGD(lr=-1), "> 0"),
    (lambda: fr.Adam(beta1=1.0), r"\[0, 1\)"),
    (lambda: fr.Dense(4, activation="swish2"), "unknown activation"),
    (lambda: fr.Dense(0), "positive integer"),
    (lambda: fr.SGD(0.1, nesterov=True), "momentum"),
])
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_loss_backend_and_logits_rule():
    model = _mlp(input_dim=3)
    with pytest.raises(ValueError, match="unknown loss"):
        model.compile(loss="hinge")
    with pytest.raises(ValueError, match="unknown backend"):
        model.compile(backend="tpu")
    sig = fr.Sequential([fr.Dense(2, "sigmoid")], input_dim=3)
    with pytest.raises(ValueError, match="logits"):
        sig.compile(loss="binary_crossentropy")


def test_env_backend_is_resolved(monkeypatch):
    monkeypatch.setenv("FASTREG_BACKEND", "numpy")
    model = _mlp(input_dim=3)
    model.compile()
    assert model.backend == "numpy"
    monkeypatch.setenv("FASTREG_BACKEND", "gpu9000")
    with pytest.raises(ValueError, match="FASTREG_BACKEND"):
        model.compile()


def test_set_weights_wrong_shapes_is_all_or_nothing(compiled):
    before = compiled.get_weights()
    bad = [w + 1 for w in before]
    bad[2] = np.zeros((5, 5))
    with pytest.raises(ValueError, match="shape"):
        compiled.set_weights(bad)
    with pytest.raises(ValueError, match="expects 4"):
        compiled.set_weights(before[:2])
    for a, b in zip(before, compiled.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        fr.load_model(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="not a readable fastreg model"):
        fr.load_model(junk)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a valid fastreg model"):
        fr.load_model(other)
    model = _mlp(input_dim=3)
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as data:
        members = {k: data[k] for k in data.files}
    members["W0"] = np.zeros((7, 7), np.float32)
    np.savez(tmp_path / "bad.npz", **members)
    with pytest.raises(ValueError, match="shape"):
        fr.load_model(tmp_path / "bad.npz")


def test_save_does_not_leave_partial_files(tmp_path):
    model = _mlp(input_dim=3)
    model.save(tmp_path / "m.npz")
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_user_arrays_are_not_modified(compiled):
    rng = fresh_rng()
    X, y = _regression(rng, 30, 3)
    X0, y0 = X.copy(), y.copy()
    compiled.fit(X, y, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(y, y0)


def test_progress_chunks_change_nothing():
    """verbose=1 runs an epoch in chunks of whole batches: the result is bit-identical."""
    rng = fresh_rng()
    X, y = _regression(rng, 333, 3)
    out = []
    for verbose in (0, 1):
        model = _mlp(seed=2, input_dim=3)
        model.compile(backend="numba")
        model.fit(X, y, epochs=2, batch_size=8, verbose=verbose)
        out.append(model.get_weights())
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)
