"""The Numba backend against the reference: every kernel, fresh random inputs, float32 and
float64, and whole epochs of the compiled loop against the Python driver."""
import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract as C
from fastreg.kernels import cpu as N
from fastreg.kernels import driver
from fastreg.kernels import reference as R
from fastreg.kernels.philox import dropout_scale, dropout_threshold

from netutil import (OPTIMIZERS, PENALTIES, PENALTY_IDS, check_penalized_update, fresh_rng,
                     make_data, make_model, randn)

ACTS = [C.ACT_LINEAR, C.ACT_RELU, C.ACT_LEAKY_RELU, C.ACT_TANH, C.ACT_SIGMOID]
# B*O crosses PARALLEL_MIN_ELEMENTS in the big case, so the parallel passes are tested too
SHAPES = [(37, 19, 23), (300, 40, 260)]


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def assert_close(actual, desired, dtype):
    """Elementwise within rtol, and within atol scaled by the array's magnitude: a GEMM's
    rounding error grows with its summands, not with the (possibly cancelled) result."""
    tol = _tol(dtype)
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=tol["rtol"], atol=tol["atol"] * scale * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rate", [0.0, 0.35])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_forward_backward(dtype, act, rate, shape):
    rng = fresh_rng()
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype, 0.3), randn(rng, O, dtype)
    thr, sc = dropout_threshold(rate), dropout_scale(rate, np.dtype(dtype).type)
    seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 2
    out_r, out_n = np.zeros((B, O), dtype), np.zeros((B, O), dtype)
    R.dense_forward(x, W, b, out_r, act, 0.02, thr, sc, seed, step, layer)
    N.dense_forward(x, W, b, out_n, act, 0.02, thr, sc, seed, step, layer)
    assert_close(out_n, out_r, dtype)
    np.testing.assert_array_equal(out_n == 0, out_r == 0)  # the same masks, bit for bit
    g = randn(rng, (B, O), dtype)
    res = []
    for K in (R, N):
        gg = g.copy()
        dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
        K.dense_backward(gg, out_r, x, W, dW, db, dx, act, 0.02, thr, sc, seed, step, layer)
        res.append((gg, dW, db, dx))
    for a, bb in zip(*res):
        assert_close(bb, a, dtype)


def test_backward_without_bias_or_dx():
    rng = fresh_rng()
    x, W = randn(rng, (9, 4)), randn(rng, (4, 6))
    out = np.zeros((9, 6), np.float32)
    N.dense_forward(x, W, np.zeros(0, np.float32), out, C.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
    res = []
    for K in (R, N):
        g = randn(np.random.default_rng(1), (9, 6))
        dW = np.zeros_like(W)
        K.dense_backward(g, out, x, W, dW, np.zeros(0, np.float32), np.zeros((0, 0), np.float32),
                         C.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
        res.append(dW)
    np.testing.assert_allclose(res[1], res[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_dropout(dtype):
    rng = fresh_rng()
    x = randn(rng, (33, 17), dtype)
    a, b = np.zeros_like(x), np.zeros_like(x)
    thr, sc = dropout_threshold(0.2), dropout_scale(0.2, np.dtype(dtype).type)
    R.input_dropout(x, a, thr, sc, 5, 6, 0)
    N.input_dropout(x, b, thr, sc, 5, 6, 0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", [C.LOSS_MSE, C.LOSS_BCE, C.LOSS_SCE])
def test_losses(dtype, loss):
    rng = fresh_rng()
    z = randn(rng, (41, 7), dtype, 3.0)
    if loss == C.LOSS_SCE:
        y = rng.integers(0, 7, (41, 1)).astype(dtype)
    elif loss == C.LOSS_BCE:
        y = rng.random((41, 7)).astype(dtype)
    else:
        y = randn(rng, (41, 7), dtype)
    gr, gn = np.zeros_like(z), np.zeros_like(z)
    vr = R.loss_forward_backward(z, y, gr, loss)
    vn = N.loss_forward_backward(z, y, gn, loss)
    assert vn == pytest.approx(vr, rel=1e-6)
    assert N.loss_value(z, y, loss) == pytest.approx(vr, rel=1e-6)
    np.testing.assert_allclose(gn, gr, **_tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt,b1,nesterov", OPTIMIZERS)
@pytest.mark.parametrize("l1,l2,proximal,maxnorm,group", PENALTIES, ids=PENALTY_IDS)
@pytest.mark.parametrize("shape", [(13, 9), (400, 300), (11,)])
def test_penalized_update(dtype, opt, b1, nesterov, l1, l2, proximal, maxnorm, group, shape):
    check_penalized_update(N, lambda x, y: assert_close(x, y, dtype), dtype, opt, b1, nesterov,
                           l1, l2, proximal, maxnorm, group, shape)


# Adam's eps is raised where float32 results are compared: with eps=1e-8 a gradient that is ~0
# up to float32 rounding (a cancelled sum) makes the step lr * g / (|g| + eps) any value in
# [-lr, lr], so two correct backends may differ by lr there (seen: 1 run in ~50).
CASES = [
    dict(sizes=(3, 16, 12, 2), activation="tanh", dropout=0.25, loss="mse",
         regularizer=fr.ElasticNet(1e-3, 1e-3), optimizer=fr.Adam(1e-2, eps=1e-3)),
    dict(sizes=(4, 20, 5), activation="relu", dropout=0.1, loss="sparse_categorical_crossentropy",
         regularizer=fr.L2(1e-3), optimizer=fr.SGD(0.05, momentum=0.9, nesterov=True),
         input_dropout=0.2),
    dict(sizes=(6, 9, 9, 2), activation="sigmoid", dropout=0.3, loss="binary_crossentropy",
         regularizer=[fr.L1(1e-3), fr.MaxNorm(1.0)], optimizer=fr.AdamW(1e-2, weight_decay=0.1)),
    dict(sizes=(2, 300, 260, 1), activation="leaky_relu", dropout=0.2, loss="mse",
         regularizer=fr.L2(1e-4), optimizer=fr.Adam(1e-3, eps=1e-3)),
]


@pytest.mark.parametrize("case", CASES, ids=["tanh-mse", "relu-sce-nesterov", "sig-bce-adamw",
                                              "wide-parallel"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_epoch_equals_python_driver(case, dtype):
    rng = fresh_rng()
    case = dict(case)
    sizes = case.pop("sizes")
    loss = case["loss"]
    X, y = make_data(rng, 150, sizes, loss, np.dtype(dtype))
    weights = None
    results = []
    for backend in ("numpy", "numba"):
        model = make_model(sizes, dtype=dtype, backend=backend, **case)
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        hist = model.fit(X, y, epochs=2, batch_size=32, verbose=0)
        results.append((model.get_weights(), hist.history))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(b, a, **tol)
    for key in ("loss", "penalty"):
        np.testing.assert_allclose(results[1][1][key], results[0][1][key], rtol=1e-4)


def test_kept_bytes_per_element_is_one_value():
    net = make_model((3, 8, 1), backend="numba")._make_net(16, 1)
    assert driver.kept_bytes_per_element(net) == 4
