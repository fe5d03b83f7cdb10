"""GaussianNoise / GaussianDropout: the reference by finite differences, every backend against
it (the noise itself, the fused kernels, a few training steps), the statistics of the noise
stream, inference without noise, determinism by seed, bad parameters, save / load."""

import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract
from fastreg.kernels import reference
from fastreg.kernels.philox import (STREAM_DROPOUT, STREAM_INPUT_NOISE, STREAM_NOISE,
                                    dropout_scale, dropout_threshold, philox_words,
                                    standard_normals)

from netutil import available_backends, central_difference, fresh_rng, randn, small_cuda_tiles

ACTS = [contract.ACT_LINEAR, contract.ACT_RELU,
        contract.ACT_LEAKY_RELU, contract.ACT_TANH, contract.ACT_SIGMOID]
NOISES = [contract.NOISE_ADD, contract.NOISE_MUL]


def _backends():
    """(name, module) of every compiled backend available here; cuda on the simulator."""
    return available_backends(["numba", "cython", "cuda"])


BACKENDS = _backends()
CPU_BACKENDS = [b for b in BACKENDS if b[0] != "cuda"]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """As tests/test_cuda.py: small GEMM tiles on the simulator (ragged edges, fast)."""
    with small_cuda_tiles(monkeypatch, dict(BACKENDS).get("cuda")):
        yield


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def assert_close(actual, desired, dtype):
    tol = _tol(dtype)
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=tol["rtol"], atol=tol["atol"] * scale * 10)


def _layer(rng, dtype, shape, act, noise, rate, std):
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype, 0.3), randn(rng, O, dtype)
    args = (act, 0.02, dropout_threshold(rate), dropout_scale(rate, np.dtype(dtype).type))
    key = (int(rng.integers(2**63)), int(rng.integers(2**31)), 3)
    return x, W, b, args, key, (noise, np.dtype(dtype).type(std))


def _run_layer(K, x, W, b, args, key, nz, g):
    """Forward then backward of one dense layer with noise through backend K."""
    B, O = x.shape[0], W.shape[1]
    dt = x.dtype
    out = np.zeros((B, O), dt)
    pre = np.zeros((B, O) if contract.keeps_pre(args[0], nz[0]) else (0, O), dt)
    K.dense_forward(x, W, b, out, *args, *key, *nz, pre)
    gg = g.copy()
    dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
    K.dense_backward(gg, out, x, W, dW, db, dx, *args, *key, *nz, pre)
    return out, pre, gg, dW, db, dx


# ---------------------------------------------------------------- the reference
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_reference_gradient_by_central_differences(act, noise, rate):
    """float64: L = sum(out * G) with the same Philox noise (and mask) in every evaluation."""
    rng = fresh_rng()
    x, W, b, args, key, nz = _layer(rng, np.float64, (6, 5, 4), act, noise, rate, 0.7)
    G = randn(rng, (6, 4), np.float64)
    _, _, _, dW, db, dx = _run_layer(reference, x, W, b, args, key, nz, G)

    def loss(x_, W_, b_):
        out = np.zeros((6, 4))
        reference.dense_forward(x_, W_, b_, out, *args, *key, *nz)
        return float((out * G).sum())

    for arr, grad in ((W, dW), (b, db), (x, dx)):
        num = central_difference(lambda: loss(x, W, b), arr)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


def test_reference_noise_placement():
    """out = dropout(f(z) + std * n) and dropout(f(z) * (1 + std * n)): noise after the
    activation, before the mask; pre keeps f(z)."""
    rng = fresh_rng()
    x, W, b, args, key, _ = _layer(rng, np.float64, (7, 5, 6), contract.ACT_TANH, 0, 0.4, 0.5)
    a = np.tanh(x @ W + b)
    n = standard_normals(a.size, key[0], key[1], key[2], STREAM_NOISE).reshape(a.shape)
    keep = (philox_words(a.size, key[0], key[1], key[2], STREAM_DROPOUT)
            >= dropout_threshold(0.4)).reshape(a.shape)
    for noise, want in ((contract.NOISE_ADD, a + 0.5 * n), (contract.NOISE_MUL, a * (1 + 0.5 * n))):
        out, pre = np.zeros_like(a), np.zeros_like(a)
        reference.dense_forward(x, W, b, out, *args, *key, noise, 0.5, pre)
        np.testing.assert_allclose(pre, a, rtol=1e-12)
        np.testing.assert_allclose(out, np.where(keep, want * args[3], 0.0), rtol=1e-12)


# ---------------------------------------------------------------- the noise stream
def test_noise_statistics():
    n = standard_normals(400_000, 12345, 7, 1, STREAM_NOISE)
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01
    assert abs(np.mean(n ** 3)) < 0.03 and abs(np.mean(n ** 4) - 3) < 0.05   # Gaussian moments
    assert abs(np.corrcoef(n[0::2], n[1::2])[0, 1]) < 0.01   # the two halves of a pair
    other = standard_normals(400_000, 12345, 7, 1, STREAM_INPUT_NOISE)
    assert abs(np.corrcoef(n, other)[0, 1]) < 0.01            # the input stream is another
    # through the kernel: z = 0 (additive) and z = 1 (multiplicative), linear layer
    B, O = 500, 400
    x = np.zeros((B, 3), np.float32)
    W = np.ones((3, O), np.float32)
    cases = ((contract.NOISE_ADD, 0.0, 0.3, 0.0, 0.09),
             (contract.NOISE_MUL, 1.0, np.sqrt(0.25 / 0.75), 1.0, 1 / 3))
    for noise, bias, std, mean, var in cases:
        out = np.zeros((B, O), np.float32)
        reference.dense_forward(x, W, np.full(O, bias, np.float32), out, contract.ACT_LINEAR, 0, 0,
                                1.0, 5, 9, 2, noise, std)
        assert abs(out.mean() - mean) < 0.01 and abs(out.var() - var) < 0.01 * var + 1e-3


# ---------------------------------------------------------------- the model
def _noise_model(backend, dtype="float32", seed=3, noise=True, sizes=(4, 9, 7, 2)):
    """Input noise and dropout, GaussianDropout after a tanh layer, GaussianNoise after a relu
    layer with its own dropout, GaussianNoise on the linear output."""
    layers = [fr.GaussianNoise(0.2), fr.Dropout(0.1)] if noise else [fr.Dropout(0.1)]
    layers.append(fr.Dense(sizes[1], "tanh"))
    if noise:
        layers.append(fr.GaussianDropout(0.3))
    layers += [fr.Dropout(0.2), fr.Dense(sizes[2], "relu", dropout=0.1)]
    if noise:
        layers.append(fr.GaussianNoise(0.25))
    layers.append(fr.Dense(sizes[3]))
    if noise:
        layers.append(fr.GaussianNoise(0.05))
    model = fr.Sequential(layers, input_dim=sizes[0], seed=seed, dtype=dtype)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2), backend=backend)
    return model


def _data(rng, n=40, sizes=(4, 9, 7, 2), dtype="float32"):
    X = randn(rng, (n, sizes[0]), dtype)
    return X, randn(rng, (n, sizes[-1]), dtype)


@pytest.mark.parametrize("name", [b[0] for b in BACKENDS])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_steps_equal_reference(name, dtype):
    rng = fresh_rng()
    X, y = _data(rng, 24 if name == "cuda" else 40, dtype=dtype)
    epochs = 2
    runs = []
    for backend in ("numpy", name):
        model = _noise_model(backend, dtype)
        hist = model.fit(X, y, epochs=epochs, batch_size=12, verbose=0)
        runs.append((model.get_weights(), hist.history["loss"]))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(*(r[0] for r in runs)):
        np.testing.assert_allclose(b, a, **tol)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-4)


def test_cuda_split_path(monkeypatch):
    """GEMM, then the elementwise epilogue kernels (the cuBLAS path's), with noise."""
    G = dict(BACKENDS).get("cuda")
    if G is None:
        pytest.skip("the cuda backend (or its simulator) is not available")
    monkeypatch.setattr(G, "FORCE_SPLIT", True)
    monkeypatch.setattr(G, "FUSED_MAX_WIDTH", 0)    # the tiled path (not the fused one)
    rng = fresh_rng()
    X, y = _data(rng, 24)
    runs = []
    for backend in ("numpy", "cuda"):
        model = _noise_model(backend)
        model.fit(X, y, epochs=1, batch_size=12, verbose=0)
        runs.append(model.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_noise_is_on_in_training_and_off_at_inference():
    rng = fresh_rng()
    X, y = _data(rng)
    noisy, plain = _noise_model("numba"), _noise_model("numba", noise=False)
    plain.set_weights(noisy.get_weights())
    np.testing.assert_array_equal(noisy.predict(X), plain.predict(X))
    assert noisy.evaluate(X, y) == plain.evaluate(X, y)
    h1 = noisy.fit(X, y, epochs=1, batch_size=40, shuffle=False, verbose=0)
    h2 = plain.fit(X, y, epochs=1, batch_size=40, shuffle=False, verbose=0)
    assert h1.history["loss"][0] != h2.history["loss"][0]      # the noise acted in training


def test_determinism_by_seed():
    rng = fresh_rng()
    X, y = _data(rng)
    ws = []
    for seed in (5, 5, 6):
        model = _noise_model("numba", seed=seed)
        if ws:
            model.set_weights(ws[0][0])
        else:
            ws.append((model.get_weights(), None))
        model.fit(X, y, epochs=2, batch_size=8, verbose=0)
        ws.append((model.get_weights(), None))
    for a, b in zip(ws[1][0], ws[2][0]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(ws[1][0], ws[3][0]))


def test_kept_bytes_and_workspace():
    model = _noise_model("numba")
    net = model._network.training_plan(model.optimizer, 16, [2])
    # tanh + GaussianDropout and relu + GaussianNoise keep f(z) too; the linear output not
    assert [p.shape[0] for p in net.pres] == [16, 16, 0]
    assert net.kept_bytes_per_element() == pytest.approx(4 * (18 + 9 + 7) / 18)
    assert [x.shape for x in net.xdrops] == [(16, 4)]
    assert list(net.li[:, contract.LI_NOISE]) == [
        contract.NOISE_MUL, contract.NOISE_ADD, contract.NOISE_ADD]
    assert net.li[0, contract.LI_IN_NOISE] == contract.NOISE_ADD
    assert net.lf[0, contract.LF_NOISE_STD] == np.float32(np.sqrt(0.3 / 0.7))


def test_mc_sampling_draws_the_noise():
    rng = fresh_rng()
    X, _ = _data(rng, 5)
    model = fr.Sequential([fr.Dense(6, "tanh"), fr.GaussianDropout(0.4), fr.Dense(2)],
                          input_dim=4, seed=1)
    outs = []
    for backend in ("numpy", "numba"):
        model.compile(loss="mse", backend=backend)
        outs.append(model.predict(X, mc_samples=8, seed=3))
    assert (outs[0][1] > 0).all()
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- errors, persistence
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_bad_stddev(bad):
    with pytest.raises(ValueError, match="GaussianNoise stddev"):
        fr.GaussianNoise(bad)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", True])
def test_bad_rate(bad):
    with pytest.raises(ValueError, match="GaussianDropout rate"):
        fr.GaussianDropout(bad)


def test_bad_placement_leaves_the_model_untouched():
    model = fr.Sequential([fr.Dense(4, "relu"), fr.Dropout(0.2)])
    with pytest.raises(ValueError, match="put the Dropout after"):
        model.add(fr.GaussianNoise(0.1))
    assert len(model.layers) == 2
    model.add(fr.GaussianDropout(0.2))       # multiplicative: commutes with the dropout
    with pytest.raises(ValueError, match="at most one"):
        model.add(fr.GaussianNoise(0.1))
    assert len(model.layers) == 3
    with pytest.raises(ValueError, match="at most one"):
        fr.Sequential([fr.GaussianNoise(0.1), fr.GaussianDropout(0.1), fr.Dense(2)])
    # after a Dense with BatchNorm a noise layer is fine (tests/test_batchnorm.py); between a
    # Dense and its BatchNorm it is not
    bn = fr.Sequential([fr.Dense(4), fr.BatchNorm()])
    bn.add(fr.GaussianNoise(0.1))
    assert len(bn.layers) == 3
    between = fr.Sequential([fr.Dense(4), fr.GaussianNoise(0.1)])
    with pytest.raises(ValueError, match="BatchNorm must come right after a Dense"):
        between.add(fr.BatchNorm())
    assert len(between.layers) == 2


def test_zero_noise_is_no_noise():
    model = fr.Sequential([fr.GaussianNoise(0.0), fr.Dense(3), fr.GaussianDropout(0.0),
                           fr.Dense(1)], input_dim=2)
    model.compile(loss="mse")
    net = model._network.training_plan(model.optimizer, 4, [1])
    assert not net.li[:, contract.LI_NOISE].any() and not net.li[:, contract.LI_IN_NOISE].any()


def test_save_load_round_trip(tmp_path):
    rng = fresh_rng()
    X, y = _data(rng)
    model = _noise_model("numba")
    model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "noise.npz"
    model.save(path)
    loaded = fr.load_model(path)
    assert [l.get_config() for l in loaded.layers] == [l.get_config() for l in model.layers]
    assert isinstance(loaded.layers[0], fr.GaussianNoise) and loaded.layers[0].stddev == 0.2
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    # training continues with the same noise (the step counter is saved)
    model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    loaded.fit(X, y, epochs=1, batch_size=8, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
