"""The Cython backend (kernels/cython_backend.py + kernels/cython_kernels.pyx) against the
reference: every kernel on fresh random inputs, float32 and float64; the Philox bits and
masks against kernels/philox.py and the Numba backend; whole epochs against the Numba epoch
and the Python driver; and the fallback when the extension is missing or switched off.

Every test but the fallback ones skips (with the reason) when the extension is not built or
FASTREG_NO_CYTHON=1 is set; the fallback tests run either way (in a subprocess).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract as C
from fastreg.kernels import driver
from fastreg.kernels import reference as R
from fastreg.kernels.philox import (dropout_scale, dropout_threshold, keep_mask, philox_words,
                                    split_seed, STREAM_DROPOUT, STREAM_INPUT_DROPOUT)

from netutil import (OPTIMIZERS, PENALTIES, PENALTY_IDS, check_penalized_update, fresh_rng,
                     make_data, make_model, randn)

try:
    from fastreg.kernels import cython_backend as Cy
    SKIP_REASON = ""
except ImportError as exc:  # not built, or FASTREG_NO_CYTHON=1
    Cy = None
    SKIP_REASON = f"the Cython backend is not importable: {exc}"

needs_ext = pytest.mark.skipif(Cy is None, reason=SKIP_REASON)

ACTS = [C.ACT_LINEAR, C.ACT_RELU, C.ACT_LEAKY_RELU, C.ACT_TANH, C.ACT_SIGMOID]
# B*O crosses the parallel threshold (65536) in the big case: the OpenMP passes run too
SHAPES = [(37, 19, 23), (300, 40, 260)]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _tol(dtype):
    return dict(rtol=1e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def assert_close(actual, desired, dtype):
    """Within rtol, and within atol scaled by the array's magnitude (GEMM rounding grows
    with the summands, not with the possibly cancelled result)."""
    tol = _tol(dtype)
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=tol["rtol"], atol=tol["atol"] * scale * 10)


def _clone(net):
    """An independent copy of a Net (parameters, moments, configuration) with its workspace."""
    cp = lambda arrays: [a.copy() for a in arrays]  # noqa: E731
    out = driver.Net(cp(net.Ws), cp(net.bs), cp(net.dWs), cp(net.dbs), cp(net.mW), cp(net.vW),
                     cp(net.mb), cp(net.vb), net.li.copy(), net.lf.copy(), net.hpW.copy(),
                     net.hpb.copy(), net.opt, net.loss, net.seed)
    driver.allocate_workspace(out, net.batch, net.ybuf.shape[1])
    return out


def _targets(y, loss, dtype):
    y = np.asarray(y)
    return np.ascontiguousarray((y.reshape(-1, 1) if loss == "sparse_categorical_crossentropy"
                                 else y), dtype)


# ---------------------------------------------------------------- Philox
@needs_ext
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers_every_code_path(counter, key, expected):
    old = Cy._K._set_philox_path(-1)
    try:
        for path in range(len(Cy._K.PHILOX_PATHS)):   # scalar, SSE2, AVX2 where the CPU has it
            Cy._K._set_philox_path(path)
            assert tuple(Cy.philox4x32(*counter, *key)) == expected, Cy._K.PHILOX_PATHS[path]
    finally:
        Cy._K._set_philox_path(old)


@needs_ext
@pytest.mark.parametrize("n", [1, 7, 1001, 70001])   # 70001: the parallel fill
def test_philox_words_match_reference_on_every_code_path(n):
    rng = fresh_rng()
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    step, layer, stream = (int(v) for v in rng.integers(0, 2**32, 3, dtype=np.uint64))
    want = philox_words(n, seed, step, layer, stream)
    old = Cy._K._set_philox_path(-1)
    try:
        for path in range(len(Cy._K.PHILOX_PATHS)):
            Cy._K._set_philox_path(path)
            np.testing.assert_array_equal(Cy.philox_words(n, seed, step, layer, stream), want,
                                          err_msg=Cy._K.PHILOX_PATHS[path])
    finally:
        Cy._K._set_philox_path(old)


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_masks_bitwise_equal_to_numba_and_reference(dtype, shape):
    from fastreg.kernels import cpu as N
    rng = fresh_rng()
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype, 0.3), randn(rng, O, dtype)
    thr, sc = dropout_threshold(0.3), dropout_scale(0.3, np.dtype(dtype).type)
    seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 1
    outs = []
    for K in (N, Cy):
        out = np.zeros((B, O), dtype)
        # sigmoid output is never 0, so every zero is a dropped unit
        K.dense_forward(x, W, b, out, C.ACT_SIGMOID, 0.0, thr, sc, seed, step, layer)
        outs.append(out)
    keep = keep_mask((B, O), thr, seed, step, layer, STREAM_DROPOUT)
    np.testing.assert_array_equal(outs[0] == 0, outs[1] == 0)
    np.testing.assert_array_equal(outs[1] != 0, keep)


# ---------------------------------------------------------------- dense layer
@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rate", [0.0, 0.35])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_forward_backward_against_reference(dtype, act, rate, shape):
    rng = fresh_rng()
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype, 0.3), randn(rng, O, dtype)
    thr, sc = dropout_threshold(rate), dropout_scale(rate, np.dtype(dtype).type)
    seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 2
    out_r, out_c = np.zeros((B, O), dtype), np.zeros((B, O), dtype)
    R.dense_forward(x, W, b, out_r, act, 0.02, thr, sc, seed, step, layer)
    Cy.dense_forward(x, W, b, out_c, act, 0.02, thr, sc, seed, step, layer)
    assert_close(out_c, out_r, dtype)
    if act == C.ACT_SIGMOID or rate == 0:   # no output is 0 except dropped ones (or none)
        np.testing.assert_array_equal(out_c == 0, out_r == 0)
    g = randn(rng, (B, O), dtype)
    res = []
    for K in (R, Cy):
        gg = g.copy()
        dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
        K.dense_backward(gg, out_r, x, W, dW, db, dx, act, 0.02, thr, sc, seed, step, layer)
        res.append((gg, dW, db, dx))
    for name, a, c in zip(("dz", "dW", "db", "dx"), *res):
        assert_close(c, a, dtype), name


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 5, 4), (9, 1, 6), (9, 4, 1), (1, 1, 1), (7, 3, 5)])
def test_vector_shaped_products(dtype, shape):
    """B, I or O of 1: the gemv / dot paths of the BLAS dispatch."""
    rng = fresh_rng()
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype), randn(rng, O, dtype)
    out_r, out_c = np.zeros((B, O), dtype), np.zeros((B, O), dtype)
    R.dense_forward(x, W, b, out_r, C.ACT_TANH, 0.0, 0, 1.0, 0, 0, 0)
    Cy.dense_forward(x, W, b, out_c, C.ACT_TANH, 0.0, 0, 1.0, 0, 0, 0)
    assert_close(out_c, out_r, dtype)
    res = []
    for K in (R, Cy):
        g = randn(np.random.default_rng(7), (B, O), dtype)
        dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
        K.dense_backward(g, out_r, x, W, dW, db, dx, C.ACT_TANH, 0.0, 0, 1.0, 0, 0, 0)
        res.append((g, dW, db, dx))
    for a, c in zip(*res):
        assert_close(c, a, dtype)


@needs_ext
def test_backward_without_bias_or_dx():
    rng = fresh_rng()
    x, W = randn(rng, (9, 4)), randn(rng, (4, 6))
    out = np.zeros((9, 6), np.float32)
    Cy.dense_forward(x, W, np.zeros(0, np.float32), out, C.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
    ref = np.zeros_like(out)
    R.dense_forward(x, W, np.zeros(0, np.float32), ref, C.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
    assert_close(out, ref, np.float32)
    g0 = randn(rng, (9, 6))
    res = []
    for K in (R, Cy):
        g, dW = g0.copy(), np.zeros_like(W)
        K.dense_backward(g, ref, x, W, dW, np.zeros(0, np.float32), np.zeros((0, 0), np.float32),
                         C.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
        res.append((g, dW))
    for a, c in zip(*res):
        assert_close(c, a, np.float32)


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_dropout_bitwise(dtype):
    rng = fresh_rng()
    x = randn(rng, (33, 17), dtype)
    a, b = np.zeros_like(x), np.zeros_like(x)
    thr, sc = dropout_threshold(0.2), dropout_scale(0.2, np.dtype(dtype).type)
    seed, step = int(rng.integers(2**63)), int(rng.integers(2**31))
    R.input_dropout(x, a, thr, sc, seed, step, 0)
    Cy.input_dropout(x, b, thr, sc, seed, step, 0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b != 0, keep_mask(x.shape, thr, seed, step, 0,
                                                    STREAM_INPUT_DROPOUT))


# ---------------------------------------------------------------- losses
@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", [C.LOSS_MSE, C.LOSS_BCE, C.LOSS_SCE])
def test_losses_against_reference(dtype, loss):
    rng = fresh_rng()
    z = randn(rng, (41, 7), dtype, 3.0)
    if loss == C.LOSS_SCE:
        y = rng.integers(0, 7, (41, 1)).astype(dtype)
    elif loss == C.LOSS_BCE:
        y = rng.random((41, 7)).astype(dtype)
    else:
        y = randn(rng, (41, 7), dtype)
    gr, gc = np.zeros_like(z), np.zeros_like(z)
    vr = R.loss_forward_backward(z, y, gr, loss)
    vc = Cy.loss_forward_backward(z, y, gc, loss)
    assert vc == pytest.approx(vr, rel=1e-6 if dtype == np.float32 else 1e-12)
    assert Cy.loss_value(z, y, loss) == vc
    np.testing.assert_allclose(gc, gr, **_tol(dtype))


@needs_ext
@pytest.mark.parametrize("loss", [C.LOSS_MSE, C.LOSS_BCE, C.LOSS_SCE])
def test_output_transform_matches_reference(loss):
    z = randn(fresh_rng(), (13, 4), np.float32, 3.0)
    np.testing.assert_allclose(Cy.output_transform(z, loss), R.output_transform(z, loss),
                               rtol=1e-6)


# ---------------------------------------------------------------- penalized update
@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt,b1,nesterov", OPTIMIZERS,
                         ids=["sgd", "momentum", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("l1,l2,proximal,maxnorm,group", PENALTIES, ids=PENALTY_IDS)
@pytest.mark.parametrize("shape", [(13, 9), (400, 300), (11,)])
def test_penalized_update_against_reference(dtype, opt, b1, nesterov, l1, l2, proximal,
                                            maxnorm, group, shape):
    check_penalized_update(Cy, lambda x, y: assert_close(x, y, dtype), dtype, opt, b1,
                           nesterov, l1, l2, proximal, maxnorm, group, shape)


# ---------------------------------------------------------------- whole epochs
# Adam's eps is raised in these comparisons: with eps=1e-8 a gradient that is ~0 up to float32
# rounding (a cancelled sum) makes the step lr * g / (|g| + eps) any value in [-lr, lr], so two
# correct backends may differ by lr in such a coordinate. Not what these tests are about.
CASES = [
    dict(sizes=(3, 16, 12, 2), activation="tanh", dropout=0.25, loss="mse",
         regularizer=fr.ElasticNet(1e-3, 1e-3), optimizer=fr.Adam(1e-2, eps=1e-3)),
    dict(sizes=(4, 20, 5), activation="relu", dropout=0.1,
         loss="sparse_categorical_crossentropy", regularizer=fr.L2(1e-3),
         optimizer=fr.SGD(0.05, momentum=0.9, nesterov=True), input_dropout=0.2),
    dict(sizes=(6, 9, 9, 2), activation="sigmoid", dropout=0.3, loss="binary_crossentropy",
         regularizer=[fr.L1(1e-3), fr.MaxNorm(1.0)],
         optimizer=fr.AdamW(1e-2, eps=1e-3, weight_decay=0.1)),
    dict(sizes=(2, 300, 260, 1), activation="leaky_relu", dropout=0.2, loss="mse",
         regularizer=fr.L2(1e-4), optimizer=fr.Adam(1e-3, eps=1e-3)),
    dict(sizes=(5, 8, 1), activation="linear", dropout=0.0, loss="mse", regularizer=None,
         optimizer=fr.SGD(0.01)),
]
CASE_IDS = ["tanh-mse-adam", "relu-sce-nesterov-indrop", "sig-bce-adamw-l1-maxnorm",
            "wide-parallel", "linear-plain-sgd"]


def _net_and_data(case, dtype, rows=150, batch=32):
    rng = fresh_rng()
    case = dict(case)
    sizes = case.pop("sizes")
    loss = case["loss"]
    model = make_model(sizes, dtype=dtype, backend="numpy", seed=int(rng.integers(2**31)),
                       **case)
    X, y = make_data(rng, rows, sizes, loss, np.dtype(dtype))
    Y = _targets(y, loss, dtype)
    return model._make_net(batch, Y.shape[1]), X, Y


def _epochs(module_epoch, net, X, Y, epochs=2, batch=32):
    results, step = [], 0
    for ep in range(epochs):
        perm = np.random.default_rng([7, ep]).permutation(X.shape[0]).astype(np.int64)
        res = module_epoch(net, X, Y, perm, batch, step, step + 1)
        step += res[2]
        results.append(res)
    return results


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_train_epoch_equals_numba_epoch(case, dtype):
    from fastreg.kernels import cpu as N
    net0, X, Y = _net_and_data(case, dtype)
    nets = [_clone(net0), _clone(net0)]
    res_n = _epochs(N.train_epoch, nets[0], X, Y)
    res_c = _epochs(Cy.train_epoch, nets[1], X, Y)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-11, atol=1e-12)
    for name in ("Ws", "bs", "mW", "vW", "mb", "vb"):
        for a, c in zip(getattr(nets[0], name), getattr(nets[1], name)):
            np.testing.assert_allclose(c, a, **tol, err_msg=name)
    for (ln, pn, sn, fn), (lc, pc, sc, fc) in zip(res_n, res_c):
        assert (sn, fn) == (sc, fc)
        assert lc == pytest.approx(ln, rel=1e-5 if dtype == "float32" else 1e-11)
        assert pc == pytest.approx(pn, rel=1e-5 if dtype == "float32" else 1e-11)


@needs_ext
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_train_epoch_equals_python_driver_over_reference(case):
    """The epoch spec (kernels/driver.py over the NumPy kernels), in float64."""
    net0, X, Y = _net_and_data(case, "float64", rows=70, batch=16)
    nets = [_clone(net0), _clone(net0)]
    res_r = _epochs(R.train_epoch, nets[0], X, Y, batch=16)
    res_c = _epochs(Cy.train_epoch, nets[1], X, Y, batch=16)
    for a, c in zip(nets[0].Ws + nets[0].bs, nets[1].Ws + nets[1].bs):
        np.testing.assert_allclose(c, a, rtol=1e-9, atol=1e-11)
    for r, c in zip(res_r, res_c):
        assert c[2:] == r[2:]
        np.testing.assert_allclose(c[:2], r[:2], rtol=1e-9)


@needs_ext
def test_train_epoch_stops_before_updating_on_nonfinite_loss():
    net0, X, Y = _net_and_data(CASES[0], "float64")
    Y = Y.copy()
    Y[40:] = np.inf                            # the second batch of 32 has an infinite loss
    perm = np.arange(X.shape[0], dtype=np.int64)
    outs = []
    for K in (R, Cy):
        net = _clone(net0)
        res = K.train_epoch(net, X, Y, perm, 32, 0, 1)
        outs.append((res, [w.copy() for w in net.Ws + net.bs]))
    (rr, wr), (rc, wc) = outs
    assert rr[2:] == (1, False) and rc[2:] == (1, False)   # one step, then stop before updating
    assert rc[0] == pytest.approx(rr[0], rel=1e-12)
    for a, c in zip(wr, wc):
        assert_close(c, a, np.float64)


@needs_ext
def test_results_do_not_depend_on_the_thread_count():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    net0, X, Y = _net_and_data(CASES[3], "float32", rows=300, batch=300)
    nets = [_clone(net0), _clone(net0)]
    _epochs(Cy.train_epoch, nets[0], X, Y, epochs=1, batch=300)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):   # our OpenMP passes only:
        # (OpenBLAS may split a product differently with another thread count)
        _epochs(Cy.train_epoch, nets[1], X, Y, epochs=1, batch=300)
    for a, c in zip(nets[0].Ws + nets[0].bs, nets[1].Ws + nets[1].bs):
        np.testing.assert_array_equal(a, c)


@needs_ext
def test_plan_follows_the_net_buffers():
    net, X, Y = _net_and_data(CASES[0], "float32")
    perm = np.arange(X.shape[0], dtype=np.int64)
    Cy.train_epoch(net, X, Y, perm, 32, 0, 1)
    plan = net.cache["cython_plan"]
    assert plan.matches(net)
    net.Ws[0] = net.Ws[0].copy()               # a new array: the plan must not write the old
    assert not plan.matches(net)
    Cy.train_epoch(net, X, Y, perm, 32, 5, 6)
    assert net.cache["cython_plan"] is not plan
    with pytest.raises(ValueError):
        Cy.train_epoch(net, X, Y, perm, 64, 0, 1)   # larger than the workspace


@needs_ext
def test_in_place_hyperparameter_changes_apply_between_epochs():
    """A schedule may edit net.hpW / net.hpb in place: the next epoch must use the new rows."""
    net0, X, Y = _net_and_data(CASES[0], "float64", rows=64, batch=32)
    nets = [_clone(net0), _clone(net0)]
    perm = np.arange(X.shape[0], dtype=np.int64)
    for K, net in zip((R, Cy), nets):
        K.train_epoch(net, X, Y, perm, 32, 0, 1)
        net.hpW[:, C.HP_LR] *= 0.1
        net.hpb[:, C.HP_LR] *= 0.1
        net.hpW[:, C.HP_L1] = 0.0
        K.train_epoch(net, X, Y, perm, 32, 2, 3)
    for a, c in zip(nets[0].Ws + nets[0].bs, nets[1].Ws + nets[1].bs):
        np.testing.assert_allclose(c, a, rtol=1e-9, atol=1e-11)


@needs_ext
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_inference_matches_reference(dtype):
    net0, X, _ = _net_and_data(CASES[1], dtype, rows=101)
    a = R.forward_inference(net0, X, 16)
    c = Cy.forward_inference(net0, X, 16)
    assert_close(c, a, np.dtype(dtype).type)
    assert_close(Cy.forward_inference(net0, X, 1000), a, np.dtype(dtype).type)


@needs_ext
def test_model_fit_with_cython_backend_equals_numba():
    rng = fresh_rng()
    case = dict(CASES[1])
    sizes = case.pop("sizes")
    X, y = make_data(rng, 120, sizes, case["loss"], np.float32)
    results, weights = [], None
    for backend in ("numba", "cython"):
        model = make_model(sizes, backend=backend, **case)
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        hist = model.fit(X, y, epochs=2, batch_size=32, verbose=0)
        results.append((model.get_weights(), hist.history, model.predict(X)))
    for a, c in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results[1][1]["loss"], results[0][1]["loss"], rtol=1e-4)
    np.testing.assert_allclose(results[1][2], results[0][2], rtol=1e-4, atol=1e-6)


@needs_ext
def test_compiled_codes_match_the_contract():
    for name, value in Cy._K.CONTRACT.items():
        if hasattr(C, name):
            assert getattr(C, name) == value, name
    assert Cy._K.CONTRACT["STREAM_DROPOUT"] == STREAM_DROPOUT
    assert Cy._K.CONTRACT["STREAM_INPUT_DROPOUT"] == STREAM_INPUT_DROPOUT
    assert split_seed(2**64 - 5) == Cy.split_seed(2**64 - 5)


# ---------------------------------------------------------------- fallback (no extension)
def _run_without_extension(code):
    env = dict(os.environ, FASTREG_NO_CYTHON="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_fallback_import_error_says_how_to_get_it():
    code = ("try:\n"
            "    import fastreg.kernels.cython_backend\n"
            "except ImportError as exc:\n"
            "    print('IMPORTERROR:', exc)\n"
            "else:\n"
            "    print('IMPORTED')\n"
            "from fastreg.backend import BackendUnavailable, resolve\n"
            "try:\n"
            "    resolve('cython')\n"
            "except BackendUnavailable as exc:\n"
            "    print('UNAVAILABLE:', exc)\n")
    proc = _run_without_extension(code)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert "IMPORTED" not in proc.stdout
    msg = lines["IMPORTERROR"]
    assert "FASTREG_NO_CYTHON" in msg and msg.count(". ") == 0   # one sentence
    assert "cython" in lines["UNAVAILABLE"] and "FASTREG_NO_CYTHON" in lines["UNAVAILABLE"]
