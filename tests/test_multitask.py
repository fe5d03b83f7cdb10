"""fastreg.MultiTask: a shared trunk, named heads, each with its own loss and weight.

The numpy backend is the oracle (float64 gradient check by central differences, masks fixed by
the seed and the step); a one-head MultiTask is the Sequential of its layers, step for step;
the compiled backends follow numpy to float32 rounding.
"""
import numpy as np
import pytest

import fastreg as fr
from fastreg import backend as backends
from fastreg.kernels import mc

from modelutil import objective_and_gradients, trainable
from netutil import central_difference, fresh_rng, randn

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
    # nonzero biases: every term of the gradient is live
    for W in model._network.kernels() + model._network.biases():
        W[...] = rng.standard_normal(W.shape) * 0.5
    step = 7
    total, grads = objective_and_gradients(model, X, y, step)
    assert np.isfinite(total) and len(grads) == len(model.weight_names())
    params = [p for pair in zip(model._network.kernels(), model._network.biases()) for p in pair]
    for name, p, g in zip(model.weight_names(), params, grads):
        num = central_difference(lambda: objective_and_gradients(model, X, y, step)[0], p)
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
        per_head.append(objective_and_gradients(model, X, y, step=3))
    model = make_model("float64", weights=(2.0, 0.5, 1.5))
    total, grads = objective_and_gradients(model, X, y, step=3)
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
    assert (mt._network.counters.step == seq._network.counters.step
            and mt._network.counters.t == seq._network.counters.t)
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
    from fastreg.kernels import cuda
    from netutil import small_cuda_tiles
    rng = fresh_rng()
    X = randn(rng, (6, 3))
    y = {"r": randn(rng, (6, 1)), "k": rng.integers(0, 2, 6)}
    out = {}
    with small_cuda_tiles(monkeypatch, cuda):
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
    before, step = model.get_weights(), model._network.counters.step
    mW = [m.copy() for m in model._network.moments("m", "W")]
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
    for a, b in zip(model._network.moments("m", "W"), mW):
        np.testing.assert_array_equal(a, b)
    assert model._network.counters.step == step


def test_a_failed_first_fit_leaves_the_model_unbuilt():
    model = fr.MultiTask([fr.Dense(3)], {"a": ([fr.Dense(1)], "mse")})
    model.compile(optimizer=fr.Adam(), backend="numpy")

    class Boom(fr.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("boom")
    X = np.ones((4, 2), np.float32)
    with pytest.raises(RuntimeError):
        model.fit(X, {"a": np.ones(4)}, verbose=0, callbacks=[Boom()])
    assert not model.built and model.input_dim is None and model._network.counters.step == 0


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
    with pytest.raises(TypeError, match="MultiTask takes fastreg layers"):
        fr.MultiTask([fr.Dense(2), "relu"], {"a": (d, "mse")})
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
    # Philox layer words of each part's first block
    assert [first for first, _ in model._network.part_ranges()] == [0, 2, 3, 5]
    assert model.count_params() == sum(int(np.prod(s)) for s in shapes)


# ---------------------------------------------------------------- determinism, workspace
def test_same_seed_same_result_and_one_workspace_per_fit(monkeypatch):
    from fastreg.kernels.plan import Plan
    calls = []
    real = Plan.allocate
    monkeypatch.setattr(Plan, "allocate",
                        lambda plan, b, w: (calls.append(b), real(plan, b, w))[1])
    rng = fresh_rng()
    X, y = make_data(rng, 25)
    runs = []
    for seed in (3, 3, 4):
        model = make_model(seed=seed)
        calls.clear()
        h = model.fit(X, y, epochs=3, batch_size=8, verbose=0)
        assert calls == [8]      # one plan for trunk + 3 heads, once per fit
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
    _, grads = objective_and_gradients(model, X, {"p": t, "q": t}, step=0)
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


# ================================================================ BatchNorm and noise layers
def make_bn_noise_model(dtype="float32", seed=0, backend="numpy", optimizer=None,
                        momentum=0.9):
    """BatchNorm in the trunk and in two heads; GaussianNoise on the inputs and on a head's
    input, GaussianDropout on the trunk's output and on a head's input; dropout everywhere."""
    trunk = [fr.GaussianNoise(0.2), fr.Dropout(0.1), fr.Dense(6, "tanh"),
             fr.BatchNorm(momentum=momentum), fr.Dropout(0.2),
             fr.Dense(5, "sigmoid", dropout=0.1), fr.GaussianDropout(0.3)]
    heads = {"a": ([fr.GaussianDropout(0.25), fr.Dense(4, "tanh"),
                    fr.BatchNorm(momentum=momentum), fr.Dense(2)], "mse", 0.7),
             "b": ([fr.GaussianNoise(0.3), fr.Dropout(0.2), fr.Dense(3, "tanh"),
                    fr.GaussianNoise(0.1), fr.Dense(3)], "sparse_categorical_crossentropy",
                   1.3),
             "c": ([fr.Dense(2), fr.BatchNorm(momentum=momentum)], "binary_crossentropy",
                   0.4)}
    model = fr.MultiTask(trunk, heads, input_dim=N_IN, seed=seed, dtype=dtype)
    model.compile(optimizer=optimizer or fr.Adam(1e-2), backend=backend)
    return model


def randomize(model, rng):
    """Random W, b, gamma (around 1), beta and running statistics (variance > 0): every
    term of the gradient and of the folded inference is live."""
    weights = []
    for name, w in zip(model.weight_names(), model.get_weights()):
        if name.endswith("/gamma"):
            w = 1.0 + 0.3 * rng.standard_normal(w.shape)
        elif name.endswith("/moving_variance"):
            w = 0.5 + rng.random(w.shape)
        else:
            w = rng.standard_normal(w.shape) * 0.5
        weights.append(w)
    model.set_weights(weights)


def test_gradient_check_batchnorm_and_noise_float64_numpy():
    """Every trained tensor (W, b, gamma, beta of trunk and heads) against central
    differences, in float64, with the dropout masks and noise of one fixed step; BatchNorm
    with the batch statistics; backward through the heads' input noise (additive and
    multiplicative). The running statistics are left as they were."""
    rng = fresh_rng()
    model = make_bn_noise_model("float64")
    X, y = make_data(rng, 11, np.float64)
    randomize(model, rng)
    names, total = check_gradients(model, X, y, step=5)
    assert sum(n.endswith("/gamma") for n in names) == 3
    # the noise is live: another step draws other noise (and masks), another objective
    assert objective_and_gradients(model, X, y, 6)[0] != total


def check_gradients(model, X, y, step):
    """_objective_and_gradients' gradients of every trained tensor against central
    differences (float64); the running statistics are left as they were. Returns the names
    and the objective."""
    stats = [s.copy() for s in model._network.running_stats()]
    total, grads = objective_and_gradients(model, X, y, step)
    names, params = trainable(model)
    assert np.isfinite(total) and len(grads) == len(params) == len(names)
    for a, b in zip(model._network.running_stats(), stats):
        np.testing.assert_array_equal(a, b)
    for name, p, g in zip(names, params, grads):
        num = central_difference(lambda: objective_and_gradients(model, X, y, step)[0], p)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-7, err_msg=name)
        bn_name = name.replace("/dense_", "/batchnorm_")[:-2] + "/gamma"
        if name.endswith("/b") and bn_name in names:
            # the bias of a Dense with BatchNorm: exactly zero (the batch mean absorbs it)
            assert not g.any(), name
    return names, total


def test_gradient_check_noise_after_batchnorm_float64_numpy():
    """Noise after a Dense with BatchNorm (where Sequential takes it): GaussianDropout on
    the trunk's BatchNorm output, GaussianNoise on a head's."""
    trunk = [fr.Dense(6, "tanh"), fr.BatchNorm(), fr.GaussianDropout(0.3), fr.Dropout(0.1),
             fr.Dense(4, "sigmoid")]
    heads = {"a": ([fr.Dense(3, "tanh"), fr.BatchNorm(), fr.GaussianNoise(0.2), fr.Dense(2)],
                   "mse"),
             "b": ([fr.Dense(3)], "sparse_categorical_crossentropy", 0.5)}
    model = fr.MultiTask(trunk, heads, input_dim=N_IN, seed=1, dtype="float64")
    model.compile(optimizer=fr.Adam(1e-2), backend="numpy")
    rng = fresh_rng()
    X, y = make_data(rng, 10, np.float64)
    randomize(model, rng)
    _, total = check_gradients(model, X, {"a": y["a"], "b": y["b"]}, step=3)
    assert objective_and_gradients(model, X, {"a": y["a"], "b": y["b"]}, 4)[0] != total


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "mse"])
def test_one_head_with_batchnorm_noise_and_augment_equals_sequential(backend, loss):
    """A one-head MultiTask with BatchNorm, noise layers and augmentation trains, predicts
    and MC-samples as the Sequential of its layers (same seed: same masks, noise, augmented
    batches); bit for bit with the same (numpy) kernels."""
    trunk = [fr.GaussianNoise(0.1), fr.Dense(7, "tanh"), fr.BatchNorm(momentum=0.8),
             fr.Dense(6, "relu", dropout=0.1), fr.GaussianDropout(0.2)]
    out = 3
    head = [fr.Dense(5, "tanh"), fr.BatchNorm(momentum=0.7), fr.Dropout(0.1), fr.Dense(out)]
    augment = [fr.GaussianJitter(0.05)] + ([fr.Mixup(0.3)] if loss == "mse" else [])
    mt = fr.MultiTask(trunk, {"y": (head, loss)}, input_dim=N_IN, seed=4)
    seq = fr.Sequential(trunk + head, input_dim=N_IN, seed=4)
    mt.compile(optimizer=fr.Adam(1e-2), backend=backend)
    seq.compile(loss=loss, optimizer=fr.Adam(1e-2), backend=backend)
    rng = fresh_rng()
    X = randn(rng, (45, N_IN))
    y = rng.integers(0, out, 45) if loss != "mse" else randn(rng, (45, out))
    Xv = randn(rng, (9, N_IN))
    yv = rng.integers(0, out, 9) if loss != "mse" else randn(rng, (9, out))
    for _ in range(2):
        hm = mt.fit(X, {"y": y}, epochs=2, batch_size=16, verbose=0, augment=augment,
                    validation_data=(Xv, {"y": yv}))
        hs = seq.fit(X, y, epochs=2, batch_size=16, verbose=0, augment=augment,
                     validation_data=(Xv, yv))
    assert len(mt.get_weights()) == len(seq.get_weights()) == 2 * 4 + 4 * 2
    mc_m = mt.predict(Xv, mc_samples=5, seed=2)["y"]
    mc_s = seq.predict(Xv, mc_samples=5, seed=2)
    if backend == "numpy":
        for a, b in zip(mt.get_weights(), seq.get_weights()):
            np.testing.assert_array_equal(a, b)      # running statistics included
        assert hm.history["loss"] == hs.history["loss"]
        assert hm.history["val_loss"] == hs.history["val_loss"]
        np.testing.assert_array_equal(mt.predict(Xv)["y"], seq.predict(Xv))
        for a, b in zip(mc_m, mc_s):
            np.testing.assert_array_equal(a, b)
    else:
        for a, b in zip(mt.get_weights(), seq.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(hm.history["loss"], hs.history["loss"], rtol=1e-3)
        for a, b in zip(mc_m, mc_s):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert (mc_m[1] > 0).any()


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_batchnorm_noise_backends_follow_numpy(backend):
    if not available(backend):
        pytest.skip(f"backend {backend} is not available here")
    rng = fresh_rng()
    X, y = make_data(rng, 40)
    Xv, yv = make_data(rng, 10)
    results = {}
    for name in ("numpy", backend):
        model = make_bn_noise_model(backend=name)
        h = model.fit(X, y, epochs=3, batch_size=16, verbose=0, validation_data=(Xv, yv),
                      augment=[fr.GaussianJitter(0.1), fr.Mixup(0.3)])
        results[name] = (model.get_weights(), h.history, model.predict(Xv),
                         model.predict(Xv, mc_samples=6, seed=1))
    (w0, h0, p0, mc0), (w1, h1, p1, mc1) = results["numpy"], results[backend]
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    for k in h0:
        np.testing.assert_allclose(h1[k], h0[k], rtol=1e-3, atol=1e-5, err_msg=k)
    for k in p0:
        np.testing.assert_allclose(p1[k], p0[k], rtol=1e-3, atol=1e-4)
        for a, b in zip(mc0[k], mc1[k]):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def test_cuda_batchnorm_noise_mc_follow_numpy(monkeypatch):
    """The CUDA backend's per-op kernels with BatchNorm, noise and MC dropout (numba-cuda's
    simulator in CI): tiny sizes."""
    if not available("cuda"):
        pytest.skip("backend cuda is not available here")
    from fastreg.kernels import cuda
    from netutil import small_cuda_tiles
    rng = fresh_rng()
    X = randn(rng, (6, 3))
    y = {"r": randn(rng, (6, 1)), "k": rng.integers(0, 2, 6)}
    out = {}
    with small_cuda_tiles(monkeypatch, cuda):
        for name in ("numpy", "cuda"):
            model = fr.MultiTask([fr.GaussianNoise(0.1), fr.Dense(4, "relu"), fr.BatchNorm(),
                                  fr.Dropout(0.2)],
                                 {"r": ([fr.GaussianDropout(0.2), fr.Dense(1)], "mse"),
                                  "k": ([fr.Dense(3, "tanh"), fr.BatchNorm(), fr.Dense(2)],
                                        "sparse_categorical_crossentropy", 0.5)},
                                 input_dim=3, seed=1)
            model.compile(optimizer=fr.Adam(1e-2), backend=name)
            h = model.fit(X, y, epochs=1, batch_size=6, verbose=0, shuffle=False)
            out[name] = (model.get_weights(), h.history["loss"], model.predict(X),
                         model.predict(X, mc_samples=3, seed=0))
    for a, b in zip(out["numpy"][0], out["cuda"][0]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["cuda"][1], out["numpy"][1], rtol=1e-4)
    for k in ("r", "k"):
        np.testing.assert_allclose(out["cuda"][2][k], out["numpy"][2][k], rtol=1e-4, atol=1e-5)
        for a, b in zip(out["numpy"][3][k], out["cuda"][3][k]):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def _bn_moments(z):
    return z.mean(axis=0), z.var(axis=0)     # the biased variance, as training's


def test_running_statistics_follow_the_batch_of_each_part():
    """One step (one batch, no dropout or noise): every BatchNorm's running statistics are
    momentum * initial + (1 - momentum) * the batch's, computed here in float64 from the
    initial weights, the trunk's through the batch-normalized trunk output."""
    rng = fresh_rng()
    X = randn(rng, (16, N_IN), np.float64)
    y = {"a": randn(rng, (16, 2), np.float64), "b": randn(rng, (16, 1), np.float64)}
    model = fr.MultiTask([fr.Dense(6, "tanh"), fr.BatchNorm(momentum=0.9, eps=1e-3),
                          fr.Dense(5, "relu")],
                         {"a": ([fr.Dense(4, "tanh"), fr.BatchNorm(momentum=0.8),
                                 fr.Dense(2)], "mse"),
                          "b": ([fr.Dense(1)], "mse")}, input_dim=N_IN, seed=3,
                         dtype="float64")
    randomize(model, rng)
    w = dict(zip(model.weight_names(), model.get_weights()))
    model.compile(optimizer=fr.SGD(1e-2), backend="numpy")
    model.fit(X, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    after = dict(zip(model.weight_names(), model.get_weights()))
    z0 = X @ w["trunk/dense_0/W"] + w["trunk/dense_0/b"]
    mean, var = _bn_moments(z0)
    for key, stat, m in (("moving_mean", mean, 0.9), ("moving_variance", var, 0.9)):
        expected = m * w[f"trunk/batchnorm_0/{key}"] + (1 - m) * stat
        np.testing.assert_allclose(after[f"trunk/batchnorm_0/{key}"], expected, rtol=1e-10)
    zhat = (z0 - mean) / np.sqrt(var + 1e-3)
    a0 = np.tanh(w["trunk/batchnorm_0/gamma"] * zhat + w["trunk/batchnorm_0/beta"])
    H = np.maximum(a0 @ w["trunk/dense_1/W"] + w["trunk/dense_1/b"], 0)
    mean, var = _bn_moments(H @ w["a/dense_0/W"] + w["a/dense_0/b"])
    for key, stat in (("moving_mean", mean), ("moving_variance", var)):
        expected = 0.8 * w[f"a/batchnorm_0/{key}"] + 0.2 * stat
        np.testing.assert_allclose(after[f"a/batchnorm_0/{key}"], expected, rtol=1e-10)


def _manual_predict(model, X):
    """Inference in float64 from get_weights: BatchNorm with the running statistics, no
    dropout, no noise."""
    from fastreg.kernels import contract
    from fastreg.kernels import reference
    weights = iter(model.get_weights())
    out, H = {}, None
    for label, part in zip(["trunk"] + model.head_names, model._network.parts):
        x = X.astype(np.float64) if label == "trunk" else H
        for blk in part.blocks:
            W, b = next(weights).astype(np.float64), next(weights).astype(np.float64)
            z = x @ W + b
            if blk.bn is not None:
                g, be, mu, var = (next(weights).astype(np.float64) for _ in range(4))
                z = g * (z - mu) / np.sqrt(var + blk.bn.eps) + be
            d = blk.dense
            x = reference.activation(z, contract.ACTIVATIONS[d.activation], d.negative_slope)
        if label == "trunk":
            H = x
        else:
            out[label] = reference.output_transform(x, contract.LOSSES[model.losses[label]])
    return out


def test_inference_uses_running_statistics_and_no_noise():
    rng = fresh_rng()
    X, y = make_data(rng, 30)
    model = make_bn_noise_model()
    model.fit(X, y, epochs=3, batch_size=8, verbose=0)
    stats = dict(zip(model.weight_names(), model.get_weights()))
    assert np.abs(stats["trunk/batchnorm_0/moving_mean"]).max() > 1e-3   # they moved
    p = model.predict(X)
    expected = _manual_predict(model, X)
    for k in p:
        np.testing.assert_allclose(p[k], expected[k], rtol=2e-4, atol=2e-5, err_msg=k)
        np.testing.assert_array_equal(model.predict(X)[k], p[k])     # no noise: the same
    ev = model.evaluate(X, y)
    mse = float(np.mean((p["a"].astype(np.float64) - y["a"]) ** 2))
    assert ev["loss_a"] == pytest.approx(mse, rel=1e-4)
    # training runs the batch statistics, masks and noise: another value than inference's
    total, _ = objective_and_gradients(model, X, y, step=0)
    assert total != pytest.approx(ev["loss"], rel=1e-3)


def test_gamma_beta_are_trained_but_never_penalized():
    """Penalties and AdamW's decay on the kernels; the update rows of gamma/beta carry no
    penalty, decay, max-norm or group lasso, and gamma/beta are trained."""
    model = fr.MultiTask([fr.Dense(4, "tanh", regularizer=fr.L2(10.0)), fr.BatchNorm()],
                         {"a": ([fr.Dense(3, regularizer=fr.L1(1.0)), fr.BatchNorm(),
                                 fr.Dense(1)], "mse")}, input_dim=N_IN)
    model.compile(optimizer=fr.AdamW(1e-2, weight_decay=0.5), backend="numpy")
    plan = model._network.training_plan(model.optimizer, 4, [0, 1])
    from fastreg.kernels import contract
    for first, _ in model._network.part_ranges():
        assert plan.hpW[first, contract.HP_L2] > 0 or plan.hpW[first, contract.HP_L1] > 0
    for l in range(plan.n_layers):
        if plan.li[l, contract.LI_BN]:
            row = plan.hpgb[l]
            assert row[contract.HP_L1] == row[contract.HP_L2] == row[contract.HP_DECOUPLED] == 0
            assert (row[contract.HP_MAXNORM] == row[contract.HP_GROUP] == 0
                    and row[contract.HP_LR] > 0)
    rng = fresh_rng()
    X = randn(rng, (12, N_IN))
    g0 = [g.copy() for g in model._network.tensors("gb") if g.size]
    assert len(g0) == 2
    model.fit(X, {"a": randn(rng, (12, 1))}, epochs=2, batch_size=4, verbose=0)
    assert all(not np.array_equal(a, b)
               for a, b in zip([g for g in model._network.tensors("gb") if g.size], g0))   # trained


# ---------------------------------------------------------------- layer validation
PLACEMENT_ERRORS = [
    [fr.BatchNorm(), fr.Dense(2)],
    [fr.Dense(3), fr.Dropout(0.1), fr.BatchNorm(), fr.Dense(2)],
    [fr.Dense(3), fr.BatchNorm(), fr.BatchNorm(), fr.Dense(2)],
    [fr.Dense(3), fr.GaussianNoise(0.1), fr.GaussianDropout(0.2), fr.Dense(2)],
    [fr.Dense(3), fr.Dropout(0.1), fr.GaussianNoise(0.1), fr.Dense(2)],
]


@pytest.mark.parametrize("layers", PLACEMENT_ERRORS)
def test_layer_placement_errors_are_sequentials(layers):
    """The trunk and every head are validated by Sequential's own checks: the same message,
    prefixed with the part."""
    with pytest.raises(ValueError) as seq:
        fr.Sequential(layers)
    with pytest.raises(ValueError) as trunk:
        fr.MultiTask(layers, {"a": ([fr.Dense(1)], "mse")})
    assert str(trunk.value) == f"the trunk: {seq.value}"
    with pytest.raises(ValueError) as head:
        fr.MultiTask([fr.Dense(3)], {"a": (layers, "mse")})
    assert str(head.value) == f"head 'a': {seq.value}"


def test_noise_after_batchnorm_follows_sequential():
    """Noise after a Dense with BatchNorm: refused by both with the same message while
    Sequential refuses it, else the one-head MultiTask trains as the Sequential."""
    trunk = [fr.Dense(5, "tanh"), fr.BatchNorm(), fr.GaussianNoise(0.2)]
    head = [fr.Dense(2)]
    try:
        seq = fr.Sequential(trunk + head, input_dim=N_IN, seed=1)
    except ValueError as exc:
        with pytest.raises(ValueError) as mt:
            fr.MultiTask(trunk, {"y": (head, "mse")}, input_dim=N_IN, seed=1)
        assert str(mt.value) == f"the trunk: {exc}"
        return
    mt = fr.MultiTask(trunk, {"y": (head, "mse")}, input_dim=N_IN, seed=1)
    rng = fresh_rng()
    X, y = randn(rng, (20, N_IN)), randn(rng, (20, 2))
    seq.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numpy")
    mt.compile(optimizer=fr.Adam(1e-2), backend="numpy")
    hs = seq.fit(X, y, epochs=2, batch_size=8, verbose=0)
    hm = mt.fit(X, {"y": y}, epochs=2, batch_size=8, verbose=0)
    assert hm.history["loss"] == hs.history["loss"]
    for a, b in zip(mt.get_weights(), seq.get_weights()):
        np.testing.assert_array_equal(a, b)
    for backend in ("numba", "cython"):     # the compiled per-op kernels follow numpy
        if not available(backend):
            continue
        other = fr.MultiTask(trunk, {"y": (head, "mse")}, input_dim=N_IN, seed=1)
        other.compile(optimizer=fr.Adam(1e-2), backend=backend)
        ho = other.fit(X, {"y": y}, epochs=2, batch_size=8, verbose=0)
        np.testing.assert_allclose(ho.history["loss"], hm.history["loss"], rtol=1e-4)
        for a, b in zip(other.get_weights(), mt.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_batchnorm_and_noise_in_summary_names_and_counts():
    model = make_bn_noise_model()
    names = model.weight_names()
    assert names[:8] == ["trunk/dense_0/W", "trunk/dense_0/b", "trunk/batchnorm_0/gamma",
                         "trunk/batchnorm_0/beta", "trunk/batchnorm_0/moving_mean",
                         "trunk/batchnorm_0/moving_variance", "trunk/dense_1/W",
                         "trunk/dense_1/b"]
    assert "c/batchnorm_0/moving_variance" in names and len(names) == len(model.get_weights())
    assert model.count_params() == sum(w.size for w in model.get_weights())
    text = model.summary()
    assert "batchnorm(momentum=0.9" in text and "GaussianDropout(0.25)" in text
    assert "head 'b'" in text and "input noise GaussianNoise(0.3)" in text
    with pytest.raises(ValueError, match=r"trunk/batchnorm_0/gamma"):
        w = model.get_weights()
        w[2] = np.ones(7)
        model.set_weights(w)


# ================================================================ MC dropout
def test_mc_predict_shapes_determinism_and_spread():
    rng = fresh_rng()
    X, y = make_data(rng, 13)
    model = make_bn_noise_model()
    model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    out = model.predict(X, mc_samples=6, seed=3)
    assert list(out) == ["a", "b", "c"]
    for k, K in (("a", 2), ("b", 3), ("c", 2)):
        mean, std = out[k]
        assert mean.shape == std.shape == (13, K) and mean.dtype == np.float32
        assert (std > 0).any() and (std >= 0).all()
    np.testing.assert_allclose(out["b"][0].sum(axis=1), 1.0, rtol=1e-5)   # probabilities
    again = model.predict(X, mc_samples=6, seed=3)
    other = model.predict(X, mc_samples=6, seed=4)
    for k in out:
        for a, b in zip(out[k], again[k]):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(out[k][0], other[k][0])
    # seed=None: the model's counter, advanced by the passes drawn; fresh masks each call
    assert model._network.counters.mc_step == 0
    first = model.predict(X, mc_samples=6)
    assert model._network.counters.mc_step == 1
    second = model.predict(X, mc_samples=6)
    assert model._network.counters.mc_step == 2
    assert not np.array_equal(first["a"][0], second["a"][0])
    # a row's samples do not depend on the other rows of X
    part = model.predict(X[:4], mc_samples=6, seed=3)
    for k in out:
        np.testing.assert_array_equal(part[k][0], out[k][0][:4])
    # one sample is one pass with dropout and noise on: std exactly 0, mean != predict
    one = model.predict(X, mc_samples=1, seed=0)
    assert not one["a"][1].any() and not np.allclose(one["a"][0], model.predict(X)["a"])


def test_mc_without_dropout_or_noise_has_zero_std():
    rng = fresh_rng()
    X, y = make_data(rng, 9)
    model = fr.MultiTask([fr.Dense(6, "tanh"), fr.BatchNorm()],
                         {"a": ([fr.Dense(2)], "mse"),
                          "b": ([fr.Dense(3)], "sparse_categorical_crossentropy")},
                         input_dim=N_IN)
    model.compile(optimizer=fr.Adam(1e-2), backend="numpy")
    model.fit(X, {"a": y["a"], "b": y["b"]}, epochs=2, batch_size=4, verbose=0)
    out = model.predict(X, mc_samples=5, seed=0)
    p = model.predict(X)
    for k in ("a", "b"):
        assert not out[k][1].any()
        np.testing.assert_array_equal(out[k][0], p[k])
    assert (model.predict(X, mc_samples=5)["a"][1].max() == 0
            and model._network.counters.mc_step == 0)


def test_mc_heads_share_the_trunks_masks_within_a_sample():
    """Two identical heads without dropout of their own on a trunk with dropout: a sample's
    trunk masks are the same for both, so their MC means and stds are equal; a head with
    its own dropout on top differs."""
    rng = fresh_rng()
    trunk = [fr.Dropout(0.2), fr.Dense(8, "tanh", dropout=0.3), fr.GaussianNoise(0.1)]
    head = ([fr.Dense(4, "tanh"), fr.Dense(2)], "mse")
    model = fr.MultiTask(trunk, {"p": head, "q": head,
                                 "r": ([fr.Dropout(0.3), fr.Dense(4, "tanh"), fr.Dense(2)],
                                       "mse")},
                         input_dim=N_IN, seed=2)
    w = model.get_weights()
    model.set_weights(w[:2] + w[2:6] + w[2:6] + w[2:6])
    X = randn(rng, (7, N_IN))
    out = model.predict(X, mc_samples=9, seed=5)
    np.testing.assert_array_equal(out["p"][0], out["q"][0])
    np.testing.assert_array_equal(out["p"][1], out["q"][1])
    assert (out["p"][1] > 0).all()
    assert not np.array_equal(out["p"][1], out["r"][1])


def test_mc_runs_in_batched_passes(monkeypatch):
    """The samples of all rows run in stacked passes of mc.mc_rows_per_pass(n) rows: one
    call per Dense layer and pass, never one per sample."""
    from fastreg.kernels import reference
    calls = []
    real = reference.dense_forward

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)
    model = make_bn_noise_model()
    n_dense = len(model._network.kernels())
    X = randn(fresh_rng(), (10, N_IN))
    monkeypatch.setattr(reference, "dense_forward", spy)
    model.predict(X, mc_samples=4, seed=0)
    assert calls == [40] * n_dense                          # 1 pass of 10 x 4 rows
    calls.clear()
    n = 5000                                                # 1 row per pass: 3 passes
    assert mc.mc_rows_per_pass(n) == 1
    model.predict(X[:3], mc_samples=n, seed=0)
    assert calls == [n] * (3 * n_dense)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_mc_samples_rejected(bad):
    model = make_model()
    with pytest.raises(ValueError, match="mc_samples"):
        model.predict(np.ones((2, N_IN)), mc_samples=bad)
    with pytest.raises(ValueError, match="seed only applies"):
        model.predict(np.ones((2, N_IN)), seed=1)


# ================================================================ prune
def _dead_multitask(backend="numpy"):
    """Dead units put in by hand: trunk layer 0 units 1, 4; the trunk's last layer units 0, 3
    (constant sigmoid(b) folded into every head: a's bias, b's running mean, c's bias);
    head a's unit 2, whose only inputs are the dead trunk units 0 and 3 (found after their
    removal); head b's BatchNorm unit 1 (its folded constant goes to b's next bias)."""
    rng = fresh_rng()
    model = fr.MultiTask([fr.Dense(8, "tanh", dropout=0.1), fr.Dense(6, "sigmoid")],
                         {"a": ([fr.Dense(5, "tanh"), fr.Dense(2)], "mse"),
                          "b": ([fr.Dense(4, "relu"), fr.BatchNorm(), fr.Dense(3)],
                                "sparse_categorical_crossentropy"),
                          "c": ([fr.Dropout(0.2), fr.Dense(2)], "binary_crossentropy")},
                         input_dim=N_IN, seed=0)
    randomize(model, rng)
    w = dict(zip(model.weight_names(), model.get_weights()))
    w["trunk/dense_0/W"][:, [1, 4]] = 0
    w["trunk/dense_1/W"][:, [0, 3]] = 0
    w["a/dense_0/W"][[1, 2, 4, 5], 2] = 0
    w["b/dense_0/W"][:, 1] = 0
    model.set_weights(list(w.values()))
    model.compile(optimizer=fr.Adam(1e-2), backend=backend)
    return model


def test_prune_keeps_predictions_and_reports():
    rng = fresh_rng()
    X = randn(rng, (32, N_IN))
    model = _dead_multitask()
    before = model.predict(X)
    report = model.prune()
    assert report.parts["trunk"].removed == [2, 2]
    assert report.parts["a"].removed == [1, 0] and 2 not in report.parts["a"].kept[0]
    assert report.parts["b"].removed == [1, 0] and report.parts["c"].removed == [0]
    assert report.removed == [2, 2, 1, 0, 1, 0, 0] and report.total_removed == 6
    assert list(report.parts["trunk"].kept[1]) == [1, 2, 4, 5]
    assert report.params_before > report.params_after == model.count_params()
    assert "trunk: 8->6, 6->4" in str(report)
    assert model.trunk_width == 4 and [la.units for la in model.trunk_layers
                                       if isinstance(la, fr.Dense)] == [6, 4]
    kernels = model._network.kernels()
    for first, _ in model._network.part_ranges()[1:]:
        assert kernels[first].shape[0] == 4         # every head reads the pruned trunk
    assert "dense_0: 4->" in model.summary()
    after = model.predict(X)
    for k in before:
        np.testing.assert_allclose(after[k], before[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert model.prune().total_removed == 0            # nothing left to remove


def test_prune_keeps_a_trunk_unit_a_head_cannot_take():
    """The trunk's dead unit 1 outputs tanh(0.5) != 0 and head b has no bias to fold it
    into: it stays; dead unit 2 outputs tanh(0) = 0 and goes."""
    model = fr.MultiTask([fr.Dense(4, "tanh")],
                         {"a": ([fr.Dense(2)], "mse"),
                          "b": ([fr.Dense(2, use_bias=False)], "mse")}, input_dim=N_IN)
    w = model.get_weights()
    w[0][:, [1, 2]] = 0
    w[1][...] = [0.3, 0.5, 0.0, -0.2]
    model.set_weights(w)
    X = randn(fresh_rng(), (10, N_IN))
    before = model.predict(X)
    report = model.prune()
    assert report.parts["trunk"].removed == [1]
    assert list(report.parts["trunk"].kept[0]) == [0, 1, 3]
    for k in before:
        np.testing.assert_allclose(model.predict(X)[k], before[k], rtol=1e-5, atol=1e-6)


def test_group_lasso_prune_then_fit_save_and_load(tmp_path):
    rng = fresh_rng()
    X, y = make_data(rng, 96)
    y = {"a": y["a"], "b": y["b"]}
    gl = fr.GroupLasso(0.1)
    model = fr.MultiTask([fr.Dense(16, "relu", regularizer=gl), fr.BatchNorm(),
                          fr.Dense(12, "tanh", regularizer=gl)],
                         {"a": ([fr.Dense(8, "tanh", regularizer=gl), fr.Dense(2)], "mse"),
                          "b": ([fr.Dropout(0.1), fr.Dense(3)],
                                "sparse_categorical_crossentropy", 0.5)},
                         input_dim=N_IN, seed=0)
    model.compile(optimizer=fr.Adam(1e-2), backend="numba")
    model.fit(X, y, epochs=15, batch_size=32, verbose=0)
    dead = [int((~W.any(axis=0)).sum()) for W in model._network.kernels()]
    assert dead[0] + dead[1] > 0                      # whole trunk units at exact zero
    before = model.predict(X)
    mW = [m.copy() for m in model._network.moments("m", "W")]
    t = model._network.counters.t
    report = model.prune()
    assert report.parts["trunk"].removed == [min(dead[0], 15), min(dead[1], 11)]
    for k in before:
        np.testing.assert_allclose(model.predict(X)[k], before[k], rtol=1e-5, atol=1e-6)
    # the moments shrank with the weights: the trunk's last columns, every head's first rows
    keep = report.parts["trunk"].kept
    np.testing.assert_array_equal(model._network.moments("m", "W")[1], mW[1][keep[0]][:, keep[1]])
    np.testing.assert_array_equal(model._network.moments("m", "W")[4], mW[4][keep[1]])
    net = model._network
    for kind, which in (("W", "m"), ("W", "v"), ("b", "v"), ("gb", "m")):
        assert [a.shape for a in net.tensors(kind)] == [m.shape for m in
                                                        net.moments(which, kind)]
    h = model.fit(X, y, epochs=2, batch_size=32, verbose=0)
    assert np.isfinite(h.history["loss"]).all() and model._network.counters.t == t + 6
    path = tmp_path / "pruned.npz"
    model.save(path)
    loaded = fr.load_model(path)
    assert loaded.trunk_width == model.trunk_width
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    p0, p1 = model.predict(X, mc_samples=3, seed=0), loaded.predict(X, mc_samples=3, seed=0)
    for k in p0:
        np.testing.assert_array_equal(p0[k][0], p1[k][0])


def test_prune_needs_a_built_model():
    model = fr.MultiTask([fr.Dense(3)], {"a": ([fr.Dense(1)], "mse")})
    with pytest.raises(ValueError, match="no weights yet"):
        model.prune()


# ================================================================ augmentation
def test_augment_trunk_inputs_and_mixed_targets_are_sequentials(monkeypatch):
    """The trunk's first layer sees exactly the batches augment.apply (what Sequential.fit
    trains on) makes of the epoch's shuffled rows, at the model's step; every head trains on
    its targets as apply mixes them for its loss, and Mixup mixes every head with the same
    partner and lambda: a sparse head's (label, partner's label, lam) rows explain the mse
    head's mixed row ids."""
    from fastreg.kernels import reference
    rng = fresh_rng()
    n, batch, seed = 21, 8, 6
    X = randn(rng, (n, N_IN))
    ids = np.arange(n)
    y = {"a": randn(rng, (n, 2)), "m": ids.astype(np.float32), "c": rng.random((n, 2)),
         "s": ids}
    losses = {"a": "mse", "m": "mse", "c": "binary_crossentropy",
              "s": "sparse_categorical_crossentropy"}
    model = fr.MultiTask([fr.Dense(6, "tanh"), fr.BatchNorm()],
                         {"a": ([fr.Dense(2)], "mse"), "m": ([fr.Dense(1)], "mse", 0.5),
                          "c": ([fr.Dense(2)], "binary_crossentropy"),
                          "s": ([fr.Dense(n)], "sparse_categorical_crossentropy", 0.2)},
                         input_dim=N_IN, seed=seed)
    model.compile(optimizer=fr.Adam(1e-2), backend="numpy")
    augs = [fr.GaussianJitter(0.1), fr.Mixup(0.4)]
    xs, ys = [], []
    real_dense, real_loss = reference.bn_dense_forward, reference.loss_forward_backward

    def dense_spy(x, W, *args, **kwargs):     # the trunk's first layer: a BatchNorm Dense
        if W.shape[0] == N_IN:
            xs.append(x.copy())
        return real_dense(x, W, *args, **kwargs)

    def loss_spy(logits, yb, *args, **kwargs):
        ys.append(yb.copy())
        return real_loss(logits, yb, *args, **kwargs)
    monkeypatch.setattr(reference, "bn_dense_forward", dense_spy)
    monkeypatch.setattr(reference, "loss_forward_backward", loss_spy)
    h = model.fit(X, y, epochs=2, batch_size=batch, verbose=0, augment=augs)
    monkeypatch.undo()
    assert np.isfinite(h.history["loss"]).all()
    steps = -(-n // batch)
    heads = model.head_names
    for e in range(2):
        perm = np.random.default_rng([seed, e]).permutation(n)
        Xe = fr.augment.apply(augs, X[perm], batch_size=batch, seed=seed, step=e * steps)
        np.testing.assert_array_equal(np.concatenate(xs[e * steps:(e + 1) * steps]), Xe)
        got = ys[len(heads) * e * steps:len(heads) * (e + 1) * steps]
        seen = {}
        for k, head in enumerate(heads):
            seen[head] = np.concatenate(got[k::len(heads)])
            Yh = np.asarray(y[head], np.float32).reshape(n, -1)[perm]
            _, want = fr.augment.apply(augs, X[perm], Yh, batch_size=batch, seed=seed,
                                       step=e * steps, loss=losses[head])
            np.testing.assert_array_equal(seen[head], want.reshape(seen[head].shape))
        from fastreg.kernels import contract
        s = seen["s"].astype(np.float64)
        assert s.shape == (n, contract.SCE_MIXED_WIDTH)
        np.testing.assert_array_equal(s[:, contract.SCE_LABEL], perm)
        lam = s[:, contract.SCE_LAM]
        assert ((lam > 0) & (lam < 1)).all() and (s[:, contract.SCE_LABEL_B] != perm).any()
        np.testing.assert_allclose(seen["m"][:, 0], lam * s[:, contract.SCE_LABEL]
                                   + (1 - lam) * s[:, contract.SCE_LABEL_B], rtol=1e-5, atol=1e-4)


def test_augment_is_deterministic_and_changes_training():
    rng = fresh_rng()
    X = rng.random((24, 12)).astype(np.float32)       # 2 x 3 images, 2 channels
    y = {"a": randn(rng, (24, 1)), "b": rng.integers(0, 3, 24)}
    runs = []
    for augment in ([fr.RandomFlip(), fr.RandomShift(1), fr.GaussianJitter(0.05)],) * 2 \
            + (None,):
        model = fr.MultiTask([fr.Dense(6, "relu")],
                             {"a": ([fr.Dense(1)], "mse"),
                              "b": ([fr.Dense(3)], "sparse_categorical_crossentropy")},
                             input_dim=12, seed=1)
        model.compile(optimizer=fr.Adam(1e-2), backend="numpy")
        h = model.fit(X, y, epochs=2, batch_size=8, verbose=0, augment=augment,
                      image_shape=(2, 3, 2))
        runs.append((h.history, model.get_weights()))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][0]["loss"] != runs[2][0]["loss"]


def test_augment_errors_are_clear_and_leave_the_model_untouched():
    rng = fresh_rng()
    X, y = make_data(rng, 12)
    model = make_model()
    model.fit(X, y, epochs=1, batch_size=4, verbose=0)
    before, step = model.get_weights(), model._network.counters.step
    with pytest.raises(ValueError, match=r"^head 'b' \(sparse_categorical_crossentropy\): "
                                         r"at most one Mixup"):
        model.fit(X, y, epochs=1, verbose=0, augment=[fr.Mixup(0.2), fr.Mixup(0.3)])
    with pytest.raises(ValueError, match="image_shape"):
        model.fit(X, y, epochs=1, verbose=0, augment=[fr.RandomFlip()])
    with pytest.raises(ValueError, match="holds H\\*W\\*C = 6"):
        model.fit(X, y, epochs=1, verbose=0, augment=[fr.RandomFlip()], image_shape=(2, 3))
    with pytest.raises(TypeError, match="augmenters"):
        model.fit(X, y, epochs=1, verbose=0, augment=["flip"])
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert model._network.counters.step == step


# ================================================================ persistence
def test_save_load_with_batchnorm_noise_and_mc_counter(tmp_path):
    rng = fresh_rng()
    X, y = make_data(rng, 20)
    model = make_bn_noise_model(seed=5)
    model.fit(X, y, epochs=2, batch_size=8, verbose=0)
    model.predict(X, mc_samples=4)                    # advances the MC counter
    path = tmp_path / "bn.npz"
    model.save(path)
    loaded = fr.load_model(path)
    assert loaded.get_config() == model.get_config() and loaded._network.counters.mc_step == 1
    assert loaded.weight_names() == model.weight_names()
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded._network.moments("m", "gb"), model._network.moments("m", "gb")):
        np.testing.assert_array_equal(a, b)
    p0, p1 = model.predict(X), loaded.predict(X)
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k])
    m0, m1 = model.predict(X, mc_samples=4), loaded.predict(X, mc_samples=4)
    for k in m0:
        np.testing.assert_array_equal(m0[k][1], m1[k][1])
    h0 = model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    h1 = loaded.fit(X, y, epochs=1, batch_size=8, verbose=0)
    assert h0.history == h1.history
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
