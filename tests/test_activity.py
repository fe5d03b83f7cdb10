"""Activity regularization (Keras' activity_regularizer / ActivityRegularization): the penalty
(l1 * sum |a| + l2 * sum a^2) / B on a Dense's output a = f(z), before its noise and dropout,
its gradient added to dL/da in the fused backward epilogue.

The reference against float64 central differences and a transcription of Keras' formula;
every backend against the reference (per op and whole epochs, float32 and float64); the front
end (placement, errors, summary, save / load, MultiTask, export); and, where keras is
installed, training parity with Keras itself.
"""
import os

import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract, reference
from fastreg.kernels.philox import dropout_scale, dropout_threshold
from fastreg.kernels.reference import epoch as spec
from fastreg.kernels.reference.epilogue import activation

from planutil import clone_plan, random_plan, random_targets, run_epochs

TH, RL, GE, LN, SG = (contract.ACT_TANH, contract.ACT_RELU, contract.ACT_GELU,
                      contract.ACT_LINEAR, contract.ACT_SIGMOID)
MUL, ADD, ALPHA = contract.NOISE_MUL, contract.NOISE_ADD, contract.NOISE_ALPHA


# ---------------------------------------------------------------- the reference
def _objective(plan, X, Y, idx, step):
    losses, finite, act = spec.forward_backward(reference, plan, X, Y, idx, step)
    assert finite
    w = plan.partf[:, contract.PF_WEIGHT]
    return act + sum(w[p] * losses[p] for p in range(plan.n_parts)
                     if plan.parts[p, contract.PT_LOSS] >= 0)


FEATURES = {   # (dropout, noise, BatchNorm) of the hidden layers
    "plain": (0.0, (contract.NOISE_NONE, 0.0), False),
    "dropout": (0.3, (contract.NOISE_NONE, 0.0), False),
    "gaussian-dropout-bn": (0.3, (MUL, 0.3), True),
    "gaussian-noise": (0.0, (ADD, 0.2), False),
    "alpha-dropout-bn": (0.2, (ALPHA, 0.1), True),
}


@pytest.mark.parametrize("strengths", [(0.05, 0.0), (0.0, 0.07), (0.03, 0.05)])
@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("act", [a.code for a in contract.ACTIVATION_TABLE])
def test_reference_gradient_is_the_objectives(act, features, strengths):
    """dL/dtheta of data loss + activity penalty (every layer, the output layer too) equals
    float64 central differences of that objective at the same step (same masks, noise)."""
    drop, noise, bn = FEATURES[features]
    rng = np.random.default_rng(act)
    plan = random_plan(rng, np.float64, sizes=(3, 7, 5, 2), acts=[act, act, LN],
                       drop=[drop, drop, 0.0], noise=[noise, noise, (0, 0.0)],
                       bn=[bn, False, False], activity=[strengths] * 3)
    plan.allocate(9, plan.y_widths)
    X, Y = rng.standard_normal((9, 3)), random_targets(rng, plan, 9)
    idx = np.arange(9)
    _objective(plan, X, Y, idx, 3)
    grad = plan.grad.copy()
    params = plan.store.params
    num = np.zeros_like(grad)
    h = 1e-6
    for k in range(params.size):
        old = params[k]
        params[k] = old + h
        up = _objective(plan, X, Y, idx, 3)
        params[k] = old - h
        down = _objective(plan, X, Y, idx, 3)
        params[k] = old
        num[k] = (up - down) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7 * max(1, np.abs(num).max()))


def test_penalty_is_keras_formula_before_the_dropout():
    """Transcribed Keras: an activity_regularizer on Dense(activation) adds
    regularizer(a) / batch_size, a = activation(x @ W + b): dropout layers come after it.
    The reference's penalty (a dropout layer: half its outputs hold 0) is that of a."""
    rng = np.random.default_rng(0)
    B, I, O, l1, l2 = 13, 4, 6, 0.03, 0.05
    x, W, b = rng.standard_normal((B, I)), rng.standard_normal((I, O)), rng.standard_normal(O)
    out, pre = np.zeros((B, O)), np.zeros((B, O))
    thr, scale = dropout_threshold(0.5), dropout_scale(0.5, np.float64)
    assert contract.keeps_pre(TH, contract.NOISE_NONE, True, True)
    reference.dense_forward(x, W, b, out, TH, 0.0, thr, scale, 1, 2, 0, pre=pre)
    assert (out == 0).sum() > 10         # dropped units
    a = np.tanh(x @ W + b)
    np.testing.assert_allclose(pre, a, rtol=1e-15)
    grad = rng.standard_normal((B, O))
    dW, db = np.zeros((I, O)), np.zeros(O)
    pen = reference.dense_backward(grad.copy(), out, x, W, dW, db, np.zeros((0, 0)), TH, 0.0,
                                   thr, scale, 1, 2, 0, pre=pre, activity_l1=l1, activity_l2=l2)
    keras = (l1 * np.abs(a).sum() + l2 * (a ** 2).sum()) / B
    assert pen == pytest.approx(keras, rel=1e-14)
    keep = out != 0
    dz = (np.where(keep, grad * scale, 0) + (l1 * np.sign(a) + 2 * l2 * a) / B) * (1 - a * a)
    np.testing.assert_allclose(dW, x.T @ dz, rtol=1e-12)
    np.testing.assert_allclose(db, dz.sum(axis=0), rtol=1e-12)


# ---------------------------------------------------------------- the backends
def _backend(name):
    if name == "cuda":
        G = pytest.importorskip("fastreg.kernels.cuda")
        if not G.available()[0]:
            pytest.skip(G.available()[1])
        return G
    return pytest.importorskip(f"fastreg.kernels.{name}")


CASES = {
    "dropout": dict(acts=[TH, GE, LN], drop=[0.3, 0.2, 0.0],
                    activity=[(0.05, 0.02), (0.01, 0.1), (0.0, 0.0)]),
    "noise-bn": dict(acts=[TH, RL, LN], drop=[0.3, 0.0, 0.0], bn=[True, True, False],
                     noise=[(MUL, 0.3), (ADD, 0.2), (0, 0.0)],
                     activity=[(0.05, 0.02), (0.01, 0.1), (0.0, 0.05)]),
    "linear-relu-plain": dict(acts=[LN, RL, LN], drop=[0.3, 0.0, 0.0],
                              activity=[(0.05, 0.02), (0.04, 0.0), (0.0, 0.05)]),
    "heads": dict(sizes=(3, 12), acts=[TH, TH, LN, LN], drop=[0.25, 0.25, 0.0, 0.0],
                  activity=[(0.05, 0.0), (0.0, 0.1), (0.02, 0.0), (0.0, 0.0)],
                  heads=[((10, 2), contract.LOSS_MSE, 0.7, 0.2),
                         ((3,), contract.LOSS_SCE, 1.0, 0.0)]),
}
# Numba compiles an epoch per combination of features: two of them
BACKEND_CASES = ([("cython", c) for c in CASES] + [("numba", "dropout"), ("numba", "noise-bn")]
                 + [("cuda", c) for c in CASES])


def _epoch_case(name, dtype, seed=0):
    rng = np.random.default_rng(seed)
    kw = dict(CASES[name])
    plan = random_plan(rng, dtype, sizes=kw.pop("sizes", (3, 9, 7, 2)), **kw)
    X = rng.standard_normal((37, plan.Ws[0].shape[0])).astype(dtype)
    return plan, X, random_targets(rng, plan, 37)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend,case", BACKEND_CASES)
def test_epochs_equal_reference(monkeypatch, backend, case, dtype):
    """Two epochs of a plan with activity penalties (after dropout, GaussianDropout,
    GaussianNoise, BatchNorm, on linear / relu / tanh / gelu layers, trunk and heads):
    the same losses, penalties (the activity penalty included) and weights as the
    reference, to float32 rounding."""
    K = _backend(backend)
    if backend == "cuda":
        from netutil import small_cuda_tiles
        monkeypatch.setattr(K, "FUSED_MAX_WIDTH", 128)
        ctx = small_cuda_tiles(monkeypatch, K)
        ctx.__enter__()
    plan, X, Y = _epoch_case(case, dtype)
    ref, dev = clone_plan(plan), clone_plan(plan)
    rr = run_epochs(reference, ref, X, Y, 8)
    rd = run_epochs(K, dev, X, Y, 8)
    if backend == "cuda":
        assert not dev.cache["cuda"].fused      # the fused small-MLP path steps aside
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    for a, b in zip(rr, rd):
        assert b[2] == a[2] and b[3] == a[3]
        np.testing.assert_allclose(b[0], a[0], **tol)
        assert b[1] == pytest.approx(a[1], rel=tol["rtol"] * 10)
        assert a[1] > 0
    np.testing.assert_allclose(dev.store.params, ref.store.params, **tol)
    np.testing.assert_allclose(dev.store.m, ref.store.m, **tol)


@pytest.mark.parametrize("backend", ["cython", "cuda"])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("act", [TH, GE, LN, SG])
def test_per_op_backward_equals_reference(backend, act, bn):
    """dense_backward / bn_dense_backward with an activity penalty under dropout and
    GaussianDropout: dz, dW, db, dx and the returned penalty as the reference's."""
    K = _backend(backend)
    rng = np.random.default_rng(act)
    B, I, O = 11, 5, 7
    dt = np.float64
    x, W, b = rng.standard_normal((B, I)), rng.standard_normal((I, O)), rng.standard_normal(O)
    thr, scale = dropout_threshold(0.3), dropout_scale(0.3, dt)
    noise = (MUL, 0.4)
    gamma_beta = np.array([1 + 0.1 * rng.standard_normal(O), 0.1 * rng.standard_normal(O)])
    outs = {}
    for name, ops in (("ref", reference), ("dev", K)):
        out, pre = np.zeros((B, O)), np.zeros((B, O))
        grad = np.random.default_rng(1).standard_normal((B, O))
        dW, db, dx = np.zeros((I, O)), np.zeros(O), np.zeros((B, I))
        if bn:
            xhat, gb = np.zeros((B, O)), gamma_beta.copy()
            save, stats = np.zeros((contract.BN_SAVE_ROWS, O)), np.ones((2, O))
            dgb = np.zeros((2, O))
            ops.bn_dense_forward(x, W, b, out, xhat, gb, save, act, 0.0, thr, scale, 1e-3, 4,
                                 2, 1, *noise, pre=pre)
            pen = ops.bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb,
                                        dx, act, 0.0, thr, scale, 0.9, 4, 2, 1, *noise, pre=pre,
                                        activity_l1=0.02, activity_l2=0.03)
            extra = (dgb, stats)
        else:
            ops.dense_forward(x, W, b, out, act, 0.0, thr, scale, 4, 2, 1, *noise, pre=pre)
            pen = ops.dense_backward(grad, out, x, W, dW, db, dx, act, 0.0, thr, scale, 4, 2, 1,
                                     *noise, pre=pre, activity_l1=0.02, activity_l2=0.03)
            extra = ()
        outs[name] = (pen, grad, dW, db, dx) + extra
    assert outs["dev"][0] == pytest.approx(outs["ref"][0], rel=1e-12)
    for a, b in zip(outs["ref"][1:], outs["dev"][1:]):
        np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-12)


def test_off_changes_nothing_in_the_plan():
    """Without an activity penalty the plan keeps what it kept before (no pre buffer for
    an output-derivable f under dropout); with one under dropout it keeps a: one value per
    element more."""
    rng = np.random.default_rng(0)
    off = random_plan(rng, np.float32, acts=[TH, TH, LN], drop=[0.3, 0.0, 0.0])
    on = random_plan(rng, np.float32, acts=[TH, TH, LN], drop=[0.3, 0.0, 0.0],
                     activity=[(1e-3, 0.0), (1e-3, 0.0), (0.0, 0.0)])
    assert not off.has_activity() and on.has_activity()
    assert [off.keeps_pre(l) for l in range(3)] == [False, False, False]
    assert [on.keeps_pre(l) for l in range(3)] == [True, False, False]   # no dropout: a = out
    units = sum(W.shape[1] for W in on.Ws)
    assert on.kept_bytes_per_element() == pytest.approx(4 * (units + 8) / units)
    assert off.kept_bytes_per_element() == 4


# ---------------------------------------------------------------- the front end
def _data(n=200, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X, (np.sin(X[:, :1]) + 0.1 * X[:, 1:2]).astype(np.float32)


def _model(backend="numpy", seed=3, **kw):
    m = fr.Sequential([fr.Dense(16, "relu", dropout=0.2, activity_regularizer=fr.L1(1e-2)),
                       fr.BatchNorm(), fr.Dense(8, "tanh"), fr.ActivityRegularization(l2=1e-2),
                       fr.Dropout(0.1), fr.Dense(1)], input_dim=5, seed=seed, **kw)
    m.compile(loss="mse", optimizer=fr.Adam(1e-2), backend=backend)
    return m


def test_fit_reports_the_activity_penalty_in_penalty_not_loss():
    X, y = _data()
    m = _model()
    h = m.fit(X, y, epochs=2, batch_size=32, verbose=0)
    assert m.penalty() == 0.0              # no weight penalty: history's is the activity's
    assert all(p > 0 for p in h.history["penalty"])
    plain = fr.Sequential([fr.Dense(16, "relu", dropout=0.2), fr.BatchNorm(), fr.Dense(8, "tanh"),
                           fr.Dropout(0.1), fr.Dense(1)], input_dim=5, seed=3)
    plain.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numpy")
    # evaluate is the data loss only, as for weight penalties: same weights, same value
    plain.set_weights(m.get_weights())
    assert m.evaluate(X, y) == pytest.approx(plain.evaluate(X, y), rel=1e-7)
    assert "activity penalty (l1=0.01, l2=0)" in m.summary()
    assert "activity penalty (l1=0, l2=0.01)" in m.summary()


def test_l1_gives_sparse_outputs():
    """The overview article's sparse representations: an L1 activity penalty leaves more
    hidden relu outputs at exactly 0 than the same model without it."""
    X, y = _data(400)

    def zeros(reg):
        m = fr.Sequential([fr.Dense(32, "relu", activity_regularizer=reg), fr.Dense(1)],
                          input_dim=5, seed=0)
        m.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numpy")
        m.fit(X, y, epochs=15, batch_size=64, verbose=0)
        W, b = m.get_weights()[:2]
        return float((np.maximum(X @ W + b, 0) == 0).mean())
    assert zeros(fr.L1(0.05)) > zeros(None) + 0.1


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_same_seed_same_training_on_every_backend(backend):
    pytest.importorskip(f"fastreg.kernels.{backend}")
    X, y = _data()
    ref, dev = _model("numpy"), _model(backend)
    hr = ref.fit(X, y, epochs=2, batch_size=32, verbose=0)
    hd = dev.fit(X, y, epochs=2, batch_size=32, verbose=0)
    np.testing.assert_allclose(hd.history["penalty"], hr.history["penalty"], rtol=1e-5)
    np.testing.assert_allclose(hd.history["loss"], hr.history["loss"], rtol=1e-5)
    for a, b in zip(ref.get_weights(), dev.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    X, y = _data()
    m = _model()
    m.fit(X, y, epochs=1, batch_size=32, verbose=0)
    m.save(tmp_path / "m.npz")
    back = fr.load_model(tmp_path / "m.npz")
    assert back.summary() == m.summary()
    assert back.layers[0].activity == (0.01, 0.0)
    assert back.layers[3].activity == (0.0, 0.01)
    h1 = m.fit(X, y, epochs=1, batch_size=32, verbose=0)
    h2 = back.fit(X, y, epochs=1, batch_size=32, verbose=0)
    assert h2.history["penalty"] == pytest.approx(h1.history["penalty"], rel=1e-9)
    # a Dense without one writes no activity key: old files stay as they were
    assert "activity_regularizer" not in fr.Dense(3).get_config()


def test_multitask_trunk_and_heads():
    X, y = _data()
    kind = (X[:, 0] > 0).astype(np.int64)

    def build(act_head):
        m = fr.MultiTask(trunk=[fr.Dense(16, "relu", activity_regularizer=fr.L1(1e-2))],
                         heads={"v": ([fr.Dense(1)], "mse"),
                                "k": ([fr.Dense(8, "tanh", activity_regularizer=act_head),
                                       fr.Dense(2)], "sparse_categorical_crossentropy")},
                         input_dim=5, seed=0)
        m.compile(optimizer=fr.Adam(1e-2), backend="numpy")
        return m
    on, off = build(fr.ElasticNet(1e-2, 1e-2)), build(None)
    hon = on.fit(X, {"v": y, "k": kind}, epochs=1, batch_size=32, verbose=0)
    hoff = off.fit(X, {"v": y, "k": kind}, epochs=1, batch_size=32, verbose=0)
    assert hon.history["penalty"][0] > hoff.history["penalty"][0] > 0
    assert "activity penalty" in on.summary()
    with pytest.raises(ValueError, match="head 'k'.*ActivityRegularization.*before any Dense"):
        fr.MultiTask(trunk=[fr.Dense(4)],
                     heads={"k": ([fr.ActivityRegularization(0.1), fr.Dense(2)], "mse")})


@pytest.mark.parametrize("make, error, match", [
    (lambda: fr.Dense(4, activity_regularizer=fr.MaxNorm(3)), TypeError, "L1, L2 or ElasticNet"),
    (lambda: fr.Dense(4, activity_regularizer=fr.GroupLasso(1e-3)), TypeError, "activity"),
    (lambda: fr.Dense(4, activity_regularizer=0.01), TypeError, "activity_regularizer"),
    (lambda: fr.Dense(4, activity_regularizer=fr.L1(-1.0)), ValueError, ">= 0"),
    (lambda: fr.ActivityRegularization(l1=-0.1), ValueError, "l1 must be >= 0"),
    (lambda: fr.ActivityRegularization(l2=float("nan")), ValueError, "l2"),
    (lambda: fr.ActivityRegularization(l1="0.1"), TypeError, "l1"),
    (lambda: fr.Dense(3, "softmax", activity_regularizer=fr.L1(0.1)), ValueError, "softmax"),
    (lambda: fr.Sequential([fr.ActivityRegularization(0.1), fr.Dense(1)]), ValueError,
     "before any Dense"),
    (lambda: fr.Sequential([fr.Dense(4), fr.Dropout(0.2), fr.ActivityRegularization(0.1)]),
     ValueError, "after a Dropout on the output of Dense 0"),
    (lambda: fr.Sequential([fr.Dense(4), fr.GaussianNoise(0.2), fr.ActivityRegularization(0.1)]),
     ValueError, "GaussianNoise"),
    (lambda: fr.Sequential([fr.Dense(4), fr.Dense(3, "softmax"),
                            fr.ActivityRegularization(0.1)]), ValueError, "softmax"),
    (lambda: fr.Sequential([fr.Dense(4, activity_regularizer=fr.L1(1e-46)), fr.Dense(1)]),
     ValueError, "rounds to 0 in float32"),
])
def test_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_placements_that_fold():
    """After the Dense or its BatchNorm (and a Dense's own dropout=, applied last): folded,
    strengths added to the Dense's own."""
    m = fr.Sequential([fr.Dense(4, "relu", dropout=0.5, activity_regularizer=fr.L2(0.1)),
                       fr.BatchNorm(), fr.ActivityRegularization(0.2, 0.3),
                       fr.ActivityRegularization(l1=0.1), fr.Dropout(0.1), fr.Dense(1)],
                      input_dim=2)
    blk = m._network.blocks[0]
    assert blk.activity == pytest.approx((0.3, 0.4))
    li, lf, *_ = m._network.config_rows(fr.Adam(), True)
    assert lf[0, contract.LF_ACTIVITY_L1] == np.float32(0.3)
    assert lf[1, contract.LF_ACTIVITY_L1] == 0 and lf[1, contract.LF_ACTIVITY_L2] == 0


def test_model_untouched_by_a_refused_add():
    m = fr.Sequential([fr.Dense(4), fr.Dropout(0.2)])
    with pytest.raises(ValueError):
        m.add(fr.ActivityRegularization(0.1))
    assert len(m.layers) == 2


# ---------------------------------------------------------------- Keras
def _keras():
    if "KERAS_BACKEND" not in os.environ:
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except Exception as exc:       # not installed, or no backend for it
        pytest.skip(f"keras is not usable here: {exc}")
    return keras


def test_to_keras_carries_the_activity_penalty():
    keras = _keras()
    peer = _model().to_keras()
    regs = [la for la in peer.layers if isinstance(la, keras.layers.ActivityRegularization)]
    assert [(r.l1, r.l2) for r in regs] == [(0.01, 0.0), (0.0, 0.01)]


def keras_parity(steps_epochs=5):
    """(max relative difference of the weights, of the last epoch's loss + penalty) between
    fastreg (cython if built, else numpy) and Keras trained with SGD from the same weights,
    no dropout (its masks differ), every activity form."""
    keras = _keras()
    X, y = _data(256)
    m = fr.Sequential([fr.Dense(16, "tanh", activity_regularizer=fr.L1(2e-2)),
                       fr.Dense(16, "relu", activity_regularizer=fr.ElasticNet(1e-2, 3e-2)),
                       fr.ActivityRegularization(l2=2e-2), fr.Dense(1)], input_dim=5, seed=0)
    peer = m.to_keras()
    try:
        import fastreg.kernels.cython  # noqa: F401
        backend = "cython"
    except ImportError:
        backend = "numpy"
    m.compile(loss="mse", optimizer=fr.SGD(0.05), backend=backend)
    h = m.fit(X, y, epochs=steps_epochs, batch_size=32, shuffle=False, verbose=0)
    peer.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    kh = peer.fit(X, y, epochs=steps_epochs, batch_size=32, shuffle=False, verbose=0)
    ours = m.get_weights()
    theirs = [np.asarray(w) for w in peer.get_weights()]
    rel = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
              for a, b in zip(ours, theirs))
    total = h.history["loss"][-1] + h.history["penalty"][-1]
    return rel, abs(total - kh.history["loss"][-1]) / kh.history["loss"][-1]


def test_training_parity_with_keras():
    """Keras' activity regularizers (Dense(activity_regularizer=...),
    ActivityRegularization) and fastreg's: the same weights after 40 SGD steps (float32
    rounding), and fastreg's loss + penalty is Keras' reported loss (which includes its
    regularization losses)."""
    rel_w, rel_loss = keras_parity()
    assert rel_w < 1e-4
    assert rel_loss < 1e-4
