"""The training vocabulary inside fit: per-step learning-rate schedules (every backend, and
PyTorch's schedulers from copied weights), a rate assigned from a callback, the callbacks
API (ReduceLROnPlateau, LearningRateScheduler, CSVLogger, TerminateOnNaN, LambdaCallback,
duck-typed objects, batch hooks), compiled metrics, Keras' spellings, validation_split and
the initializers."""
import csv
import math

import numpy as np
import pytest

import fastreg as fr
from fastreg import schedules

from netutil import fresh_rng, randn

BACKENDS = ["numpy", "numba", "cython", "cuda"]


def _backend_or_skip(name):
    try:
        fr.backend.resolve(name)
    except fr.BackendUnavailable as exc:
        pytest.skip(str(exc))
    return name


def _data(n=96, d=5):
    rng = fresh_rng()
    X = randn(rng, (n, d))
    y = (X @ randn(rng, (d,))).astype(np.float32)
    return X, y


def _model(optimizer, backend="numba", seed=1, **dense):
    m = fr.Sequential([fr.Dense(12, "tanh", regularizer=fr.L2(1e-3), **dense), fr.Dense(1)],
                      input_dim=5, seed=seed)
    m.compile(loss="mse", optimizer=optimizer, backend=backend)
    return m


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _torch_twin(torch, model):
    """torch's Linear-Tanh-Linear with a two-Dense fastreg model's weights (fan_in, fan_out)."""
    W0, b0, W1, b1 = model.get_weights()
    net = torch.nn.Sequential(torch.nn.Linear(*W0.shape), torch.nn.Tanh(),
                              torch.nn.Linear(*W1.shape))
    with torch.no_grad():
        for lin, W, b in ((net[0], W0, b0), (net[2], W1, b1)):
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
    return net


def _torch_weights(net):
    """A _torch_twin's weights in fastreg's layout, to compare with get_weights()."""
    return [net[0].weight.detach().numpy().T, net[0].bias.detach().numpy(),
            net[2].weight.detach().numpy().T, net[2].bias.detach().numpy()]


# ---------------------------------------------------------------- schedules, per step
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_schedule_changes_the_rate_every_step_on_every_backend(backend):
    """A schedule is evaluated per step inside the compiled epoch: the same as 12 fits of one
    step each at that step's rate (SGD without momentum: the step is lr * gradient), and the
    same on every backend as on the reference."""
    _backend_or_skip(backend)
    X, y = _data()
    sched = schedules.ExponentialDecay(0.2, decay_steps=2, decay_rate=0.5)
    one = _model(fr.SGD(learning_rate=sched), backend)
    one.fit(X, y, epochs=2, batch_size=16, shuffle=False, verbose=0)   # 12 steps in 2 calls
    manual = _model(fr.SGD(0.2), "numpy")
    for step in range(12):
        manual.optimizer.learning_rate = sched(step)
        rows = slice((step % 6) * 16, (step % 6 + 1) * 16)
        manual.fit(X[rows], y[rows], epochs=1, batch_size=16, shuffle=False, verbose=0)
    assert _max_diff(one.get_weights(), manual.get_weights()) < 1e-5
    constant = _model(fr.SGD(0.2), backend)
    constant.fit(X, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    assert _max_diff(one.get_weights(), constant.get_weights()) > 1e-3     # it did decay


@pytest.mark.parametrize("name", ["ExponentialLR", "StepLR", "CosineAnnealingLR"])
def test_schedules_follow_torch_schedulers_from_copied_weights(name):
    torch = pytest.importorskip("torch")
    X, y = _data(n=64)
    steps = 16
    if name == "ExponentialLR":
        sched = schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.8)
        make = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    elif name == "StepLR":
        sched = schedules.ExponentialDecay(0.05, decay_steps=5, decay_rate=0.5, staircase=True)
        make = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    else:
        sched = schedules.CosineDecay(0.05, decay_steps=steps, alpha=0.0)
        make = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model = fr.Sequential([fr.Dense(12, "tanh"), fr.Dense(1)], input_dim=5, seed=3)
    model.compile(loss="mse", optimizer=fr.Adam(learning_rate=sched), backend="numba")
    net = _torch_twin(torch, model)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    scheduler = make(opt)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.reshape(-1, 1))
    for s in range(steps):
        rows = slice((s % 4) * 16, (s % 4 + 1) * 16)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(Xt[rows]), yt[rows]).backward()
        opt.step()
        scheduler.step()        # per step, as fastreg's schedule
    model.fit(X, y, epochs=steps // 4, batch_size=16, shuffle=False, verbose=0)
    ours = model.get_weights()
    theirs = _torch_weights(net)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_a_rate_assigned_in_a_callback_applies_from_the_next_step():
    X, y = _data()

    class Freeze(fr.Callback):      # after the first chunk: a rate too small to move anything
        def on_train_batch_end(self, batch, logs=None):
            self.model.optimizer.learning_rate = 1e-30

    m = _model(fr.SGD(0.1))
    m.fit(X, y, epochs=1, batch_size=96, verbose=0)     # one step at 0.1
    after_one = m.get_weights()
    m.fit(X, y, epochs=3, batch_size=96, verbose=0, callbacks=[Freeze()])
    moved = _max_diff(after_one, m.get_weights())
    assert moved > 1e-4             # the first step of this fit ran at 0.1 ...
    frozen = m.get_weights()
    m.fit(X, y, epochs=2, batch_size=96, verbose=0)     # ... and the rate stays assigned
    assert m.optimizer.learning_rate == 1e-30
    assert _max_diff(frozen, m.get_weights()) < 1e-12
    with pytest.raises(ValueError, match="learning_rate"):
        m.optimizer.learning_rate = -1.0
    with pytest.raises(TypeError, match="LearningRateScheduler"):
        m.optimizer.learning_rate = lambda step: 0.1


def test_learning_rate_and_lr_are_one_argument():
    X, y = _data()
    a, b = _model(fr.Adam(learning_rate=3e-3)), _model(fr.Adam(lr=3e-3))
    for m in (a, b):
        m.fit(X, y, epochs=2, batch_size=16, verbose=0)
    assert _max_diff(a.get_weights(), b.get_weights()) == 0.0
    assert a.optimizer.lr == a.optimizer.learning_rate == 3e-3
    with pytest.raises(ValueError, match="not both"):
        fr.SGD(learning_rate=0.1, lr=0.1)


def test_a_schedule_is_saved_and_continues_after_loading(tmp_path):
    X, y = _data()
    sched = schedules.CosineDecay(0.05, decay_steps=30, warmup_target=0.1, warmup_steps=5)
    m = _model(fr.Adam(learning_rate=sched))
    m.fit(X, y, epochs=2, batch_size=16, verbose=0)
    m.save(tmp_path / "m.npz")
    loaded = fr.load_model(tmp_path / "m.npz")
    assert loaded.optimizer.learning_rate == sched
    m.fit(X, y, epochs=2, batch_size=16, verbose=0)
    loaded.fit(X, y, epochs=2, batch_size=16, verbose=0)
    assert _max_diff(m.get_weights(), loaded.get_weights()) == 0.0


# ---------------------------------------------------------------- learning-rate callbacks
class _Holder:
    """A model stand-in for driving a callback with given logs."""

    def __init__(self, lr):
        self.optimizer = fr.SGD(lr)
        self.stop_training = False


def _keras_reduce_lr(values, lr, factor, patience, min_delta, cooldown, min_lr):
    """Keras 3's ReduceLROnPlateau.on_epoch_end (mode min), transcribed."""
    best, wait, cool, out = math.inf, 0, 0, []
    for v in values:
        out.append(lr)
        if cool > 0:
            cool -= 1
            wait = 0
        if v < best - min_delta:
            best, wait = v, 0
        elif not cool > 0:
            wait += 1
            if wait >= patience and lr > min_lr:
                lr, cool, wait = max(lr * factor, min_lr), cooldown, 0
    return out


def test_reduce_lr_on_plateau_follows_keras_rule():
    values = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    for patience, cooldown, min_lr in ((1, 0, 0.0), (2, 1, 0.0), (1, 2, 0.02)):
        cb = fr.ReduceLROnPlateau(factor=0.5, patience=patience, min_delta=0.01,
                                  cooldown=cooldown, min_lr=min_lr)
        cb.set_model(_Holder(0.1))
        cb.on_train_begin({})
        seen = []
        for epoch, v in enumerate(values):
            logs = {"val_loss": v}
            cb.on_epoch_end(epoch, logs)
            seen.append(logs["learning_rate"])
        assert seen == pytest.approx(_keras_reduce_lr(values, 0.1, 0.5, patience, 0.01,
                                                      cooldown, min_lr))
    with pytest.raises(ValueError, match="factor"):
        fr.ReduceLROnPlateau(factor=1.0)


def test_auto_mode_knows_which_metrics_grow():
    es = fr.EarlyStopping("val_auc", patience=0, restore_best_weights=False)
    es.set_model(_Holder(0.1))
    es.on_train_begin({})
    for epoch, v in enumerate([0.6, 0.7, 0.8]):    # improving: no stop
        es.on_epoch_end(epoch, {"val_auc": v})
    assert not es.model.stop_training
    es.on_epoch_end(3, {"val_auc": 0.75})
    assert es.model.stop_training


def test_reduce_lr_on_plateau_in_a_fit_lowers_the_rate_and_logs_it():
    X, y = _data()
    m = _model(fr.Adam(1e-2))
    h = m.fit(X, y, epochs=4, batch_size=16, verbose=0, validation_data=(X, y),
              callbacks=[fr.ReduceLROnPlateau(patience=0, factor=0.5, min_delta=100.0)])
    assert h.history["learning_rate"] == [0.01, 0.01, 0.005, 0.0025]
    assert m.optimizer.learning_rate == 0.00125
    with pytest.raises(ValueError, match="does not report"):
        m.fit(X, y, epochs=1, verbose=0, callbacks=[fr.ReduceLROnPlateau()])


def test_learning_rate_scheduler_sets_each_epochs_rate():
    X, y = _data()
    m = _model(fr.SGD(0.1))
    h = m.fit(X, y, epochs=3, batch_size=16, verbose=0,
              callbacks=[fr.LearningRateScheduler(lambda epoch, lr: lr * 0.5)])
    assert h.history["learning_rate"] == [0.05, 0.025, 0.0125]
    one = _model(fr.SGD(0.1))
    h1 = one.fit(X, y, epochs=2, verbose=0,
                 callbacks=[fr.LearningRateScheduler(lambda epoch: 0.01 * (epoch + 1))])
    assert h1.history["learning_rate"] == [0.01, 0.02]
    sched = _model(fr.SGD(learning_rate=schedules.ExponentialDecay(0.1, 10, 0.5)))
    with pytest.raises(TypeError, match="schedule"):
        sched.fit(X, y, epochs=1, verbose=0,
                  callbacks=[fr.LearningRateScheduler(lambda epoch, lr: 0.1)])
    with pytest.raises(ValueError, match="finite number > 0"):
        _model(fr.SGD(0.1)).fit(X, y, epochs=1, verbose=0,
                                callbacks=[fr.LearningRateScheduler(lambda e, lr: -1.0)])


# ---------------------------------------------------------------- the other callbacks
def test_csv_logger_writes_one_row_per_epoch_and_appends(tmp_path):
    X, y = _data()
    path = tmp_path / "log.csv"
    m = _model(fr.Adam(1e-2))
    h = m.fit(X, y, epochs=3, verbose=0, validation_data=(X, y),
              callbacks=[fr.CSVLogger(path)])
    rows = list(csv.DictReader(open(path)))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert set(rows[0]) == {"epoch", "loss", "penalty", "val_loss"}
    assert [float(r["val_loss"]) for r in rows] == pytest.approx(h.history["val_loss"])
    m.fit(X, y, epochs=2, verbose=0, validation_data=(X, y),
          callbacks=[fr.CSVLogger(path, append=True)])
    assert len(list(csv.DictReader(open(path)))) == 5     # no second header


def test_terminate_on_nan_stops_on_a_nan_validation_value():
    X, y = _data()

    def broken(y_true, y_pred):     # a metric that turns NaN (training and validation)
        return float("nan")

    m = _model(fr.Adam(1e-2))
    m.compile(loss="mse", optimizer=fr.Adam(1e-2), metrics=[broken])
    cb = fr.TerminateOnNaN()
    h = m.fit(X, y, epochs=5, verbose=0, validation_data=(X, y), callbacks=[cb])
    assert len(h.history["loss"]) == 1 and "broken was nan" in cb.report


def test_hooks_lambda_callback_and_duck_typed_objects():
    X, y = _data()
    calls = []

    class Plain:        # not a fr.Callback: its methods are called, the rest do nothing
        def on_epoch_begin(self, epoch, logs=None):
            calls.append(("begin", epoch))

    lam = fr.LambdaCallback(on_train_batch_end=lambda b, logs: calls.append(("batch", b)),
                            on_epoch_end=lambda e, logs: calls.append(("end", e)))
    m = _model(fr.Adam(1e-2))
    m.fit(X, y, epochs=2, batch_size=16, verbose=0, callbacks=[Plain(), lam])
    ends = [c for c in calls if c[0] == "end"]
    assert [c for c in calls if c[0] == "begin"] == [("begin", 0), ("begin", 1)]
    assert ends == [("end", 0), ("end", 1)]
    batches = [b for kind, b in calls if kind == "batch"]
    assert batches and batches[-1] == 5 and batches == sorted(batches[:len(batches) // 2]) * 2
    with pytest.raises(TypeError, match="hook methods"):
        m.fit(X, y, epochs=1, verbose=0, callbacks=[object()])
    with pytest.raises(TypeError, match="single"):
        m.fit(X, y, epochs=1, verbose=0, callbacks=Plain())


def test_stop_training_in_a_batch_hook_ends_the_epoch_after_that_chunk():
    X, y = _data(n=128)

    class StopAfterFirst(fr.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.batch = batch
            self.model.stop_training = True

    # a net large enough that a chunk is a few of the 8 batches (training.CHUNK_MACS)
    m = fr.Sequential([fr.Dense(1024, "tanh"), fr.Dense(1024, "tanh"), fr.Dense(1)],
                      input_dim=5, seed=0)
    m.compile(loss="mse", optimizer=fr.Adam(1e-3), backend="numba")
    cb = StopAfterFirst()
    h = m.fit(X, y, epochs=3, batch_size=16, verbose=0, callbacks=[cb])
    assert len(h.history["loss"]) == 1
    assert m._network.counters.step == cb.batch + 1 < 128 // 16     # a part of the epoch


# ---------------------------------------------------------------- metrics
def test_metrics_are_reported_equal_to_scikit_learn_and_monitorable():
    sk = pytest.importorskip("sklearn.metrics")
    rng = fresh_rng()
    X = randn(rng, (300, 6))
    y = ((X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 1)).astype(int)
    m = fr.Sequential([fr.Dense(16, "relu"), fr.Dense(3)], input_dim=6, seed=0)
    m.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(1e-2),
              metrics=["accuracy", "f1", "auc"])
    es = fr.EarlyStopping("val_accuracy", patience=1)
    h = m.fit(X[:200], y[:200], epochs=4, verbose=0, validation_data=(X[200:], y[200:]),
              callbacks=[es])
    assert {"val_accuracy", "val_f1", "val_auc"} <= set(h.history)
    d = m.evaluate(X[200:], y[200:], return_dict=True)
    p = m.predict(X[200:])
    assert d["accuracy"] == pytest.approx(sk.accuracy_score(y[200:], p.argmax(1)))
    assert d["f1"] == pytest.approx(sk.f1_score(y[200:], p.argmax(1), average="macro"))
    assert d["auc"] == pytest.approx(sk.roc_auc_score(y[200:], p, multi_class="ovr"))
    assert m.evaluate(X[200:], y[200:]) == [d["loss"], d["accuracy"], d["f1"], d["auc"]]
    assert (m.predict_classes(X[200:]) == p.argmax(1)).all()
    with pytest.raises(ValueError, match="does not report"):
        m.fit(X, y, epochs=1, verbose=0, callbacks=[fr.EarlyStopping("val_accuracy")])
    with pytest.raises(ValueError, match="classification loss"):
        _model(fr.Adam()).compile(loss="mse", metrics=["accuracy"])


# ---------------------------------------------------------------- Keras' spellings
def test_keras_spellings_are_the_same_model():
    X, y = _data()
    ours = fr.Sequential([fr.Dense(12, "tanh", regularizer=fr.L2(1e-3), constraint=fr.MaxNorm(2)),
                          fr.Dense(1)], input_dim=5, seed=2)
    keras_like = fr.Sequential([fr.Dense(12, "tanh", kernel_regularizer=fr.L2(1e-3),
                                         kernel_constraint=fr.MaxNorm(2), input_shape=(5,)),
                                fr.Dense(1)], seed=2)
    assert keras_like.built and keras_like.input_dim == 5
    for m in (ours, keras_like):
        m.compile(loss="mse", optimizer=fr.Adam(learning_rate=1e-2))
        m.fit(X, y, epochs=2, verbose=0)
    assert _max_diff(ours.get_weights(), keras_like.get_weights()) == 0.0
    with pytest.raises(ValueError, match="not both"):
        fr.Dense(3, regularizer=fr.L2(1e-3), kernel_regularizer=fr.L2(1e-3))
    with pytest.raises(ValueError, match="first layer"):
        fr.Sequential([fr.Dense(3), fr.Dense(1, input_shape=(3,))])
    with pytest.raises(ValueError, match="declares"):
        fr.Sequential([fr.Dense(3, input_shape=(4,))], input_dim=5)
    with pytest.raises(ValueError, match="input_shape"):
        fr.Dense(3, input_shape=(4, 4))


def test_validation_split_holds_out_the_last_rows_before_shuffling():
    X, y = _data(n=100)
    a, b = _model(fr.Adam(1e-2)), _model(fr.Adam(1e-2))
    ha = a.fit(X, y, epochs=3, batch_size=16, verbose=0, validation_split=0.25)
    hb = b.fit(X[:75], y[:75], epochs=3, batch_size=16, verbose=0,
               validation_data=(X[75:], y[75:]))
    assert ha.history == hb.history
    assert _max_diff(a.get_weights(), b.get_weights()) == 0.0
    for bad in (1.0, -0.1, 0.001):
        with pytest.raises(ValueError, match="validation_split"):
            a.fit(X, y, epochs=1, verbose=0, validation_split=bad)


def test_initializers_follow_keras():
    m = fr.Sequential([fr.Dense(16, kernel_initializer="orthogonal", bias_initializer="ones"),
                       fr.Dense(4, kernel_initializer="orthogonal"),
                       fr.Dense(2, kernel_initializer="zeros"),
                       fr.Dense(1, kernel_initializer="ones", use_bias=False)],
                      input_dim=8, seed=0)
    W0, b0, W1, b1, W2, b2, W3 = m.get_weights()[:7]
    np.testing.assert_allclose(W0 @ W0.T, np.eye(8), atol=1e-6)    # 8 x 16: orthonormal rows
    np.testing.assert_allclose(W1.T @ W1, np.eye(4), atol=1e-6)    # 16 x 4: columns
    assert (b0 == 1).all() and (b1 == 0).all() and (W2 == 0).all() and (W3 == 1).all()
    with pytest.raises(ValueError, match="bias_initializer"):
        fr.Dense(3, bias_initializer="glorot_uniform")


# ---------------------------------------------------------------- L1 as feature selection
def _sparse_inputs_model(kind="sequential"):
    """A model trained on 6 columns of which only 0, 2 and 4 carry signal, with a proximal L1
    on the first layer strong enough to zero the rows of the others."""
    rng = fresh_rng()
    X = randn(rng, (512, 6))
    y = (X[:, 0] - 2 * X[:, 2] + X[:, 4]).astype(np.float32)
    first = fr.Dense(16, "tanh", regularizer=fr.L1(5e-2))
    if kind == "sequential":
        m = fr.Sequential([first, fr.Dense(1)], input_dim=6, seed=0)
        m.compile(loss="mse", optimizer=fr.Adam(1e-2))
        targets = y
    else:
        m = fr.MultiTask(trunk=[first], heads={"a": ([fr.Dense(1)], "mse", 1.0),
                                               "b": ([fr.Dense(1)], "mse", 1.0)},
                         input_dim=6, seed=0)
        m.compile(optimizer=fr.Adam(1e-2))
        targets = {"a": y, "b": -y}
    m.fit(X, targets, epochs=40, batch_size=64, verbose=0)
    return m, X, targets


@pytest.mark.parametrize("kind", ["sequential", "multitask"])
def test_l1_selects_features_and_prune_inputs_removes_the_dead_columns(kind, tmp_path):
    m, X, targets = _sparse_inputs_model(kind)
    sel = m.selected_features()
    W0 = m.get_weights()[0]
    assert (W0[sel.dropped] == 0).all() and W0[sel.kept].any(axis=1).all()
    assert {0, 2, 4} <= set(sel.kept.tolist()) and len(sel.dropped) >= 1
    before = m.predict(X)
    report = m.prune(inputs=True)
    assert list(report.inputs_removed) == sel.dropped.tolist()
    assert (m.input_columns == sel.kept).all() and m.input_dim == len(sel.kept)
    after = m.predict(X[:, m.input_columns])
    for a, b in (zip(before.values(), after.values()) if kind == "multitask"
                 else [(before, after)]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "input_columns" in m.summary()
    with pytest.raises(ValueError, match="kept the columns"):
        m.predict(X)                                    # the full X is refused, by name
    m.fit(X[:, m.input_columns], targets, epochs=1, verbose=0)   # training continues
    m.save(tmp_path / "m.npz")
    loaded = fr.load_model(tmp_path / "m.npz")
    assert (loaded.input_columns == m.input_columns).all()
    again = loaded.predict(X[:, loaded.input_columns])
    mine = m.predict(X[:, m.input_columns])
    for a, b in (zip(again.values(), mine.values()) if kind == "multitask"
                 else [(again, mine)]):
        np.testing.assert_array_equal(a, b)


def test_multitask_metrics_per_head(tmp_path):
    sk = pytest.importorskip("sklearn.metrics")
    rng = fresh_rng()
    X = randn(rng, (300, 4))
    ys = {"kind": (X[:, 0] > 0).astype(np.int64), "size": X[:, 1] * 2}
    m = fr.MultiTask(trunk=[fr.Dense(16, "relu")],
                     heads={"kind": ([fr.Dense(2)], "sparse_categorical_crossentropy", 1.0),
                            "size": ([fr.Dense(1)], "mse", 1.0)}, input_dim=4, seed=0)
    m.compile(optimizer=fr.Adam(1e-2), metrics={"kind": ["accuracy"], "size": ["r2"]})
    h = m.fit(X, ys, epochs=3, verbose=0, validation_split=0.25,
              callbacks=[fr.EarlyStopping("val_kind_accuracy", patience=5)])
    assert {"val_kind_accuracy", "val_size_r2"} <= set(h.history)
    d = m.evaluate(X, ys)
    p = m.predict(X)
    assert d["kind_accuracy"] == pytest.approx(sk.accuracy_score(ys["kind"],
                                                                 p["kind"].argmax(1)))
    assert d["size_r2"] == pytest.approx(sk.r2_score(ys["size"], p["size"][:, 0]))
    m.save(tmp_path / "mt.npz")
    assert fr.load_model(tmp_path / "mt.npz").evaluate(X, ys) == d
    with pytest.raises(ValueError, match="classification loss"):
        m.compile(metrics=["accuracy"])             # "size" is a regression head
    with pytest.raises(ValueError, match="unknown head"):
        m.compile(metrics={"colour": ["accuracy"]})


# ---------------------------------------------------------------- sample and class weights
def _classifier(backend="numba", seed=0):
    m = fr.Sequential([fr.Dense(16, "tanh"), fr.Dense(3)], input_dim=5, seed=seed)
    m.compile(loss="sparse_categorical_crossentropy", optimizer=fr.SGD(0.1), backend=backend)
    return m


def _labels(X):
    return ((X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 1)).astype(np.int64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_weights_follow_torch_on_every_backend(backend):
    torch = pytest.importorskip("torch")
    _backend_or_skip(backend)
    rng = fresh_rng()
    X = randn(rng, (96, 5))
    y = _labels(X)
    w = rng.uniform(0.0, 2.0, 96)
    m = _classifier(backend)
    net = _torch_twin(torch, m)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    per_row = torch.nn.CrossEntropyLoss(reduction="none")
    Xt, yt, wt = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(w.astype(np.float32))
    losses = []
    for s in range(6):
        rows = slice(s * 16, (s + 1) * 16)
        opt.zero_grad()
        loss = (per_row(net(Xt[rows]), yt[rows]) * wt[rows]).sum() / 16     # Keras' reduction
        loss.backward()
        opt.step()
        losses.append(float(loss) * 16)
    h = m.fit(X, y, epochs=1, batch_size=16, shuffle=False, verbose=0, sample_weight=w)
    theirs = _torch_weights(net)
    for a, b in zip(m.get_weights(), theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert h.history["loss"][0] == pytest.approx(sum(losses) / 96, rel=1e-5)


def test_class_weight_is_the_sample_weight_of_each_rows_class():
    rng = fresh_rng()
    X = randn(rng, (120, 5))
    y = _labels(X)
    a, b = _classifier(), _classifier()
    a.fit(X, y, epochs=2, verbose=0, class_weight={0: 3.0, 2: 0.5})
    b.fit(X, y, epochs=2, verbose=0, sample_weight=np.array([3.0, 1.0, 0.5])[y])
    assert _max_diff(a.get_weights(), b.get_weights()) == 0.0
    onehot = np.eye(3, dtype=np.float32)[y]
    c = fr.Sequential([fr.Dense(16, "tanh"), fr.Dense(3)], input_dim=5, seed=0)
    c.compile(loss="categorical_crossentropy", optimizer=fr.SGD(0.1), backend="numba")
    c.fit(X, onehot, epochs=2, verbose=0, class_weight={0: 3.0, 2: 0.5})
    assert _max_diff(a.get_weights(), c.get_weights()) < 1e-5


def test_weighted_validation_and_evaluate_agree_and_split_carries_the_weights():
    rng = fresh_rng()
    X = randn(rng, (100, 5))
    y = _labels(X)
    w = rng.uniform(0.0, 2.0, 100)
    m = _classifier()
    h = m.fit(X[:80], y[:80], epochs=1, verbose=0, sample_weight=w[:80],
              validation_data=(X[80:], y[80:], w[80:]))
    assert h.history["val_loss"][0] == pytest.approx(
        m.evaluate(X[80:], y[80:], sample_weight=w[80:]), rel=1e-6)
    p = m.predict(X[80:])
    manual = float(np.sum(w[80:] * -np.log(p[np.arange(20), y[80:]])) / 20)
    assert m.evaluate(X[80:], y[80:], sample_weight=w[80:]) == pytest.approx(manual, rel=1e-4)
    a, b = _classifier(), _classifier()
    ha = a.fit(X, y, epochs=2, verbose=0, sample_weight=w, validation_split=0.2)
    hb = b.fit(X[:80], y[:80], epochs=2, verbose=0, sample_weight=w[:80],
               validation_data=(X[80:], y[80:], w[80:]))
    assert ha.history == hb.history


def test_bad_weights_are_refused_and_the_model_is_untouched():
    rng = fresh_rng()
    X = randn(rng, (50, 5))
    y = _labels(X)
    m = _classifier()
    before = m.get_weights()
    for kwargs, match in ((dict(sample_weight=-np.ones(50)), ">= 0"),
                          (dict(sample_weight=np.ones(49)), "49 weights"),
                          (dict(sample_weight=np.full(50, np.nan)), "NaN"),
                          (dict(class_weight={3: 1.0}), "labels are 0..2"),
                          (dict(class_weight=[1.0, 2.0]), "dict")):
        with pytest.raises((ValueError, TypeError), match=match):
            m.fit(X, y, epochs=1, verbose=0, **kwargs)
    assert _max_diff(before, m.get_weights()) == 0.0
    with pytest.raises(ValueError, match="classification loss"):
        _model(fr.Adam()).fit(X, y.astype(np.float32), verbose=0, class_weight={0: 1.0})


def test_multitask_sample_weights_per_head():
    rng = fresh_rng()
    X = randn(rng, (96, 4))
    ys = {"a": X[:, 0] * 2, "b": X[:, 1] - X[:, 2]}
    w = rng.uniform(0.0, 2.0, 96)

    def make():
        m = fr.MultiTask(trunk=[fr.Dense(8, "tanh")], heads={"a": ([fr.Dense(1)], "mse", 1.0),
                                                             "b": ([fr.Dense(1)], "mse", 1.0)},
                         input_dim=4, seed=0)
        m.compile(optimizer=fr.SGD(0.05))
        return m

    weighted, zero_b = make(), make()
    h = weighted.fit(X, ys, epochs=1, batch_size=96, verbose=0, sample_weight={"a": w})
    assert h.history["loss_b"][0] > 0
    # head b weighing 0 everywhere: its head's weights never move
    zero_b.fit(X, ys, epochs=2, verbose=0, sample_weight={"b": np.zeros(96)})
    fresh = make()
    b_weights = [i for i, name in enumerate(fresh.weight_names()) if name.startswith("b")]
    assert all((zero_b.get_weights()[i] == fresh.get_weights()[i]).all() for i in b_weights)
    with pytest.raises(ValueError, match="unknown head"):
        make().fit(X, ys, verbose=0, sample_weight={"c": w})


# ---------------------------------------------------------------- gradient clipping
CLIPS = {"clipnorm": 0.05, "clipvalue": 0.01, "global_clipnorm": 0.05}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(CLIPS))
def test_clipping_follows_torch_on_every_backend(kind, backend):
    """Keras' option, torch's formulas: clip_grad_norm_ per tensor (clipnorm) or over all
    (global_clipnorm), clip_grad_value_ (clipvalue), on the data gradient before the L2
    penalty (torch's weight_decay is added in step(), after the clipping)."""
    torch = pytest.importorskip("torch")
    _backend_or_skip(backend)
    rng = fresh_rng()
    X = randn(rng, (64, 5))
    y = (X @ randn(rng, (5, 2)) * 3).astype(np.float32)
    m = fr.Sequential([fr.Dense(12, "tanh", regularizer=fr.L2(1e-2)),
                       fr.Dense(2, regularizer=fr.L2(1e-2))], input_dim=5, seed=0)
    m.compile(loss="mse", optimizer=fr.SGD(0.1, momentum=0.9, **{kind: CLIPS[kind]}),
              backend=backend)
    net = _torch_twin(torch, m)
    ws, bs = [net[0].weight, net[2].weight], [net[0].bias, net[2].bias]
    opt = torch.optim.SGD([{"params": ws, "weight_decay": 1e-2}, {"params": bs}], lr=0.1,
                          momentum=0.9)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    clipped = 0
    for s in range(8):
        rows = slice((s % 4) * 16, (s % 4 + 1) * 16)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(Xt[rows]), yt[rows]).backward()
        if kind == "clipvalue":
            clipped += sum(int((p.grad.abs() > CLIPS[kind]).any()) for p in net.parameters())
            torch.nn.utils.clip_grad_value_(net.parameters(), CLIPS[kind])
        elif kind == "global_clipnorm":
            clipped += int(torch.nn.utils.clip_grad_norm_(net.parameters(), CLIPS[kind])
                           > CLIPS[kind])
        else:
            for p in net.parameters():
                clipped += int(torch.nn.utils.clip_grad_norm_([p], CLIPS[kind]) > CLIPS[kind])
        opt.step()
    assert clipped > 0          # the clipping acted
    m.fit(X, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    theirs = _torch_weights(net)
    for a, b in zip(m.get_weights(), theirs):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_clipping_options_are_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="one of clipnorm"):
        fr.Adam(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="global_clipnorm"):
        fr.SGD(global_clipnorm=0.0)
    X, y = _data()
    m = _model(fr.AdamW(1e-2, global_clipnorm=0.5))
    m.fit(X, y, epochs=1, verbose=0)
    m.save(tmp_path / "c.npz")
    loaded = fr.load_model(tmp_path / "c.npz")
    assert loaded.optimizer.global_clipnorm == 0.5 and loaded.optimizer.clipnorm is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_metrics_are_the_running_values_of_the_epochs_steps(backend):
    """As Keras: on the logits each row had in its own training step, handed back by the
    compiled epoch (no second pass). One full batch without dropout: those are the logits of
    the model before the epoch's step."""
    sk = pytest.importorskip("sklearn.metrics")
    _backend_or_skip(backend)
    rng = fresh_rng()
    X = randn(rng, (120, 5))
    y = _labels(X)
    m = fr.Sequential([fr.Dense(16, "tanh"), fr.Dense(3)], input_dim=5, seed=0)
    m.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(1e-2), backend=backend,
              metrics=["accuracy", "auc"])
    for _ in range(2):
        before = m.predict(X)
        h = m.fit(X, y, epochs=1, batch_size=120, verbose=0)
        assert h.history["accuracy"][0] == pytest.approx(sk.accuracy_score(y, before.argmax(1)))
        assert h.history["auc"][0] == pytest.approx(
            sk.roc_auc_score(y, before, multi_class="ovr"), rel=1e-5)
    dropped = fr.Sequential([fr.Dense(16, "tanh", dropout=0.3), fr.Dense(3)], input_dim=5,
                            seed=0)
    dropped.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(1e-2),
                    backend=backend, metrics=["accuracy"])
    es = fr.EarlyStopping("accuracy", patience=1)       # monitorable without validation
    h = dropped.fit(X, y, epochs=3, batch_size=16, verbose=0, callbacks=[es])
    assert len(h.history["accuracy"]) >= 2
