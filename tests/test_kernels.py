"""Every compiled backend against the reference, over the contract's tables: a backend that
forgets an activation, a loss, a noise kind, an update variant or a Philox stream fails here.

Fresh random inputs every run (never zeros), float32 tolerance and float64 near-equality;
dropout masks bit for bit. CUDA runs on the numba-cuda simulator (conftest.py) with small
tiles and small shapes.
"""
import numpy as np
import pytest

from fastreg import backend as backends
from fastreg.kernels import contract
from fastreg.kernels import reference
from fastreg.kernels.philox import (dropout_scale, dropout_threshold, philox_words,
                                    standard_normals)
from fastreg.kernels.protocol import REQUIRED_OPERATIONS, Backend
from fastreg.kernels.reference import epoch as spec

from netutil import (OPTIMIZERS, PENALTIES, PENALTY_IDS, check_penalized_update,
                     central_difference, fresh_rng, randn, small_cuda_tiles)
from planutil import clone_plan, random_plan, random_targets, run_epochs, targets_for

ACTS = [a.code for a in contract.ACTIVATION_TABLE]
ACT_IDS = [a.name for a in contract.ACTIVATION_TABLE]
NOISES = [n.code for n in contract.NOISE_TABLE if n.code != contract.NOISE_NONE]
NOISE_IDS = [n.name for n in contract.NOISE_TABLE]
LOSSES = [loss.code for loss in contract.LOSS_TABLE]
COMPILED = ["numba", "cython", "cuda"]


def _module(name):
    try:
        return backends.resolve(name).module
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=COMPILED)
def K(request, monkeypatch):
    """A compiled backend's module (skipped where it cannot run); CUDA with small tiles."""
    module = _module(request.param)
    with small_cuda_tiles(monkeypatch, module if request.param == "cuda" else None):
        yield module


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def assert_close(actual, desired, dtype):
    """Elementwise within rtol, and within atol scaled by the array's magnitude: a GEMM's
    rounding error grows with its summands, not with the (possibly cancelled) result."""
    tol = _tol(dtype)
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=tol["rtol"], atol=tol["atol"] * scale * 10)


def assert_same_zeros(actual, desired, dtype):
    """The same dropped units: exact zeros in the same places, except where the other value
    is itself within rounding of 0 (gelu_tanh's 0.5 z (1 + tanh) for z < -4.5 in float32:
    whether tanh rounds to exactly -1 is libm's / NumPy's / libdevice's own rounding)."""
    tiny = 10 * _tol(dtype)["atol"] * max(1.0, float(np.abs(desired).max(initial=0.0)))
    differ = (actual == 0) != (desired == 0)
    near = np.maximum(np.abs(actual), np.abs(desired)) <= tiny
    assert not (differ & ~near).any(), np.argwhere(differ & ~near)[:5]


def _shapes(K):
    """Small odd shapes; on the CPU also one past PARALLEL_MIN_ELEMENTS (the parallel
    passes)."""
    return [(13, 5, 7)] if K.NAME == "cuda" else [(37, 19, 23), (300, 40, 260)]


# ---------------------------------------------------------------- the table, in the reference
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_reference_activation_derivative_matches_central_differences(act):
    """f' (from what the table's grad_from names) against central differences of f."""
    rng = fresh_rng()
    z = rng.standard_normal(200) * 2
    z[np.abs(z) < 1e-3] = 0.5           # away from the kinks of relu / leaky_relu
    a = reference.activation(z, act, 0.07)
    arg = z if contract.ACTIVATION_BY_CODE[act].grad_from == "input" else a
    got = reference.activation_grad(arg, act, 0.07)
    num = (reference.activation(z + 1e-6, act, 0.07) - \
           reference.activation(z - 1e-6, act, 0.07)) / 2e-6
    np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-8)
    if act != contract.ACT_LINEAR:             # a real activation, not the linear fallback
        assert not np.allclose(a, z)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_every_backend_propagates_nan_like_the_reference(act):
    """A NaN pre-activation gives a NaN output on every backend (the reference's rule):
    relu written `z if z > 0 else 0` would hide a diverged model."""
    z = np.array([[np.nan], [-1.0], [2.0]], np.float32)     # one row per value
    one = np.ones((1, 1), np.float32)
    want = np.zeros((3, 1), np.float32)
    reference.dense_forward(z, one, np.zeros(1, np.float32), want, act, 0.1, 0, 1.0, 0, 0, 0)
    assert np.isnan(want[0, 0]) and np.isfinite(want[1:]).all()
    for name in COMPILED:
        try:
            K = backends.resolve(name).module
        except backends.BackendUnavailable:
            continue
        out = np.zeros((3, 1), np.float32)
        K.dense_forward(z, one, np.zeros(1, np.float32), out, act, 0.1, 0, 1.0, 0, 0, 0)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want), err_msg=name)


def test_backend_modules_implement_the_protocol():
    for name in ["numpy"] + COMPILED:
        try:
            b = backends.resolve(name)
        except backends.BackendUnavailable:
            continue
        assert isinstance(b, Backend) and b.name == name
        for op in REQUIRED_OPERATIONS:
            assert callable(getattr(b.module, op)), (name, op)


# ---------------------------------------------------------------- dense layers
def _layer(rng, dtype, shape, bias=True):
    B, I, O = shape
    x = randn(rng, (B, I), dtype)
    W = randn(rng, (I, O), dtype, 1 / np.sqrt(I))
    b = randn(rng, O, dtype, 0.5) if bias else np.zeros(0, dtype)
    return x, W, b


def _pre_for(act, noise, B, O, dtype):
    return np.zeros((B if contract.keeps_pre(act, noise) else 0, O), dtype)


def _dense(ops, x, W, b, g, act, thr, scale, key, noise=contract.NOISE_NONE, std=0.0, want_dx=True):
    B, O = x.shape[0], W.shape[1]
    dt = x.dtype
    out = np.zeros((B, O), dt)
    pre = _pre_for(act, noise, B, O, dt)
    ops.dense_forward(x, W, b, out, act, 0.05, thr, scale, *key, noise, dt.type(std), pre)
    gg = g.copy()
    dW, db = np.zeros_like(W), np.zeros_like(b)
    dx = np.zeros_like(x) if want_dx else np.zeros((0, 0), dt)
    ops.dense_backward(gg, out, x, W, dW, db, dx, act, 0.05, thr, scale, *key, noise,
                       dt.type(std), pre)
    return out, pre, gg, dW, db, dx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("noise", [contract.NOISE_NONE] + NOISES, ids=NOISE_IDS)
@pytest.mark.parametrize("rate", [0.0, 0.35])
def test_dense_forward_backward(K, dtype, act, noise, rate):
    rng = fresh_rng()
    for i, shape in enumerate(_shapes(K)):
        x, W, b = _layer(rng, dtype, shape, bias=i == 0)
        g = randn(rng, (shape[0], shape[2]), dtype)
        args = (act, dropout_threshold(rate), dropout_scale(rate, np.dtype(dtype).type))
        key = (int(rng.integers(2**63)), int(rng.integers(2**31)), 3)
        want = _dense(reference, x, W, b, g, *args, key, noise, 0.6, want_dx=i == 0)
        got = _dense(K, x, W, b, g, *args, key, noise, 0.6, want_dx=i == 0)
        for a, c in zip(got, want):
            assert_close(a, c, dtype)
        assert_same_zeros(got[0], want[0], dtype)   # the same masks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("noise", [contract.NOISE_NONE] + NOISES, ids=NOISE_IDS)
def test_input_transform(K, dtype, noise):
    rng = fresh_rng()
    x = randn(rng, (33, 17), dtype)
    thr, sc = dropout_threshold(0.2), dropout_scale(0.2, np.dtype(dtype).type)
    a, b = np.zeros_like(x), np.zeros_like(x)
    reference.input_dropout(x, a, thr, sc, 5, 6, 0, noise, 0.4)
    K.input_dropout(x, b, thr, sc, 5, 6, 0, noise, 0.4)
    assert_close(b, a, dtype)
    np.testing.assert_array_equal(a == 0, b == 0)
    g = randn(rng, (33, 17), dtype)        # in place: a gradient through the transform
    ga, gb = g.copy(), g.copy()
    reference.input_dropout(ga, ga, thr, sc, 5, 6, 0, noise, 0.4)
    K.input_dropout(gb, gb, thr, sc, 5, 6, 0, noise, 0.4)
    assert_close(gb, ga, dtype)


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("noise", [contract.NOISE_NONE] + NOISES, ids=NOISE_IDS)
def test_a_shard_draws_the_masks_and_noise_of_its_batch_rows(backend, dtype, noise):
    # an MPI rank's rows [r0, B) of a batch, given row0 = r0, get the batch's masks and
    # noise: the forward equals those rows of the whole batch's, and the backward (no
    # activity penalty: its coefficients are per rows given) the reference's on those rows
    ops = _module(backend)
    rng = fresh_rng()
    B, I, O = 22, 9, 7            # O odd: row0 * O is whole Philox groups only as 4 | row0
    x, W, b = _layer(rng, dtype, (B, I, O))
    thr, sc = dropout_threshold(0.3), dropout_scale(0.3, np.dtype(dtype).type)
    key = (int(rng.integers(2**63)), int(rng.integers(2**31)), 2)
    act = contract.ACT_TANH
    full = np.zeros((B, O), dtype)
    ops.dense_forward(x, W, b, full, act, 0.05, thr, sc, *key, noise, dtype(0.4),
                      _pre_for(act, noise, B, O, dtype))
    xin = np.zeros_like(x)
    ops.input_dropout(x, xin, thr, sc, *key, noise, 0.4)
    for r0 in (4, 8, 20):
        xs, n = x[r0:], B - r0
        g = randn(rng, (n, O), dtype)
        got, want = [], []
        for k, into in ((ops, got), (reference, want)):
            out, pre = np.zeros((n, O), dtype), _pre_for(act, noise, n, O, dtype)
            k.dense_forward(xs, W, b, out, act, 0.05, thr, sc, *key, noise, dtype(0.4), pre,
                            row0=r0)
            gg, dW, db, dx = g.copy(), np.zeros_like(W), np.zeros_like(b), np.zeros_like(xs)
            k.dense_backward(gg, out, xs, W, dW, db, dx, act, 0.05, thr, sc, *key, noise,
                             dtype(0.4), pre, row0=r0)
            xo = np.zeros_like(xs)
            k.input_dropout(xs, xo, thr, sc, *key, noise, 0.4, row0=r0)
            into += [out, gg, dW, db, dx, xo]
        np.testing.assert_array_equal(got[0], full[r0:])      # this backend, bit for bit
        np.testing.assert_array_equal(got[5], xin[r0:])
        for a, c in zip(got, want):
            assert_close(a, c, dtype)
    if backend != "numpy":      # a shard must start on a whole Philox group
        with pytest.raises(ValueError, match="multiple of 4"):
            ops.dense_forward(x[1:], W, b, np.zeros((B - 1, O), dtype), act, 0.05, thr, sc,
                              *key, noise, dtype(0.4), _pre_for(act, noise, B - 1, O, dtype),
                              row0=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noise_itself_equals_the_reference_normals(K, dtype):
    """With z = 0 and std = 1 the kernel's output IS the normal: equal to the reference up to
    the rounding of the float64 transform (libm / NumPy / libdevice) to the dtype."""
    rng = fresh_rng()
    B, O = (9, 13) if K.NAME == "cuda" else (61, 37)
    seed, step = int(rng.integers(2**63)), int(rng.integers(2**31))
    x = np.zeros((B, 2), dtype)
    W = randn(rng, (2, O), dtype)
    want = standard_normals(B * O, seed, step, 4, contract.STREAM_NOISE).astype(dtype).reshape(B, O)
    out = np.zeros((B, O), dtype)
    K.dense_forward(x, W, np.zeros(O, dtype), out, contract.ACT_LINEAR, 0, 0, 1.0, seed, step, 4,
                    contract.NOISE_ADD, 1.0)
    tight = dict(rtol=3e-7, atol=1e-12) if dtype == np.float32 else dict(rtol=1e-14, atol=1e-20)
    np.testing.assert_allclose(out, want, **tight)


# ---------------------------------------------------------------- BatchNorm layers
def _bn(ops, x, W, b, gb, stats, g, act, thr, scale, key, noise, std, want_dx):
    B, O = x.shape[0], W.shape[1]
    dt = x.dtype
    out, xhat = np.zeros((B, O), dt), np.zeros((B, O), dt)
    save = np.zeros((contract.BN_SAVE_ROWS, O))
    pre = _pre_for(act, noise, B, O, dt)
    ops.bn_dense_forward(x, W, b, out, xhat, gb, save, act, 0.1, thr, scale, 1e-3, *key,
                         noise, dt.type(std), pre)
    gg, st = g.copy(), stats.copy()
    dW, db, dgb = np.zeros_like(W), np.full_like(b, 7.0), np.zeros_like(gb)
    dx = np.zeros_like(x) if want_dx else np.zeros((0, 0), dt)
    ops.bn_dense_backward(gg, out, xhat, x, W, gb, st, save.copy(), dW, db, dgb, dx, act, 0.1,
                          thr, scale, 0.9, *key, noise, dt.type(std), pre)
    return out, xhat, save[:3], pre, gg, dW, db, dgb, dx, st


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("noise", [contract.NOISE_NONE] + NOISES, ids=NOISE_IDS)
def test_batchnorm_forward_backward(K, dtype, act, noise):
    rng = fresh_rng()
    shapes = [(7, 5, 4)] if K.NAME == "cuda" else [(7, 5, 4), (37, 19, 23), (130, 3, 520)]
    for i, shape in enumerate(shapes):
        for rate in (0.0, 0.3):
            x, W, b = _layer(rng, dtype, shape, bias=i != 1)
            O = shape[2]
            gb = np.stack([1 + 0.5 * rng.standard_normal(O),
                           rng.standard_normal(O)]).astype(dtype)
            stats = np.stack([rng.standard_normal(O), rng.random(O) + 0.5]).astype(dtype)
            g = randn(rng, (shape[0], O), dtype)
            args = (act, dropout_threshold(rate), dropout_scale(rate, np.dtype(dtype).type))
            key = (5, 3, 1)
            want = _bn(reference, x, W, b, gb, stats, g, *args, key, noise, 0.3, i != 1)
            got = _bn(K, x, W, b, gb, stats, g, *args, key, noise, 0.3, i != 1)
            for a, c in zip(got, want):
                assert_close(a, c, dtype)
            assert_same_zeros(got[0], want[0], dtype)   # the same masks
            assert not got[6].any()      # db exactly 0


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", LOSSES + ["mixed"], ids=[loss.name for loss in contract.LOSS_TABLE]
                         + ["sce_mixup"])
def test_losses(K, dtype, loss):
    rng = fresh_rng()
    z = randn(rng, (41, 7), dtype, 3.0)
    if loss == "mixed":
        loss = contract.LOSS_SCE
        y = np.stack([rng.integers(0, 7, 41), rng.integers(0, 7, 41), rng.random(41)],
                     axis=1).astype(dtype)
    else:
        y = targets_for(rng, loss, 41, 7, dtype)
    gr, gk = np.zeros_like(z), np.zeros_like(z)
    vr = reference.loss_forward_backward(z, y, gr, loss)
    vk = K.loss_forward_backward(z, y, gk, loss)
    assert vk == pytest.approx(vr, rel=1e-6)
    assert K.loss_value(z, y, loss) == pytest.approx(vr, rel=1e-6)
    np.testing.assert_allclose(gk, gr, **_tol(dtype))
    np.testing.assert_allclose(K.output_transform(z, loss), reference.output_transform(z, loss),
                               **_tol(dtype))


# ---------------------------------------------------------------- the fused update
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt,b1,nesterov", OPTIMIZERS)
@pytest.mark.parametrize("l1,l2,proximal,maxnorm,group", PENALTIES, ids=PENALTY_IDS)
def test_penalized_update(K, dtype, opt, b1, nesterov, l1, l2, proximal, maxnorm, group):
    shapes = [(13, 9), (11,)] + ([] if K.NAME == "cuda" else [(400, 300)])
    for shape in shapes:
        check_penalized_update(K, lambda x, y: assert_close(x, y, dtype), dtype, opt, b1,
                               nesterov, l1, l2, proximal, maxnorm, group, shape)


@pytest.mark.parametrize("prox", ["l1", "l1_sgd", "group", "maxnorm"])
def test_the_update_keeps_a_nan_weight_nan(K, prox):
    """The L1 prox (sign(NaN) * max(NaN, 0)), the group prox and max-norm leave a NaN weight
    NaN, as the reference does (a NaN turned into 0 would hide a diverged model)."""
    rng = fresh_rng()
    w = randn(rng, (4, 3))
    w[1, 1] = np.nan
    g, m, v = randn(rng, (4, 3)), np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32)
    hp = np.zeros(contract.HP_SIZE)
    hp[[contract.HP_LR, contract.HP_BETA1, contract.HP_BETA2,
        contract.HP_EPS, contract.HP_PROXIMAL]] = (0.01, 0.9, 0.999, 1e-8, 1)
    hp[{"l1": contract.HP_L1, "l1_sgd": contract.HP_L1, "group": contract.HP_GROUP,
        "maxnorm": contract.HP_MAXNORM}[prox]] = 0.5
    opt = contract.OPT_SGD if prox == "l1_sgd" else contract.OPT_ADAM
    want = [a.copy() for a in (w, g, m, v)]
    reference.penalized_update(*want, hp, opt, 1)
    assert np.isnan(want[0][1, 1])
    K.penalized_update(w, g, m, v, hp, opt, 1)
    np.testing.assert_array_equal(np.isnan(w), np.isnan(want[0]))


# ---------------------------------------------------------------- Philox
@pytest.mark.parametrize("stream", [s.word for s in contract.STREAM_TABLE],
                         ids=[s.name for s in contract.STREAM_TABLE])
def test_philox_words_every_stream(K, stream):
    rng = fresh_rng()
    seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 7
    n = 1001
    words = backends.resolve(K.NAME).philox_words(n, seed, step, layer, stream)
    np.testing.assert_array_equal(words, philox_words(n, seed, step, layer, stream))


# ---------------------------------------------------------------- whole epochs of a plan
EPOCHS = {
    "plain": dict(sizes=(3, 16, 12, 2),
                  acts=[contract.ACT_TANH, contract.ACT_RELU, contract.ACT_LINEAR],
                  drop=[0.25, 0.1, 0.0], l2=1e-3),
    "bn-noise-input": dict(sizes=(4, 9, 7, 2),
                           acts=[contract.ACT_RELU, contract.ACT_SIGMOID, contract.ACT_LINEAR],
                           drop=[0.1, 0.2, 0.0], bn=[True, False, False],
                           noise=[(contract.NOISE_NONE, 0.0), (contract.NOISE_MUL, 0.3),
                                  (contract.NOISE_ADD, 0.05)],
                           in_drop=0.1, in_noise=(contract.NOISE_ADD, 0.1), opt=contract.OPT_SGD,
                           momentum=0.9, nesterov=True),
    "sparse-penalties": dict(sizes=(5, 12, 8, 3), acts=[contract.ACT_LEAKY_RELU, contract.ACT_TANH,
                                                        contract.ACT_LINEAR],
                             loss=contract.LOSS_SCE, l1=1e-3, group=1e-2, maxnorm=1.5,
                             opt=contract.OPT_ADAMW),
    "trunk-heads": dict(sizes=(4, 8, 6),
                        acts=[contract.ACT_RELU, contract.ACT_LEAKY_RELU, contract.ACT_LINEAR,
                              contract.ACT_TANH, contract.ACT_LINEAR, contract.ACT_LINEAR],
                        drop=[0.1, 0.2, 0.0, 0.1, 0.0, 0.0],
                        bn=[True, False, False, False, False, False],
                        noise=[(contract.NOISE_NONE, 0.0),
                               (contract.NOISE_MUL, 0.3)] + [(0, 0.0)] * 4,
                        in_drop=0.1, l1=1e-3,
                        heads=[((2,), contract.LOSS_MSE, 1.0, 0.0),
                               ((5, 3), contract.LOSS_SCE, 0.5, 0.2),
                               ((2,), contract.LOSS_BCE, 0.0, 0.0)]),
}


@pytest.mark.parametrize("case", list(EPOCHS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_epochs_follow_the_reference(K, case, dtype):
    """Two epochs (one partial batch each) of a plan: parameters, moments, running
    statistics and the per-part loss sums agree with kernels/reference/epoch.py."""
    if K.NAME == "cuda" and dtype == np.float64 and case != "trunk-heads":
        pytest.skip("the simulator is slow: float64 on the CUDA paths runs in test_cuda")
    rng = fresh_rng()
    want_plan = random_plan(rng, dtype, **EPOCHS[case])
    got_plan = clone_plan(want_plan)
    X = randn(rng, (40, want_plan.Ws[0].shape[0]), dtype)
    Y = random_targets(rng, want_plan, 40)
    want = run_epochs(reference, want_plan, X, Y, 16)
    got = run_epochs(K, got_plan, X, Y, 16)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for (ls_w, pen_w, steps_w, fin_w), (ls_g, pen_g, steps_g, fin_g) in zip(want, got):
        assert (steps_g, fin_g) == (steps_w, fin_w) == (3, True)
        np.testing.assert_allclose(ls_g, ls_w, rtol=tol["rtol"] * 10)
        assert pen_g == pytest.approx(pen_w, rel=tol["rtol"] * 10, abs=1e-12)
    for name in ("params", "stats", "m", "v"):
        np.testing.assert_allclose(getattr(got_plan.store, name),
                                   getattr(want_plan.store, name), **tol, err_msg=name)


def test_epoch_stops_before_updating_on_a_nonfinite_loss(K):
    rng = fresh_rng()
    plan = random_plan(rng, np.float32, **EPOCHS["plain"])
    X = randn(rng, (20, 3))
    Y = random_targets(rng, plan, 20)
    first = np.random.default_rng([0, 0]).permutation(20)[5]   # run_epochs' first batch of 8
    Y[first] = np.inf
    before = plan.store.copy()
    (loss_sums, pen, steps, finite), = run_epochs(K, plan, X, Y, 8, epochs=1, perm_seed=0)
    assert not finite and steps == 0
    np.testing.assert_array_equal(plan.store.params, before.params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_inference_of_every_part(K, dtype):
    rng = fresh_rng()
    plan = random_plan(rng, dtype, training=False, **{
        k: v for k, v in EPOCHS["trunk-heads"].items() if k not in ("bn", "noise")})
    X = randn(rng, (21, 4), dtype)
    H = reference.forward_inference(plan, X, 8, 0)
    assert_close(K.forward_inference(plan, X, 8, 0), H, dtype)
    for p in range(1, plan.n_parts):
        assert_close(K.forward_inference(plan, H, 8, p), reference.forward_inference(plan, H, 8, p),
                     dtype)


# ---------------------------------------------------------------- the spec against calculus
def test_reference_step_gradients_match_central_differences():
    """The reference step's gradients of a trunk + heads plan (BatchNorm, noise, dropout,
    weighted heads), float64, masks fixed by the step."""
    rng = fresh_rng()
    plan = random_plan(rng, np.float64, **EPOCHS["trunk-heads"])
    X = randn(rng, (6, 4), np.float64)
    Y = random_targets(rng, plan, 6)
    plan.allocate(6, plan.y_widths)
    idx = np.arange(6, dtype=np.int64)
    stats = plan.store.stats.copy()

    def objective():
        plan.store.stats[...] = stats
        losses, _, _ = spec.forward_backward(reference, plan, X, Y, idx, 4)
        return float(plan.partf[:, contract.PF_WEIGHT] @ losses)
    objective()
    grad = plan.grad.copy()
    num = central_difference(objective, plan.store.params)
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)
