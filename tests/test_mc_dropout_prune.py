"""MC dropout (``predict(mc_samples=n)``) and ``prune()``.

MC dropout is checked against a NumPy computation of the documented masks (kernels/mc.py,
``mc_dropout_forward``): pass c takes R = max(1, 8192 // n) rows, stacks n consecutive copies
of each, and layer l draws from Philox counter (element // 4, step0 + c, MC_LAYER_TAG | l,
stream). Pruning is checked by the predictions before and after, the report, and that the
pruned model trains, saves and loads.
"""
import sys

import numpy as np
import pytest

import fastreg as fr
from fastreg import backend as backends
from fastreg.kernels import contract
from fastreg.kernels import reference
from fastreg.kernels.philox import (MC_LAYER_TAG, STREAM_DROPOUT, STREAM_INPUT_DROPOUT,
                                    dropout_scale, dropout_threshold, keep_mask)

from netutil import fresh_rng, randn


def _available(name):
    try:
        backends.resolve(name)
        return True
    except (backends.BackendUnavailable, ValueError):
        return False


CPU_BACKENDS = [b for b in ("numpy", "numba", "cython") if _available(b)]


def _model(sizes=(5, 12, 9, 3), acts=("tanh", "relu"), drop=(0.3, 0.2), in_drop=0.1,
           loss="sparse_categorical_crossentropy", backend="numpy", seed=4, bias=True):
    layers = [fr.Dropout(in_drop)] if in_drop else []
    for units, act, d in zip(sizes[1:-1], acts, drop):
        layers.append(fr.Dense(units, act, dropout=d, use_bias=bias))
    layers.append(fr.Dense(sizes[-1]))
    model = fr.Sequential(layers, input_dim=sizes[0], seed=seed)
    rng = fresh_rng()
    # random biases: the zero initial biases would hide a bias that is not applied
    model.set_weights([w if w.ndim == 2 else randn(rng, w.shape, scale=0.3)
                       for w in model.get_weights()])
    model.compile(loss=loss, optimizer=fr.Adam(1e-2), backend=backend)
    return model


def _mc_oracle(model, X, n, seed, step0=0):
    """MC mean/std in plain NumPy from the documented counters (all passes, all layers)."""
    blocks = model._blocks()
    weights = model.get_weights()
    loss = contract.LOSSES[model.loss]
    rows = max(1, 8192 // n)
    samples = []
    for c, start in enumerate(range(0, X.shape[0], rows)):
        x = np.repeat(X[start:start + rows], n, axis=0)
        step = step0 + c
        if blocks[0].in_drop:
            rate = blocks[0].in_drop
            keep = keep_mask(x.shape, dropout_threshold(rate), seed, step, MC_LAYER_TAG,
                             STREAM_INPUT_DROPOUT)
            x = np.where(keep, x * dropout_scale(rate), np.float32(0))
        for l, blk in enumerate(blocks):
            W, b = weights[2 * l], weights[2 * l + 1]
            d = blk.dense
            z = x @ W + b if b.size else x @ W
            a = reference.activation(z, contract.ACTIVATIONS[d.activation], d.negative_slope)
            if blk.out_drop:
                rate = blk.out_drop
                keep = keep_mask(a.shape, dropout_threshold(rate), seed, step,
                                 MC_LAYER_TAG | l, STREAM_DROPOUT)
                a = np.where(keep, a * dropout_scale(rate), np.float32(0))
            x = a
        p = reference.output_transform(x, loss).astype(np.float64)
        samples.append(p.reshape(-1, n, p.shape[1]))
    s = np.concatenate(samples)
    return s.mean(axis=1), s.std(axis=1)


# ---------------------------------------------------------------- MC dropout
@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "binary_crossentropy",
                                  "mse"])
def test_mc_matches_numpy_oracle(loss):
    rng = fresh_rng()
    model = _model(loss=loss)
    X = randn(rng, (300, 5))
    n = 64                                    # 128 rows per pass: 3 passes, the last partial
    mean, std = model.predict(X, mc_samples=n, seed=11)
    assert mean.shape == std.shape == (300, 3) and mean.dtype == std.dtype == np.float32
    ref_mean, ref_std = _mc_oracle(model, X, n, seed=11)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-4, atol=1e-6)
    assert (std > 0).mean() > 0.9             # the copies of a row got different masks
    if loss != "mse":
        assert ((mean >= 0) & (mean <= 1)).all()   # averages of probabilities
    if loss == "sparse_categorical_crossentropy":
        np.testing.assert_allclose(mean.sum(axis=1), 1.0, rtol=1e-5)


def test_mc_one_sample_is_one_dropout_pass():
    rng = fresh_rng()
    model = _model(loss="mse")
    X = randn(rng, (40, 5))
    mean, std = model.predict(X, mc_samples=1, seed=3)
    assert (std == 0).all()
    np.testing.assert_allclose(mean, _mc_oracle(model, X, 1, seed=3)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(mean, model.predict(X), rtol=1e-3)   # dropout was on


@pytest.mark.skipif(len(CPU_BACKENDS) < 2, reason="one CPU backend only")
def test_mc_backends_agree():
    rng = fresh_rng()
    X = randn(rng, (150, 5))
    results = {}
    for name in CPU_BACKENDS:
        model = _model(backend=name, seed=9)
        if results:
            model.set_weights(weights)
        weights = model.get_weights()
        results[name] = model.predict(X, mc_samples=100, seed=2)   # 81 rows a pass: 2 passes
    first = results[CPU_BACKENDS[0]]
    for name in CPU_BACKENDS[1:]:
        np.testing.assert_allclose(results[name][0], first[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(results[name][1], first[1], rtol=1e-4, atol=1e-6)


def test_mc_cuda_agrees_with_numpy(monkeypatch):
    if not _available("cuda"):
        pytest.skip("no CUDA backend (numba-cuda) here")
    from fastreg.kernels import cuda
    if cuda.on_simulator():       # small tiles and a short GIL switch keep the simulator quick
        for name, value in (("TILE_M", 16), ("TILE_N", 16), ("TILE_K", 8), ("THREAD_M", 4),
                            ("THREAD_N", 4), ("BLOCK", 16)):
            monkeypatch.setattr(cuda, name, value)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(5e-4)
    try:
        rng = fresh_rng()
        X = randn(rng, (3, 4))
        model = _model(sizes=(4, 6, 2), acts=("tanh",), drop=(0.3,), backend="numpy",
                       loss="binary_crossentropy")
        expected = model.predict(X, mc_samples=5, seed=8)
        model.compile(loss="binary_crossentropy", backend="cuda")
        got = model.predict(X, mc_samples=5, seed=8)
    finally:
        if cuda.on_simulator():
            sys.setswitchinterval(interval)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-6)


def test_mc_reproducible_by_seed_and_fresh_without_one(tmp_path):
    rng = fresh_rng()
    X = randn(rng, (50, 5))
    model = _model(backend="numba")
    a = model.predict(X, mc_samples=20, seed=5)
    b = model.predict(X, mc_samples=20, seed=5)
    c = model.predict(X, mc_samples=20, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])
    # an explicit seed leaves the counter alone
    assert model._network.counters.mc_step == 0
    # seed=None: the model's seed, then fresh masks each call, reproducible from the model
    twin = _model(backend="numba")
    twin.set_weights(model.get_weights())
    first = model.predict(X, mc_samples=20)
    second = model.predict(X, mc_samples=20)
    assert not np.allclose(first[0], second[0])
    np.testing.assert_array_equal(first[0], model.predict(X, mc_samples=20, seed=model.seed)[0])
    np.testing.assert_array_equal(twin.predict(X, mc_samples=20)[0], first[0])
    path = tmp_path / "m.npz"
    twin.save(path)                            # the MC counter is saved with the model
    np.testing.assert_array_equal(fr.load_model(path).predict(X, mc_samples=20)[0],
                                  second[0])


def test_mc_rows_do_not_depend_on_batch_size_or_row_count():
    rng = fresh_rng()
    X = randn(rng, (300, 5))
    model = _model(backend="numba")
    full = model.predict(X, mc_samples=64, seed=1)
    part = model.predict(X[:150], mc_samples=64, seed=1, batch_size=7)
    np.testing.assert_array_equal(part[0], full[0][:150])
    np.testing.assert_array_equal(part[1], full[1][:150])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mc_without_dropout_has_zero_std(backend):
    rng = fresh_rng()
    X = randn(rng, (30, 5))
    model = _model(drop=(0.0, 0.0), in_drop=0.0, backend=backend)
    mean, std = model.predict(X, mc_samples=10, seed=1)
    assert (std == 0).all()
    np.testing.assert_allclose(mean, model.predict(X), rtol=1e-6, atol=1e-7)
    assert model.predict(X, mc_samples=10)[0].shape == (30, 3)


def test_mc_input_dropout_alone_gives_spread():
    rng = fresh_rng()
    X = randn(rng, (20, 5))
    model = _model(drop=(0.0, 0.0), in_drop=0.2, loss="mse")
    mean, std = model.predict(X, mc_samples=16, seed=1)
    assert (std > 0).any()
    ref_mean, ref_std = _mc_oracle(model, X, 16, seed=1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "10", [3]])
def test_mc_samples_rejected(bad):
    model = _model()
    X = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="mc_samples"):
        model.predict(X, mc_samples=bad)


def test_mc_seed_rejected():
    model = _model()
    X = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="mc_samples"):
        model.predict(X, seed=3)                  # a seed without MC dropout
    for bad in (-1, 2 ** 64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            model.predict(X, mc_samples=4, seed=bad)


def test_mc_uncompiled_model_returns_raw_outputs():
    rng = fresh_rng()
    X = randn(rng, (10, 3))
    model = fr.Sequential([fr.Dense(8, "relu", dropout=0.5), fr.Dense(2)], input_dim=3)
    mean, std = model.predict(X, mc_samples=8, seed=0)
    assert mean.shape == (10, 2) and (std > 0).any()
    assert (mean < 0).any()                       # not squashed into probabilities


# ---------------------------------------------------------------- prune
def _dead_model(backend="numpy", loss="mse", seed=0, next_bias=True):
    """5 -> 12 sigmoid (no bias) -> 10 tanh -> 4 relu -> 3, with dead units put in by hand:
    layer 0 units 2, 7, 8 (constant sigmoid(0) = 0.5), layer 1 unit 4 (constant tanh(b_4))
    and unit 6, whose only inputs are the dead units of layer 0 (found after their removal)."""
    layers = [fr.Dense(12, "sigmoid", dropout=0.2, use_bias=False), fr.Dense(10, "tanh"),
              fr.Dense(4, "relu", use_bias=next_bias), fr.Dense(3)]
    model = fr.Sequential(layers, input_dim=5, seed=seed)
    rng = fresh_rng()
    w = model.get_weights()
    for i in (3, 5, 7):
        w[i] = randn(rng, w[i].shape, scale=0.5)  # nonzero biases: their f(b) gets folded
    w[0][:, [2, 7, 8]] = 0
    w[2][:, 4] = 0
    w[2][[0, 1, 3, 4, 5, 6, 9, 10, 11], 6] = 0
    w[6][:, 1] = 0                                # an output unit: never pruned
    model.set_weights(w)
    model.compile(loss=loss, optimizer=fr.Adam(1e-2), backend=backend)
    return model


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prune_keeps_predictions_and_reports(backend):
    rng = fresh_rng()
    X = randn(rng, (64, 5))
    model = _dead_model(backend)
    before = model.predict(X)
    params_before = model.count_params()
    report = model.prune()
    np.testing.assert_allclose(model.predict(X), before, rtol=1e-5, atol=1e-6)
    assert report.removed == [3, 2, 0, 0]
    assert report.total_removed == 5
    assert report.units_before == [12, 10, 4, 3] and report.units_after == [9, 8, 4, 3]
    assert report.params_before == params_before == 5 * 12 + 12 * 10 + 10 + 10 * 4 + 4 + 4 * 3 + 3
    assert report.params_after == model.count_params() == 5 * 9 + 9 * 8 + 8 + 8 * 4 + 4 + 4 * 3 + 3
    assert list(report.kept[0]) == [0, 1, 3, 4, 5, 6, 9, 10, 11]
    assert list(report.kept[1]) == [0, 1, 2, 3, 5, 7, 8, 9]
    assert list(report.kept[3]) == [0, 1, 2]
    assert [w.shape for w in model.get_weights()] == [(5, 9), (0,), (9, 8), (8,), (8, 4), (4,),
                                                      (4, 3), (3,)]
    assert [layer.units for layer in model.layers] == [9, 8, 4, 3]
    assert "5->9" in model.summary() and "pruned 5 units" in str(report)


def test_prune_does_not_touch_the_callers_layers():
    dense = fr.Dense(6, "relu")
    model = fr.Sequential([dense, fr.Dense(1)], input_dim=2)
    w = model.get_weights()
    w[0][:, 0] = 0
    model.set_weights(w)
    assert model.prune().removed == [1, 0]
    assert dense.units == 6 and model.layers[0].units == 5


def test_prune_without_a_bias_to_fold_into_keeps_nonzero_contributions():
    rng = fresh_rng()
    X = randn(rng, (32, 5))
    model = _dead_model(next_bias=False)
    w = model.get_weights()
    w[3][4] = 0                               # layer 1 unit 4: tanh(0) = 0 contributes 0
    w[4][:, [0, 2]] = 0                       # relu layer 2, no bias: relu(0) = 0
    model.set_weights(w)
    before = model.predict(X)
    report = model.prune()
    np.testing.assert_allclose(model.predict(X), before, rtol=1e-5, atol=1e-6)
    # layer 2 has no bias: of layer 1's dead units only unit 4 (zero constant) can go; unit 6
    # (constant tanh(b_6 + folded inputs) != 0) has nowhere to fold and stays
    assert report.removed == [3, 1, 2, 0]
    assert 6 in report.kept[1] and 4 not in report.kept[1]


def test_prune_nothing_dead_changes_nothing():
    rng = fresh_rng()
    X = randn(rng, (20, 5))
    model = _model(loss="mse", backend="numba")
    weights = model.get_weights()
    before = model.predict(X)
    report = model.prune()
    assert report.removed == [0, 0, 0] and report.total_removed == 0
    assert report.params_before == report.params_after == model.count_params()
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(X), before)


def test_prune_never_removes_output_units_or_a_whole_layer():
    model = fr.Sequential([fr.Dense(4, "tanh"), fr.Dense(3)], input_dim=2, seed=1)
    w = model.get_weights()
    w[0][...] = 0                             # every hidden unit dead
    w[1][...] = np.array([0.1, -0.2, 0.3, 0.4], np.float32)
    w[2][:, 1] = 0                            # an output unit with a zero column
    model.set_weights(w)
    X = fresh_rng().standard_normal((8, 2)).astype(np.float32)
    before = model.predict(X)
    report = model.prune()
    assert report.removed == [3, 0] and report.units_after == [1, 3]
    np.testing.assert_allclose(model.predict(X), before, rtol=1e-5, atol=1e-6)


def test_prune_needs_a_built_model():
    with pytest.raises(ValueError, match="no weights"):
        fr.Sequential([fr.Dense(3), fr.Dense(1)]).prune()


@pytest.mark.parametrize("backend", [b for b in ("numpy", "numba") if b in CPU_BACKENDS])
def test_fit_after_prune_with_shrunk_optimizer_state(backend):
    rng = fresh_rng()
    X = randn(rng, (64, 5))
    y = randn(rng, (64, 3))
    model = _dead_model(backend)
    model.fit(X, y, epochs=1, batch_size=16, verbose=0)
    w = model.get_weights()                  # training revived the dead units: kill again
    w[0][:, [2, 7, 8]] = 0
    model.set_weights(w)
    moments = [m.copy() for m in model._network.moments("m", "W")
               + model._network.moments("v", "W")]
    t = model._network.counters.t
    report = model.prune()
    assert report.removed[0] == 3
    keep0 = report.kept[0]
    np.testing.assert_array_equal(model._network.moments("m", "W")[0], moments[0][:, keep0])
    np.testing.assert_array_equal(model._network.moments("v", "W")[1],
                                  moments[4 + 1][keep0][:, report.kept[1]])
    assert (model._network.moments("m", "b")[0].shape == (0,)
            and model._network.moments("m", "b")[1].shape == (len(report.kept[1]),))
    assert model._network.counters.t == t
    for params, ms in ((model._network.kernels(), model._network.moments("m", "W")),
                       (model._network.kernels(), model._network.moments("v", "W")),
                       (model._network.biases(), model._network.moments("m", "b"))):
        assert [p.shape for p in params] == [m.shape for m in ms]
    history = model.fit(X, y, epochs=2, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model._network.counters.t == t + 8


def test_save_load_after_prune(tmp_path):
    rng = fresh_rng()
    X = randn(rng, (40, 5))
    y = rng.integers(0, 3, 40)
    model = _dead_model("numba", loss="sparse_categorical_crossentropy")
    model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    w = model.get_weights()
    w[0][:, [2, 7, 8]] = 0
    model.set_weights(w)
    report = model.prune()
    path = tmp_path / "pruned.npz"
    model.save(path)
    loaded = fr.load_model(path)
    assert [layer.units for layer in loaded.layers] == report.units_after
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    for a, b in zip(loaded._network.moments("m", "W") + loaded._network.moments("v", "W"),
                    model._network.moments("m", "W") + model._network.moments("v", "W")):
        np.testing.assert_array_equal(a, b)
    # MC dropout on the pruned widths: the loaded model draws the same masks
    mean, std = loaded.predict(X, mc_samples=4, seed=0)
    mean0, std0 = model.predict(X, mc_samples=4, seed=0)
    assert mean.shape == (40, 3)
    np.testing.assert_array_equal(mean, mean0)
    np.testing.assert_array_equal(std, std0)
    assert np.isfinite(loaded.fit(X, y, epochs=1, batch_size=8, verbose=0).history["loss"]).all()


def test_prune_after_l1_training_removes_units_without_changing_predictions():
    rng = fresh_rng()
    X = randn(rng, (128, 6))
    y = (X[:, :1] * 0.5).astype(np.float32)
    model = fr.Sequential([fr.Dense(24, "relu", regularizer=fr.L1(0.05)), fr.Dense(1)],
                          input_dim=6, seed=0)
    model.compile(loss="mse", optimizer=fr.SGD(0.1), backend="numba")
    model.fit(X, y, epochs=20, batch_size=32, verbose=0)
    dead = int((~model.get_weights()[0].any(axis=0)).sum())
    assert dead > 0                               # proximal L1 left whole zero columns
    before = model.predict(X)
    report = model.prune()
    assert report.removed == [min(dead, 23), 0]
    np.testing.assert_allclose(model.predict(X), before, rtol=1e-5, atol=1e-6)
