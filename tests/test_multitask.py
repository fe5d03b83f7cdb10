"""fastreg.MultiTask: a shared trunk, named heads, each with its own loss and weight.

The numpy backend is the oracle (float64 gradient check by central differences, masks fixed by
the seed and the step); a one-head MultiTask is the Sequential of its layers, step for step;
the compiled backends follow numpy to float32 rounding.
"""
import numpy as np
import pytest

import fastreg as fr
from fastreg import backend as backends
from fastreg.kernels import driver

from netutil import fresh_rng, randn

N_IN = 5


def make_model(dtype="float32", seed=0, weights=(0.7, 1.3, 0.4), backend="numpy",
               optimizer=None, regularize=False):
    """Three heads (mse, sparse CE with its own input dropout, binary CE), dropout everywhere."""
    reg = fr.L2(1e-2) if regularize else None
    trunk = [fr.Dropout(0.1), fr.Dense(7, "tanh", dropout=0.2, regularizer=reg),
             fr.Dense(6, "leaky_relu", dropout=0.1,
                      regularizer=[fr.MaxNorm(2.0)] if regularize else None)]
    heads = {"a": ([fr.Dense(2, regularizer=reg)], "mse", weights[0]),
             "b": ([fr.Dropout(0.3), fr.Dense(4, "tanh", dropout=0.25), fr.Dense(3)],
                   "sparse_categorical_crossentropy", weights[1]),
             "c": {"layers": [fr.Dense(2)], "loss": "binary_crossentropy", "weight": weights[2]}}
    model = fr.MultiTask(trunk, heads, input_dim=N_IN, seed=seed, dtype=dtype)
    model.compile(optimizer=optimizer or fr.Adam(1e-2), backend=backend)
    return model


def make_data(rng, n, dtype=np.float32):
    X = randn(rng, (n, N_IN), dtype)
    y = {"a": randn(rng, (n, 2), dtype), "b": rng.integers(0, 3, n),
         "c": rng.random((n, 2)).astype(dtype)}
    return X, y


def available(name):
    try:
        backends.resolve(name)
        return True
    except backends.BackendUnavailable:
        return False


# ---------------------------------------------------------------- gradients
def test_gradient_check_float64_numpy():
    """The summed, weighted objective's gradient (all tensors, trunk and heads) against
    central differences, in float64 with the dropout masks of one fixed step."""
    rng = fresh_rng()
    model = make_model("float64")
    X, y = make_data(rng, 9, np.float64)
    for W in model._W + model._b:       # nonzero biases: every term of the gradient is live
        W[...] = rng.standard_normal(W.shape) * 0.5
    step = 7
    total, grads = model._objective_and_gradients(X, y, step)
    assert np.isfinite(total) and len(grads) == len(model.weight_names())
    params = [p for pair in zip(model._W, model._b) for p in pair]
    eps = 1e-6
    for name, p, g in zip(model.weight_names(), params, grads):
        num = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up = model._objective_and_gradients(X, y, step)[0]
            p[i] = old - eps
            down = model._objective_and_gradients(X, y, step)[0]
            p[i] = old
            num[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8, err_msg=name)


def test_head_gradients_are_weighted_and_summed_into_the_trunk():
    """grad(w) = sum_h w_h * grad_h: heads' input gradients are summed into the trunk."""
    rng = fresh_rng()
    X, y = make_data(rng, 8, np.float64)
    per_head = []
    for k in range(3):
        w = [0.0, 0.0, 0.0]
        w[k] = 1.0
        model = make_model("float64", weights=w)
        per_head.append(model._objective_and_gradients(X, y, step=3))
    model = make_model("float64", weights=(2.0, 0.5, 1.5))
    total, grads = model._objective_and_gradients(X, y, step=3)
    assert total == pytest.approx(2.0 * per_head[0][0] + 0.5 * per_head[1][0]
                                  + 1.5 * per_head[2][0], rel=1e-12)
    for i, g in enumerate(grads):
        expected = 2.0 * per_head[0][1][i] + 0.5 * per_head[1][1][i] + 1.5 * per_head[2][1][i]
        np.testing.assert_allclose(g, expected, rtol=1e-10, atol=1e-13,
                                   err_msg=model.weight_names()[i])


# ---------------------------------------------------------------- equals Sequential
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_one_head_equals_sequential_step_for_step(backend):
    trunk = [fr.Dropout(0.15), fr.Dense(7, "tanh", dropout=0.2, regularizer=fr.L2(1e-2)),
             fr.Dense(6, "relu", dropout=0.1, regularizer=fr.L1(1e-3))]
    head = [fr.Dense(5, "relu", regularizer=fr.MaxNorm(1.5)), fr.Dense(3)]
    loss = "sparse_categorical_crossentropy"
    mt = fr.MultiTask(trunk, {"y": (head, loss)}, input_dim=N_IN, seed=4)
    seq = fr.Sequential(trunk + head, input_dim=N_IN, seed=4)
    # same initial weights from the same seed (one generator, trunk then heads)
    for a, b in zip(mt.get_weights(), seq.get_weights()):
        np.testing.assert_array_equal(a, b)
    mt.compile(optimizer=fr.Adam(1e-2), backend=backend)
    seq.compile(loss=loss, optimizer=fr.Adam(1e-2), backend=backend)
    rng = fresh_rng()
    X = randn(rng, (50, N_IN))
    y = rng.integers(0, 3, 50)
    Xv, yv = randn(rng, (11, N_IN)), rng.integers(0, 3, 11)
    for _ in range(2):     # two fits: the step counter and Adam's t carry over alike
        hm = mt.fit(X, {"y": y}, epochs=2, batch_size=16, verbose=0,
                    validation_data=(Xv, {"y": yv}))
        hs = seq.fit(X, y, epochs=2, batch_size=16, verbose=0, validation_data=(Xv, yv))
        if backend == "numpy":     # the same kernels in the same order: bit for bit
            for a, b in zip(mt.get_weights(), seq.get_weights()):
                np.testing.assert_array_equal(a, b)
            assert hm.history["loss_y"] == hs.history["loss"]
            assert hm.history["loss"] == hs.history["loss"]
            assert hm.history["penalty"] == hs.history["penalty"]
            assert hm.history["val_loss"] == hs.history["val_loss"]
        else:                      # per-op kernels vs the compiled epoch: float32 rounding
            for a, b in zip(mt.get_weights(), seq.get_weights()):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(hm.history["loss"], hs.history["loss"], rtol=1e-4)
    assert mt._step == seq._step and mt._t == seq._t
    np.testing.assert_allclose(mt.predict(Xv)["y"], seq.predict(Xv), rtol=1e-4, atol=1e-6)
    assert mt.evaluate(Xv, {"y": yv})["loss"] == pytest.approx(seq.evaluate(Xv, yv), rel=1e-5)


# ---------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_compiled_backends_follow_numpy(backend):
    if not available(backend):
        pytest.skip(f"backend {backend} is not available here")
    rng = fresh_rng()
    X, y = make_data(rng, 40)
    Xv, yv = make_data(rng, 10)
    results = {}
    for name in ("numpy", backend):
        model = make_model(backend=name, regularize=True)
        h = model.fit(X, y, epochs=3, batch_size=16, verbose=0, validation_data=(Xv, yv))
        results[name] = (model.get_weights(), h.history, model.predict(Xv))
    (w0, h0, p0), (w1, h1, p1) = results["numpy"], results[backend]
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5)
    assert h0.keys() == h1.keys()
    for k in h0:
        np.testing.assert_allclose(h1[k], h0[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for k in p0:
        np.testing.assert_allclose(p1[k], p0[k], rtol=1e-4, atol=1e-5)


def test_cuda_per_op_path_follows_numpy(monkeypatch):
    """The CUDA backend's per-op kernels (numba-cuda's simulator in CI): tiny sizes."""
    if not available("cuda"):
        pytest.skip("backend cuda is not available here")
    from fastreg.kernels import cuda as G
    if G.on_simulator():
        for name, value in (("TILE_M", 16), ("TILE_N", 16), ("TILE_K", 8), ("THREAD_M", 4),
                            ("THREAD_N", 4), ("BLOCK", 16), ("UPDATE_PER_THREAD", 4)):
            monkeypatch.setattr(G, name, value)
    rng = fresh_rng()
    X = randn(rng, (6, 3))
    y = {"r": randn(rng, (6, 1)), "k": rng.integers(0, 2, 6)}
    out = {}
    for name in ("numpy", "cuda"):
        model = fr.MultiTask([fr.Dense(4, "relu", dropout=0.2)],
                             {"r": ([fr.Dense(1)], "mse"),
                              "k": ([fr.Dense(2)], "sparse_categorical_crossentropy", 0.5)},
                             input_dim=3, seed=1)
        model.compile(optimizer=fr.Adam(1e-2), backend=name)
        h = model.fit(X, y, epochs=1, batch_size=6, verbose=0, shuffle=False)
        out[name] = (model.get_weights(), h.history["loss"], model.predict(X))
    for a, b in zip(out["numpy"][0], out["cuda"][0]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["cuda"][1], out["numpy"][1], rtol=1e-4)
    for k in ("r", "k"):
        np.testing.assert_allclose(out["cuda"][2][k], out["numpy"][2][k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- loss weights
def test_weight_zero_head_does_not_move_the_trunk():
    rng = fresh_rng()
    X, y = make_data(rng, 30)
    trunk = [fr.Dense(6, "tanh", dropout=0.2), fr.Dense(5, "relu")]
    with_b = fr.MultiTask(trunk, {"a": ([fr.Dense(2)], "mse", 1.0),
                                  "b": ([fr.Dense(4, "relu"), fr.Dense(3)],
                                        "sparse_categorical_crossentropy", 0.0)},
                          input_dim=N_IN, seed=2)
    alone = fr.MultiTask(trunk, {"a": ([fr.Dense(2)], "mse", 1.0)}, input_dim=N_IN, seed=2)
    b_before = with_b.get_weights()[6:]
    alone.set_weights(with_b.get_weights()[:6])
    for m in (with_b, alone):
        m.compile(optimizer=fr.Adam(1e-2), backend="numpy")
    hb = with_b.fit(X, {k: y[k] for k in ("a", "b")}, epochs=3, batch_size=8, verbose=0)
    ha = alone.fit(X, {"a": y["a"]}, epochs=3, batch_size=8, verbose=0)
    for a, b in zip(with_b.get_weights()[:6], alone.get_weights()):
        np.testing.assert_array_equal(a, b)     # trunk and head a: untouched by head b
    for a, b in zip(with_b.get_weights()[6:], b_before):
        np.testing.assert_array_equal(a, b)     # no gradient, no penalty: b never moves
    assert hb.history["loss"] == ha.history["loss"]
    assert all(v > 0 for v in hb.history["loss_b"])   # still reported, weighted by 0


def test_loss_weights_in_compile_and_the_weighted_total():
    rng = fresh_rng()
    X, y = make_data(rng, 24)
    model = make_model()
    model.compile(optimizer=fr.SGD(1e-2), backend="numpy", loss_weights={"b": 2.5})
    assert model.loss_weights == {"a": 0.7, "b": 2.5, "c": 0.4}
    h = model.fit(X, y, epochs=2, batch_size=8, verbose=0, validation_data=(X, y))
    for prefix in ("", "val_"):
        for e in range(2):
            total = sum(w * h.history[f"{prefix}loss_{k}"][e]
                        for k, w in model.loss_weights.items())
            assert h.history[f"{prefix}loss"][e] == pytest.approx(total, rel=1e-12)
    ev = model.evaluate(X, y)
    assert ev["loss"] == pytest.approx(h.history["val_loss"][-1], rel=1e-6)


# ---------------------------------------------------------------- keys
def test_history_evaluate_predict_keys():
    rng = fresh_rng()
    X, y = make_data(rng, 30)
    model = make_model(regularize=True)
    h = model.fit(X, y, epochs=2, batch_size=16, verbose=0, validation_data=(X[:10],
                  {k: v[:10] for k, v in y.items()}))
    assert set(h.history) == {"loss", "loss_a", "loss_b", "loss_c", "penalty", "val_loss",
                              "val_loss_a", "val_loss_b", "val_loss_c"}
    assert all(len(v) == 2 for v in h.history.values())
    assert h.history["penalty"][-1] > 0
    assert model.history is h
    ev = model.evaluate(X, y)
    assert set(ev) == {"loss", "loss_a", "loss_b", "loss_c"}
    p = model.predict(X)
    assert list(p) == ["a", "b", "c"]
    assert p["a"].shape == (30, 2) and p["b"].shape == (30, 3) and p["c"].shape == (30, 2)
    np.testing.assert_allclose(p["b"].sum(axis=1), 1.0, rtol=1e-5)    # softmax
    assert ((p["c"] > 0) & (p["c"] < 1)).all()                         # sigmoid
    assert model.penalty() > 0
    assert "head 'b'" in model.summary() and "input dropout 0.3" in model.summary()
    # predict in small chunks: the same outputs
    small = model.predict(X, batch_size=7)
    for k in p:
        np.testing.assert_allclose(small[k], p[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("monitor", ["val_loss", "val_loss_b", "loss_a"])
def test_early_stopping_on_total_or_one_task(monitor):
    rng = fresh_rng()
    X, y = make_data(rng, 20)
    model = make_model(optimizer=fr.Adam(0.5))     # large steps: some epoch gets worse
    stop = fr.EarlyStopping(monitor=monitor, patience=0, restore_best_weights=True)
    h = model.fit(X, y, epochs=30, batch_size=5, verbose=0, validation_data=(X, y),
                  callbacks=[stop])
    assert stop.best_epoch is not None
    assert stop.best == min(h.history[monitor])
    if stop.stopped_epoch is not None:
        assert len(h.history["loss"]) == stop.stopped_epoch + 1 < 30
    if monitor.startswith("val_"):     # the best weights were put back
        assert model.evaluate(X, y)[monitor[4:]] == pytest.approx(stop.best, rel=1e-5)
    with pytest.raises(ValueError, match="val_loss_zzz"):
        model.fit(X, y, epochs=1, verbose=0, validation_data=(X, y),
                  callbacks=[fr.EarlyStopping(monitor="val_loss_zzz")])


# ---------------------------------------------------------------- errors
def test_errors_name_the_head_and_leave_the_model_untouched():
    rng = fresh_rng()
    X, y = make_data(rng, 12)
    model = make_model()
    model.fit(X, y, epochs=1, batch_size=4, verbose=0)
    before, step = model.get_weights(), model._step
    mW = [m.copy() for m in model._mW]
    bad = [({"a": y["a"], "c": y["c"]}, ValueError, r"missing head.*'b'"),
           ({**y, "zzz": y["a"]}, ValueError, r"unknown head.*'zzz'"),
           ({**y, "b": y["b"][:9]}, ValueError, r"y\['b'\] has 9 rows but X has 12"),
           ({**y, "b": y["b"] + 5}, ValueError, r"y\['b'\] has labels outside"),
           ({**y, "a": y["a"][:, :1]}, ValueError, r"y\['a'\] has 1 columns"),
           (y["a"], TypeError, r"dict \{head name: targets\}")]
    for targets, exc, match in bad:
        with pytest.raises(exc, match=match):
            model.fit(X, targets, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"y_val\['c'\] has 3 rows"):
        model.fit(X, y, epochs=1, verbose=0, validation_data=(X[:4], {**{k: v[:4] for k, v
                                                                         in y.items()},
                                                                      "c": y["c"][:3]}))
    with pytest.raises(ValueError, match="unknown head"):
        model.evaluate(X, {**y, "d": y["a"]})

    class Boom(fr.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(X, y, epochs=3, batch_size=4, verbose=0, callbacks=[Boom()])
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model._mW, mW):
        np.testing.assert_array_equal(a, b)
    assert model._step == step


def test_a_failed_first_fit_leaves_the_model_unbuilt():
    model = fr.MultiTask([fr.Dense(3)], {"a": ([fr.Dense(1)], "mse")})
    model.compile(optimizer=fr.Adam(), backend="numpy")

    class Boom(fr.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("boom")
    X = np.ones((4, 2), np.float32)
    with pytest.raises(RuntimeError):
        model.fit(X, {"a": np.ones(4)}, verbose=0, callbacks=[Boom()])
    assert not model.built and model.input_dim is None and model._step == 0


def test_construction_and_compile_errors():
    d = [fr.Dense(2)]
    with pytest.raises(ValueError, match=r"head 'a'.*>= 0"):
        fr.MultiTask(d, {"a": (d, "mse", -1.0)})
    with pytest.raises(ValueError, match=r"head 'a'.*>= 0"):
        fr.MultiTask(d, {"a": (d, "mse", float("nan"))})
    with pytest.raises(ValueError, match=r"head 'a'.*unknown loss"):
        fr.MultiTask(d, {"a": (d, "hinge")})
    with pytest.raises(ValueError, match=r"head 'a'.*logits"):
        fr.MultiTask(d, {"a": ([fr.Dense(2, "sigmoid")], "binary_crossentropy")})
    with pytest.raises(ValueError, match=r"head 'a'.*>= 2 units"):
        fr.MultiTask(d, {"a": ([fr.Dense(1)], "sparse_categorical_crossentropy")})
    with pytest.raises(ValueError, match=r"head 'a' needs at least one Dense"):
        fr.MultiTask(d, {"a": ([fr.Dropout(0.1)], "mse")})
    with pytest.raises(ValueError, match="the trunk needs at least one Dense"):
        fr.MultiTask([], {"a": (d, "mse")})
    with pytest.raises(TypeError, match="Dense and Dropout"):
        fr.MultiTask([fr.Dense(2), fr.BatchNorm()], {"a": (d, "mse")})
    with pytest.raises(ValueError, match="non-empty dict"):
        fr.MultiTask(d, {})
    with pytest.raises(ValueError, match="head names"):
        fr.MultiTask(d, {"a b": (d, "mse")})
    with pytest.raises(TypeError, match=r"head 'a' must be \(layers, loss\)"):
        fr.MultiTask(d, {"a": d})
    with pytest.raises(ValueError, match="unknown keys"):
        fr.MultiTask(d, {"a": {"layers": d, "los": "mse"}})
    model = fr.MultiTask(d, {"a": (d, "mse")}, input_dim=3)
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(np.ones((2, 3)), {"a": np.ones(2)})
    with pytest.raises(ValueError, match=r"unknown head.*'b'"):
        model.compile(optimizer=fr.Adam(), loss_weights={"b": 1.0})
    with pytest.raises(ValueError, match=r"head 'a'.*>= 0"):
        model.compile(optimizer=fr.Adam(), loss_weights={"a": -0.5})
    assert model.optimizer is None and model.loss_weights == {"a": 1.0}
    with pytest.raises(ValueError, match="expects 4 arrays"):
        model.set_weights(model.get_weights()[:3])
    with pytest.raises(ValueError, match=r"a/dense_0/W"):
        model.set_weights(model.get_weights()[:2] + [np.ones((2, 3))]
                          + model.get_weights()[3:])


# ---------------------------------------------------------------- persistence
def test_save_load_roundtrip(tmp_path):
    rng = fresh_rng()
    X, y = make_data(rng, 20)
    model = make_model(regularize=True, seed=5)
    model.fit(X, y, epochs=2, batch_size=8, verbose=0)
    path = tmp_path / "mt.npz"
    model.save(path)
    loaded = fr.load_model(path)
    assert isinstance(loaded, fr.MultiTask)
    assert loaded.get_config() == model.get_config()
    assert loaded.weight_names() == model.weight_names()
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    p0, p1 = model.predict(X), loaded.predict(X)
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k])
    # optimizer moments and counters came back: training continues identically
    h0 = model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    h1 = loaded.fit(X, y, epochs=1, batch_size=8, verbose=0)
    assert h0.history == h1.history
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # an unbuilt, uncompiled model round-trips too; Sequential files still load
    fresh = fr.MultiTask([fr.Dense(3)], {"a": ([fr.Dense(1)], "mse", 0.5)})
    fresh.save(tmp_path / "fresh.npz")
    back = fr.load_model(tmp_path / "fresh.npz")
    assert not back.built and back.optimizer is None and back.loss_weights == {"a": 0.5}
    seq = fr.Sequential([fr.Dense(2)], input_dim=3)
    seq.save(tmp_path / "seq.npz")
    assert isinstance(fr.load_model(tmp_path / "seq.npz"), fr.Sequential)


def test_get_set_weights_order():
    model = make_model()
    names = model.weight_names()
    assert names[:4] == ["trunk/dense_0/W", "trunk/dense_0/b", "trunk/dense_1/W",
                         "trunk/dense_1/b"]
    assert names[4:] == ["a/dense_0/W", "a/dense_0/b", "b/dense_0/W", "b/dense_0/b",
                         "b/dense_1/W", "b/dense_1/b", "c/dense_0/W", "c/dense_0/b"]
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [(5, 7), (7,), (7, 6), (6,), (6, 2), (2,), (6, 4), (4,), (4, 3), (3,),
                      (6, 2), (2,)]
    new = [np.full(s, i, np.float64) for i, s in enumerate(shapes)]
    model.set_weights(new)
    for i, w in enumerate(model.get_weights()):
        assert w.dtype == np.float32 and (w == i).all()
    assert model._bases() == [0, 2, 3, 5]   # Philox layer words of each part's first block
    assert model.count_params() == sum(int(np.prod(s)) for s in shapes)


# ---------------------------------------------------------------- determinism, workspace
def test_same_seed_same_result_and_one_workspace_per_fit(monkeypatch):
    calls = []
    real = driver.allocate_workspace
    monkeypatch.setattr(driver, "allocate_workspace",
                        lambda net, b, w: (calls.append(b), real(net, b, w))[1])
    rng = fresh_rng()
    X, y = make_data(rng, 25)
    runs = []
    for seed in (3, 3, 4):
        model = make_model(seed=seed)
        calls.clear()
        h = model.fit(X, y, epochs=3, batch_size=8, verbose=0)
        assert calls == [8] * 4      # trunk + 3 heads, once per fit (not per step/epoch)
        runs.append((model.get_weights(), h.history))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1] == runs[1][1]
    assert runs[0][1]["loss"] != runs[2][1]["loss"]


def test_head_dropout_masks_differ_from_the_trunks():
    """Distinct Philox layer words: two identical heads under dropout see different masks,
    so their gradients differ though their weights are equal."""
    rng = fresh_rng()
    trunk = [fr.Dense(6, "tanh")]
    head = ([fr.Dropout(0.5), fr.Dense(4, "tanh", dropout=0.5), fr.Dense(1)], "mse")
    model = fr.MultiTask(trunk, {"p": head, "q": head}, input_dim=N_IN, seed=0,
                         dtype="float64")
    model.compile(optimizer=fr.SGD(0.1), backend="numpy")
    w = model.get_weights()
    model.set_weights(w[:2] + w[2:6] + w[2:6])       # heads p and q: the same weights
    X = randn(rng, (16, N_IN), np.float64)
    t = randn(rng, (16, 1), np.float64)
    _, grads = model._objective_and_gradients(X, {"p": t, "q": t}, step=0)
    assert not np.allclose(grads[2], grads[6])


def test_nonfinite_loss_stops_with_a_warning_at_the_callers_line():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3)).astype(np.float32)
    ys = {"a": (rng.standard_normal((64, 1)) * 1e30).astype(np.float32)}
    model = fr.MultiTask(trunk=[fr.Dense(8, "tanh")], heads={"a": ([fr.Dense(1)], "mse")},
                         input_dim=3, seed=0)
    model.compile(optimizer=fr.SGD(10.0), backend="numba")
    with pytest.warns(RuntimeWarning, match="epoch 1") as record:
        hist = model.fit(X, ys, epochs=3, batch_size=16, verbose=0)
    assert record[0].filename == __file__            # points at the user's fit call
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert len(hist.history.get("loss", [])) == 0
