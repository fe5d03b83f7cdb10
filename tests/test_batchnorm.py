"""BatchNorm (fr.BatchNorm after a Dense): the reference checked by central differences (the
kernels of every backend against it: tests/test_kernels.py), training steps of every backend,
training vs inference, no penalty on gamma/beta, weights order, save/load, prune, errors.

The CUDA tests run on the numba-cuda simulator (conftest.py) with small GEMM tiles.
"""

import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract
from fastreg.kernels import reference
from fastreg.kernels.philox import dropout_scale, dropout_threshold

from netutil import backend_module, central_difference, fresh_rng, randn, small_cuda_tiles

ACTS = [contract.ACT_LINEAR, contract.ACT_RELU,
        contract.ACT_LEAKY_RELU, contract.ACT_TANH, contract.ACT_SIGMOID]


def _backend(name):
    return backend_module(name)


@pytest.fixture
def small_tiles(monkeypatch):
    """Small CUDA tiles on the simulator (netutil.small_cuda_tiles), so tile edges are hit."""
    try:
        from fastreg.kernels import cuda
    except ImportError:
        cuda = None
    if cuda is not None and cuda.cuda is None:
        cuda = None
    with small_cuda_tiles(monkeypatch, cuda):
        yield


def _layer(rng, B, I, O, dt, bias=True):
    x = randn(rng, (B, I), dt)
    W = randn(rng, (I, O), dt, 1 / np.sqrt(I))
    b = randn(rng, O, dt, 0.5) if bias else np.zeros(0, dt)
    gb = np.stack([1.0 + 0.5 * rng.standard_normal(O), rng.standard_normal(O)]).astype(dt)
    return x, W, b, gb


def _forward(ops, x, W, b, gb, act, thr, scale, seed=5, step=3, layer=1, eps=1e-3):
    B, O = x.shape[0], W.shape[1]
    dt = x.dtype
    out, xhat = np.zeros((B, O), dt), np.zeros((B, O), dt)
    save = np.zeros((contract.BN_SAVE_ROWS, O))
    ops.bn_dense_forward(x, W, b, out, xhat, gb, save, act, 0.1, thr, scale, eps, seed, step,
                         layer)
    return out, xhat, save


def _backward(ops, grad, out, xhat, save, x, W, b, gb, stats, act, thr, scale, want_dx=True,
              seed=5, step=3, layer=1, momentum=0.9):
    g = grad.copy()
    dW, db, dgb = np.zeros_like(W), np.full_like(b, 7.0), np.zeros_like(gb)
    dx = np.zeros_like(x) if want_dx else np.zeros((0, 0), x.dtype)
    st = stats.copy()
    ops.bn_dense_backward(g, out, xhat, x, W, gb, st, save.copy(), dW, db, dgb, dx, act, 0.1,
                          thr, scale, momentum, seed, step, layer)
    return g, dW, db, dgb, dx, st


# ---------------------------------------------------------------- the reference, float64
@pytest.mark.parametrize("act", [contract.ACT_TANH, contract.ACT_RELU, contract.ACT_SIGMOID,
                                 contract.ACT_LEAKY_RELU])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_reference_gradients_by_central_differences(act, rate):
    """dL/dW, dL/db (exactly 0), dL/dgamma, dL/dbeta, dL/dx of L = sum(R * out), float64,
    the dropout mask fixed by (seed, step, layer)."""
    rng = fresh_rng()
    B, I, O = 6, 4, 3
    x, W, b, gb = _layer(rng, B, I, O, np.float64)
    Rw = rng.standard_normal((B, O))
    thr, scale = dropout_threshold(rate), dropout_scale(rate, np.float64)

    def loss(x_, W_, b_, gb_):
        return float((_forward(reference, x_, W_, b_, gb_, act, thr, scale)[0] * Rw).sum())

    out, xhat, save = _forward(reference, x, W, b, gb, act, thr, scale)
    g, dW, db, dgb, dx, _ = _backward(reference, Rw, out, xhat, save, x, W, b, gb, np.zeros((2, O)),
                                      act, thr, scale)
    args = [x.copy(), W.copy(), b.copy(), gb.copy()]
    for k, analytic in ((0, dx), (1, dW), (2, db), (3, dgb)):
        num = central_difference(lambda: loss(*args), args[k])
        np.testing.assert_allclose(analytic, num, rtol=1e-6, atol=1e-7)
    assert not db.any()             # exactly zero: the batch mean absorbs the bias


def test_reference_forward_is_the_paper_formula():
    rng = fresh_rng()
    x, W, b, gb = _layer(rng, 9, 4, 5, np.float64)
    out, xhat, save = _forward(reference, x, W, b, gb, contract.ACT_TANH, 0, 1.0, eps=1e-3)
    z = x @ W + b
    zhat = (z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + 1e-3)   # biased variance
    np.testing.assert_allclose(xhat, zhat, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, np.tanh(gb[0] * zhat + gb[1]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(save[contract.BN_SAVE_MEAN], z.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(save[contract.BN_SAVE_VAR], z.var(axis=0), rtol=1e-12)


# ---------------------------------------------------------------- backends against it
BACKENDS = ["numba", "cython", "cuda"]


def _bn_model(backend, dtype="float32", opt=None, dropout=0.2, seed=4, momentum=0.9):
    model = fr.Sequential([fr.Dense(9, "tanh", dropout=dropout), fr.BatchNorm(momentum=momentum),
                           fr.Dense(7, "relu", use_bias=False), fr.BatchNorm(),
                           fr.Dense(2), fr.BatchNorm(0.8, 1e-2)],
                          input_dim=6, seed=seed, dtype=dtype)
    model.compile(optimizer=opt or fr.Adam(1e-2), backend=backend)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_match_reference(backend, small_tiles):
    """Three Adam / SGD-momentum steps (one partial batch) through the compiled epochs: the
    weights, gamma/beta and running statistics agree with the reference to float32 rounding,
    and in float64 to float64 rounding (CPU backends)."""
    _backend(backend)
    rng = fresh_rng()
    dtypes = ["float32"] if backend == "cuda" else ["float32", "float64"]
    for dtype in dtypes:
        X = randn(rng, (40, 6), dtype)
        y = randn(rng, (40, 2), dtype)
        for opt in (lambda: fr.Adam(1e-2), lambda: fr.SGD(0.05, momentum=0.9)):
            models = [_bn_model(b, dtype, opt()) for b in ("numpy", backend)]
            for m in models:
                m.fit(X, y, epochs=1, batch_size=16, verbose=0)
            tol = (dict(rtol=2e-4, atol=2e-5) if dtype == "float32"
                   else dict(rtol=1e-10, atol=1e-11))
            for a, r in zip(models[1].get_weights(), models[0].get_weights()):
                np.testing.assert_allclose(a, r, **tol)
            np.testing.assert_allclose(models[1].history.history["loss"],
                                       models[0].history.history["loss"], rtol=1e-5)
            np.testing.assert_allclose(models[1].predict(X), models[0].predict(X), **tol)


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
def test_fit_is_deterministic(backend):
    if backend != "numpy":
        _backend(backend)
    rng = fresh_rng()
    X, y = randn(rng, (50, 6)), randn(rng, (50, 2))
    runs = []
    for _ in range(2):
        m = _bn_model(backend)
        m.fit(X, y, epochs=2, batch_size=16, verbose=0)
        runs.append(m.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- training vs inference
def test_running_statistics_follow_keras_momentum():
    """One full-batch step: running = momentum * (0, 1) + (1 - momentum) * (batch mean,
    BIASED batch variance) of the pre-activation x @ W + b at the step's weights."""
    rng = fresh_rng()
    X, y = randn(rng, (32, 6), np.float64), randn(rng, (32, 2), np.float64)
    for backend in ("numpy", "numba"):
        m = _bn_model(backend, "float64", dropout=0.0, momentum=0.9)
        W0, b0 = m.get_weights()[:2]
        m.fit(X, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
        mm, mv = m.get_weights()[4:6]
        z = X @ W0 + b0
        np.testing.assert_allclose(mm, 0.1 * z.mean(axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(mv, 0.9 + 0.1 * z.var(axis=0), rtol=1e-12)


def test_inference_uses_running_statistics():
    rng = fresh_rng()
    X, y = randn(rng, (48, 6)), randn(rng, (48, 2))
    m = _bn_model("numba")
    m.fit(X, y, epochs=3, batch_size=16, verbose=0)
    w = [a.astype(np.float64) for a in m.get_weights()]
    eps = [float(np.float32(e)) for e in (1e-3, 1e-3, 1e-2)]

    def bn(z, g, b_, mm, mv, e):
        return g * (z - mm) / np.sqrt(mv + e) + b_

    h = np.tanh(bn(X @ w[0] + w[1], *w[2:6], eps[0]))          # dropout off at inference
    h = np.maximum(bn(h @ w[6], *w[8:12], eps[1]), 0)          # w[7]: the empty bias
    out = bn(h @ w[12] + w[13], *w[14:18], eps[2])
    np.testing.assert_allclose(m.predict(X), out, rtol=1e-4, atol=1e-5)
    assert m.evaluate(X, y) == pytest.approx(float(((out - y) ** 2).mean()), rel=1e-4)
    # the running statistics moved away from their initial (0, 1)
    assert np.abs(w[4]).max() > 1e-3 and np.abs(w[5] - 1).max() > 1e-3
    # MC dropout runs through the same folded (running-statistics) layers
    mean, std = m.predict(X[:5], mc_samples=4, seed=1)
    assert mean.shape == (5, 2) and np.isfinite(mean).all() and std.max() > 0


def test_fresh_model_predicts_with_initial_statistics():
    """Before any training: running mean 0, variance 1, so BN is zhat = z / sqrt(1 + eps)."""
    rng = fresh_rng()
    X = randn(rng, (5, 3), np.float64)
    m = fr.Sequential([fr.Dense(4, "tanh"), fr.BatchNorm(eps=0.5), fr.Dense(1)], input_dim=3,
                      dtype="float64")
    W0, b0, g, bt, mm, mv, W1, b1 = m.get_weights()
    np.testing.assert_array_equal(g, 1)
    np.testing.assert_array_equal(bt, 0)
    np.testing.assert_array_equal(mm, 0)
    np.testing.assert_array_equal(mv, 1)
    expect = np.tanh((X @ W0 + b0) / np.sqrt(1.5)) @ W1 + b1
    np.testing.assert_allclose(m.predict(X), expect, rtol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
def test_gamma_beta_never_penalized_and_bias_never_moves(backend):
    """One step of two models from the same weights, one with every penalty and constraint on
    the BatchNorm Dense (and AdamW decay): gamma/beta move identically (bitwise), W does
    not; the Dense's bias keeps its value (its gradient is exactly 0)."""
    if backend != "numpy":
        _backend(backend)
    rng = fresh_rng()
    X, y = randn(rng, (16, 5)), randn(rng, (16, 1))
    models = []
    for heavy in (False, True):
        reg = [fr.L1(0.1), fr.L2(0.5), fr.MaxNorm(0.5), fr.GroupLasso(0.1)] if heavy else None
        m = fr.Sequential([fr.Dense(6, "relu", regularizer=reg,
                                    bias_regularizer=fr.L2(0.5) if heavy else None),
                           fr.BatchNorm(), fr.Dense(1)], input_dim=5, seed=2)
        m.compile(optimizer=fr.AdamW(1e-2, weight_decay=0.5 if heavy else 0.0), backend=backend)
        m.set_weights([w + (0.3 if i == 1 else 0) for i, w in enumerate(m.get_weights())])
        net = m._network.training_plan(m.optimizer, 16, [1])
        for col in (contract.HP_L1, contract.HP_L2, contract.HP_MAXNORM, contract.HP_GROUP,
                    contract.HP_DECOUPLED):
            assert net.hpgb[0, col] == 0
        m.fit(X, y, epochs=1, batch_size=16, verbose=0)
        models.append(m.get_weights())
    plain, heavy = models
    for k in (2, 3):        # gamma, beta
        np.testing.assert_array_equal(plain[k], heavy[k])
        assert (plain[k] != np.array([1.0, 0.0][k - 2])).any()
    assert not np.array_equal(plain[0], heavy[0])
    np.testing.assert_array_equal(plain[1], np.full(6, 0.3, np.float32))   # bias unchanged
    assert model_penalty_ignores_gamma()


def model_penalty_ignores_gamma():
    m = fr.Sequential([fr.Dense(3, regularizer=fr.L2(1.0)), fr.BatchNorm(), fr.Dense(1)],
                      input_dim=2, seed=0)
    before = m.penalty()
    w = m.get_weights()
    w[2] = w[2] * 100
    m.set_weights(w)
    return m.penalty() == before


# ---------------------------------------------------------------- weights, save/load, prune
def test_get_weights_order_and_set_weights():
    m = fr.Sequential([fr.Dense(4, "relu"), fr.BatchNorm(), fr.Dense(3), fr.Dense(2),
                       fr.BatchNorm()], input_dim=5)
    shapes = [w.shape for w in m.get_weights()]
    assert shapes == [(5, 4), (4,), (4,), (4,), (4,), (4,), (4, 3), (3,), (3, 2), (2,),
                      (2,), (2,), (2,), (2,)]
    assert m.count_params() == sum(int(np.prod(s)) for s in shapes)
    rng = fresh_rng()
    new = [randn(rng, s) for s in shapes]
    new[5], new[13] = np.abs(new[5]) + 0.1, np.abs(new[13]) + 0.1   # variances
    m.set_weights(new)
    for a, b in zip(m.get_weights(), new):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="gamma, beta, moving_mean, moving_variance"):
        m.set_weights(new[:2] + new[6:])
    assert "batchnorm" in m.summary()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_save_load_round_trip_and_continue(tmp_path, backend):
    rng = fresh_rng()
    X, y = randn(rng, (40, 6)), randn(rng, (40, 2))
    m = _bn_model(backend)
    m.fit(X, y, epochs=2, batch_size=16, verbose=0)
    m.save(tmp_path / "m.npz")
    loaded = fr.load_model(tmp_path / "m.npz")
    for a, b in zip(loaded.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [type(layer).__name__ for layer in loaded.layers] == \
        [type(layer).__name__ for layer in m.layers]
    assert loaded.layers[5].momentum == 0.8 and loaded.layers[5].eps == 1e-2
    np.testing.assert_array_equal(loaded.predict(X), m.predict(X))
    for model in (m, loaded):       # the gamma/beta moments came back: same continuation
        model.fit(X, y, epochs=1, batch_size=16, verbose=0)
    for a, b in zip(loaded.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_prune_with_batchnorm_keeps_predictions():
    rng = fresh_rng()
    X, y = randn(rng, (64, 5)), randn(rng, (64, 2))
    m = fr.Sequential([fr.Dense(8, "tanh"), fr.BatchNorm(), fr.Dense(6, "relu"), fr.BatchNorm(),
                       fr.Dense(5, "sigmoid", use_bias=False), fr.BatchNorm(), fr.Dense(2)],
                      input_dim=5, seed=1)
    m.compile(optimizer=fr.Adam(1e-2), backend="numba")
    m.fit(X, y, epochs=2, batch_size=16, verbose=0)
    w = m.get_weights()
    w[0][:, [1, 4]] = 0         # dead units of a BN layer, next layer with BN
    w[6][:, [0, 5]] = 0         # dead units of a BN layer, next layer with BN and no bias
    w[12][:, 2] = 0             # dead unit of a BN layer, next layer plain
    m.set_weights(w)
    before = m.predict(X)
    report = m.prune()
    assert report.removed == [2, 2, 1, 0]
    assert [g.shape for g in m._network.tensors("gb")] == [(2, 6), (2, 4), (2, 4), (0, 0)]
    assert [s.shape for s in m._network.running_stats()] == [(2, 6), (2, 4), (2, 4), (0, 0)]
    assert (m._network.moments("m", "gb")[0].shape == (2, 6)
            and m._network.moments("v", "gb")[1].shape == (2, 4))
    np.testing.assert_allclose(m.predict(X), before, rtol=1e-5, atol=1e-5)
    m.fit(X, y, epochs=1, batch_size=16, verbose=0)       # training continues
    assert np.isfinite(m.predict(X)).all()


def test_kept_bytes_per_element_counts_zhat():
    m = fr.Sequential([fr.Dense(8, "relu"), fr.BatchNorm(), fr.Dense(2)], input_dim=3)
    m.compile(backend="numpy")
    net = m._network.training_plan(m.optimizer, 16, [2])
    assert net.kept_bytes_per_element() == pytest.approx(4 * (8 + 8 + 2) / 10)
    assert net.xhats[0].shape == (16, 8) and net.xhats[1].size == 0


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(momentum=0.0), "momentum"), (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.5), "momentum"), (dict(momentum=float("nan")), "momentum"),
    (dict(momentum=True), "momentum"), (dict(momentum="0.9"), "momentum"),
    (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"), (dict(eps=float("inf")), "eps"),
    (dict(eps=None), "eps")])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fr.BatchNorm(**kwargs)


@pytest.mark.parametrize("layers", [
    lambda: [fr.BatchNorm(), fr.Dense(2)],
    lambda: [fr.Dense(3), fr.Dropout(0.1), fr.BatchNorm(), fr.Dense(2)],
    lambda: [fr.Dense(3), fr.BatchNorm(), fr.BatchNorm(), fr.Dense(2)]])
def test_batchnorm_must_follow_a_dense(layers):
    with pytest.raises(ValueError, match="right after a Dense"):
        fr.Sequential(layers(), input_dim=4)
    m = fr.Sequential()
    with pytest.raises(ValueError, match="right after a Dense"):
        for layer in layers():
            m.add(layer)


# ---------------------------------------------------------------- BatchNorm with a noise layer
NOISES = [contract.NOISE_ADD, contract.NOISE_MUL]


def _noisy_forward(ops, x, W, b, gb, act, thr, scale, noise, std, seed=5, step=3, layer=1):
    """bn_dense_forward with noise: (out, xhat, save, pre); pre is (0, O) when not needed."""
    B, O = x.shape[0], W.shape[1]
    dt = x.dtype
    out, xhat = np.zeros((B, O), dt), np.zeros((B, O), dt)
    save = np.zeros((contract.BN_SAVE_ROWS, O))
    pre = np.zeros((B, O) if contract.keeps_pre(act, noise) else (0, O), dt)
    ops.bn_dense_forward(x, W, b, out, xhat, gb, save, act, 0.1, thr, scale, 1e-3, seed, step,
                         layer, noise, dt.type(std), pre)
    return out, xhat, save, pre


def _noisy_backward(ops, grad, out, xhat, save, pre, x, W, b, gb, stats, act, thr, scale,
                    noise, std, seed=5, step=3, layer=1):
    g = grad.copy()
    dW, db, dgb, dx = np.zeros_like(W), np.full_like(b, 7.0), np.zeros_like(gb), np.zeros_like(x)
    st = stats.copy()
    ops.bn_dense_backward(g, out, xhat, x, W, gb, st, save.copy(), dW, db, dgb, dx, act, 0.1,
                          thr, scale, 0.9, seed, step, layer, noise, x.dtype.type(std), pre)
    return g, dW, db, dgb, dx, st


@pytest.mark.parametrize("act", [contract.ACT_LINEAR, contract.ACT_TANH, contract.ACT_RELU,
                                 contract.ACT_SIGMOID])
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_reference_with_noise_gradients_by_central_differences(act, noise, rate):
    """float64, L = sum(R * out) with the same Philox noise and mask in every evaluation:
    dL/dx, dL/dW, dL/db (exactly 0), dL/dgamma, dL/dbeta through the noisy BatchNorm layer."""
    rng = fresh_rng()
    B, I, O = 6, 4, 3
    x, W, b, gb = _layer(rng, B, I, O, np.float64)
    Rw = rng.standard_normal((B, O))
    thr, scale = dropout_threshold(rate), dropout_scale(rate, np.float64)
    std = 0.6

    def loss(x_, W_, b_, gb_):
        out = _noisy_forward(reference, x_, W_, b_, gb_, act, thr, scale, noise, std)[0]
        return float((out * Rw).sum())

    out, xhat, save, pre = _noisy_forward(reference, x, W, b, gb, act, thr, scale, noise, std)
    g, dW, db, dgb, dx, _ = _noisy_backward(reference, Rw, out, xhat, save, pre, x, W, b, gb,
                                            np.zeros((2, O)), act, thr, scale, noise, std)
    args = [x.copy(), W.copy(), b.copy(), gb.copy()]
    for k, analytic in ((0, dx), (1, dW), (2, db), (3, dgb)):
        num = central_difference(lambda: loss(*args), args[k])
        np.testing.assert_allclose(analytic, num, rtol=1e-6, atol=1e-7)
    assert not db.any()
    # the noise acted: the output differs from the noiseless layer's, pre is the noiseless one
    plain = _forward(reference, x, W, b, gb, act, 0, 1.0)[0]
    assert np.abs(_noisy_forward(reference, x, W, b, gb, act,
                  0, 1.0, noise, std)[0] - plain).max() > 1e-3
    if pre.size:    # f(gamma zhat + beta) before the noise and the mask
        np.testing.assert_allclose(pre, plain, rtol=1e-14)


def test_reference_with_noise_is_the_dense_noise_after_the_normalization():
    """out = dropout(noise(f(gamma zhat + beta))): the plain dense kernel's noise and mask (the
    same stream, element order and layer word) applied to the BatchNorm activation."""
    from fastreg.kernels.philox import STREAM_DROPOUT, STREAM_NOISE, philox_words, \
        standard_normals
    rng = fresh_rng()
    x, W, b, gb = _layer(rng, 7, 4, 5, np.float64)
    thr, scale = dropout_threshold(0.4), dropout_scale(0.4, np.float64)
    a = _forward(reference, x, W, b, gb, contract.ACT_TANH, 0, 1.0, seed=11, step=2, layer=1)[0]
    n = standard_normals(a.size, 11, 2, 1, STREAM_NOISE).reshape(a.shape)
    keep = (philox_words(a.size, 11, 2, 1, STREAM_DROPOUT) >= thr).reshape(a.shape)
    for noise, want in ((contract.NOISE_ADD, a + 0.5 * n), (contract.NOISE_MUL, a * (1 + 0.5 * n))):
        out, _, _, pre = _noisy_forward(reference, x, W, b, gb, contract.ACT_TANH, thr, scale,
                                        noise, 0.5, seed=11, step=2, layer=1)
        np.testing.assert_allclose(pre, a, rtol=1e-14)
        np.testing.assert_allclose(out, np.where(keep, want * scale, 0.0), rtol=1e-13)


def _bn_noise_model(backend, dtype="float32", seed=4, noise=True):
    """BatchNorm Dense layers followed by GaussianDropout (tanh), GaussianNoise (relu, own
    dropout) and GaussianNoise (linear output); noise=False: the same without noise layers."""
    layers = [fr.Dense(9, "tanh"), fr.BatchNorm(momentum=0.9)]
    layers += [fr.GaussianDropout(0.3)] if noise else []
    layers += [fr.Dropout(0.1), fr.Dense(7, "relu", dropout=0.2), fr.BatchNorm()]
    layers += [fr.GaussianNoise(0.2)] if noise else []
    layers += [fr.Dense(2), fr.BatchNorm(0.8, 1e-2)]
    layers += [fr.GaussianNoise(0.1)] if noise else []
    model = fr.Sequential(layers, input_dim=6, seed=seed, dtype=dtype)
    model.compile(optimizer=fr.Adam(1e-2), backend=backend)
    return model


def test_noise_after_batchnorm_is_accepted_and_planned():
    model = _bn_noise_model("numpy")
    net = model._network.training_plan(model.optimizer, 16, [2])
    assert list(net.li[:, contract.LI_BN]) == [1, 1, 1]
    assert list(net.li[:, contract.LI_NOISE]) == [
        contract.NOISE_MUL, contract.NOISE_ADD, contract.NOISE_ADD]
    # f(z) before the noise kept for the nonlinear layers, not for the linear output
    assert [p.shape[0] for p in net.pres] == [16, 16, 0]
    assert "output noise" in model.summary() and "batchnorm" in model.summary()
    # the inference plan folds BatchNorm and keeps the noise codes (MC sampling draws them)
    inf = model._network.inference_plan()
    assert not inf.li[:, contract.LI_BN].any()
    assert list(inf.li[:, contract.LI_NOISE]) == [
        contract.NOISE_MUL, contract.NOISE_ADD, contract.NOISE_ADD]
    # a noise layer between a Dense and its BatchNorm is still refused
    with pytest.raises(ValueError, match="right after a Dense"):
        fr.Sequential([fr.Dense(3), fr.GaussianNoise(0.1), fr.BatchNorm(), fr.Dense(1)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_with_noise_matches_reference(backend, small_tiles):
    """Two epochs (a partial batch) through the compiled epochs: weights, gamma/beta, the
    running statistics and the losses agree with the reference."""
    _backend(backend)
    rng = fresh_rng()
    dtypes = ["float32"] if backend == "cuda" else ["float32", "float64"]
    for dtype in dtypes:
        X = randn(rng, (28 if backend == "cuda" else 40, 6), dtype)
        y = randn(rng, (X.shape[0], 2), dtype)
        models = [_bn_noise_model(b, dtype) for b in ("numpy", backend)]
        for m in models:
            m.fit(X, y, epochs=2, batch_size=12, verbose=0)
        tol = dict(rtol=2e-4, atol=2e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-11)
        for a, r in zip(models[1].get_weights(), models[0].get_weights()):
            np.testing.assert_allclose(a, r, **tol)
        np.testing.assert_allclose(models[1].history.history["loss"],
                                   models[0].history.history["loss"], rtol=1e-5)


def test_noise_after_batchnorm_trains_but_inference_is_noiseless():
    rng = fresh_rng()
    X, y = randn(rng, (48, 6)), randn(rng, (48, 2))
    noisy, plain = _bn_noise_model("numba"), _bn_noise_model("numba", noise=False)
    plain.set_weights(noisy.get_weights())
    np.testing.assert_array_equal(noisy.predict(X), plain.predict(X))
    assert noisy.evaluate(X, y) == plain.evaluate(X, y)
    h1 = noisy.fit(X, y, epochs=1, batch_size=48, shuffle=False, verbose=0)
    h2 = plain.fit(X, y, epochs=1, batch_size=48, shuffle=False, verbose=0)
    assert h1.history["loss"][0] != h2.history["loss"][0]     # the noise acted in training
    # the running statistics are those of the pre-activations: the same in both (one step
    # from the same weights, the noise acts after them)
    for k in (4, 5):
        np.testing.assert_allclose(noisy.get_weights()[k], plain.get_weights()[k], rtol=1e-6)
    # after training, predict is still the noiseless folded forward
    plain.set_weights(noisy.get_weights())
    np.testing.assert_array_equal(noisy.predict(X), plain.predict(X))


def test_mc_sampling_draws_the_noise_after_the_folded_batchnorm():
    """MC sampling runs the inference plan (BatchNorm folded into W, b) with the noise on, as
    for a plain Dense: equal to a model without BatchNorm holding the folded weights, and the
    same on the reference and numba."""
    rng = fresh_rng()
    X, y = randn(rng, (32, 6)), randn(rng, (32, 2))
    m = fr.Sequential([fr.Dense(5, "tanh"), fr.BatchNorm(), fr.GaussianNoise(0.3), fr.Dense(2)],
                      input_dim=6, seed=2)
    m.compile(optimizer=fr.Adam(1e-2), backend="numba")
    m.fit(X, y, epochs=2, batch_size=8, verbose=0)
    folded = fr.Sequential([fr.Dense(5, "tanh"), fr.GaussianNoise(0.3), fr.Dense(2)],
                           input_dim=6, seed=2)
    W0, b0 = m._network.folded(0)
    folded.set_weights([W0, b0] + m.get_weights()[6:])
    outs = []
    for backend in ("numpy", "numba"):
        for model in (m, folded):
            model.compile(loss="mse", backend=backend)
            outs.append(model.predict(X[:7], mc_samples=16, seed=9))
    assert (outs[0][1] > 0).all()
    for mean, std in outs[1:]:
        np.testing.assert_allclose(mean, outs[0][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, outs[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_save_load_round_trip_with_noise(tmp_path, backend):
    rng = fresh_rng()
    X, y = randn(rng, (40, 6)), randn(rng, (40, 2))
    m = _bn_noise_model(backend)
    m.fit(X, y, epochs=1, batch_size=16, verbose=0)
    m.save(tmp_path / "m.npz")
    loaded = fr.load_model(tmp_path / "m.npz")
    assert [layer.get_config() for layer in loaded.layers] == \
        [layer.get_config() for layer in m.layers]
    assert isinstance(loaded.layers[2], fr.GaussianDropout) and loaded.layers[2].rate == 0.3
    for a, b in zip(loaded.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(X), m.predict(X))
    for model in (m, loaded):       # the same noise next (the step counter is saved)
        model.fit(X, y, epochs=1, batch_size=16, verbose=0)
    for a, b in zip(loaded.get_weights(), m.get_weights()):
        np.testing.assert_array_equal(a, b)
