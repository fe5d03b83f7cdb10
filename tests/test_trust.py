"""Trust, one test per hole class of issue 12: bad numbers, bad files, interruptions, threads
and memory (the property-based suite over the same classes: tests/test_trust_properties.py).
That the update kernels keep a NaN weight NaN is tested with the other kernels, on every
backend (tests/test_kernels.py).
"""
import _thread
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fastreg as fr
from fastreg import training
from fastreg.kernels import threads

import trust_props
from netutil import fresh_rng, randn

CPU, ALL = trust_props.CPU, trust_props.ALL


def _data(n=40, d=3, seed=None, k=1):
    rng = fresh_rng() if seed is None else np.random.default_rng(seed)
    X = randn(rng, (n, d))
    return X, randn(rng, (n, k))


def _mlp(act="relu", backend="numba", seed=0, d=3, opt=None, dtype="float32", **dense):
    model = fr.Sequential([fr.Dense(8, act, **dense), fr.Dense(1)], input_dim=d, seed=seed,
                          dtype=dtype)
    model.compile(optimizer=opt or fr.Adam(1e-2), backend=backend)
    return model


def _ops(name):
    from fastreg import backend as backends
    return backends.resolve(name)


def _counters(model):
    return model._network.counters


@pytest.fixture
def cuda_tiles(monkeypatch):
    """The CUDA tests' small tiles (tests/test_cuda.py), when the CUDA backend is here."""
    from netutil import small_cuda_tiles
    G = _ops("cuda").module if "cuda" in ALL else None
    with small_cuda_tiles(monkeypatch, G):
        yield


def _nan_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning)
            and "NaN or inf" in str(w.message)]


# ================================================================ numbers
@pytest.mark.parametrize("backend", ALL)
def test_a_nan_weight_propagates_through_every_activation(backend, cuda_tiles):
    X, _ = _data(6)
    for act in trust_props.ACTIVATIONS:
        for bn in (False, True):
            layers = [fr.Dense(5, act)] + ([fr.BatchNorm()] if bn else []) + [fr.Dense(2)]
            model = fr.Sequential(layers, input_dim=3, seed=1)
            model.compile(backend=backend)
            model._network.kernels()[0][1, 2] = np.nan   # diverged (set_weights refuses NaN)
            out = model.predict(X)
            assert np.isnan(out).all(), (backend, act, bn)


@pytest.mark.parametrize("backend", ALL)
def test_training_into_nan_warns_on_every_backend(backend, cuda_tiles):
    """The issue's example: L2(1e300) overflows in float32 and the weights become NaN; every
    backend stops with the warning and the weights from before the fit."""
    X, y = _data(16)
    model = _mlp("relu", backend, regularizer=fr.L2(1e300))
    before = model.get_weights()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        model.fit(X, y, epochs=2, batch_size=4, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert _counters(model).step == 0 and _counters(model).t == 0
    assert np.isfinite(model.evaluate(X, y))


@pytest.mark.parametrize("backend", CPU)
def test_a_last_step_that_diverges_is_caught(backend):
    """One step of SGD(1e30): the loss of that step is finite, the weights it leaves are not
    usable; the end-of-epoch check restores the weights from before the fit."""
    X, y = _data(8)
    model = _mlp("relu", backend, opt=fr.SGD(1e30))
    before = model.get_weights()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        hist = model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    assert _nan_warnings(rec), "a fit that left a NaN-producing model did not warn"
    assert "from before this fit" in str(_nan_warnings(rec)[0].message)
    assert hist.history.get("loss", []) == []
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(model.evaluate(X, y))


@pytest.mark.parametrize("backend", CPU)
def test_a_nan_stop_keeps_the_last_sound_epoch(backend):
    """Training that diverges in epoch 3 ends with the state at the end of epoch 2 (weights,
    moments, counters), which gives a finite loss; history holds epochs 1-2."""
    X, y = _data(32, seed=5)

    class Blow(fr.Callback):     # after epoch 2, weights whose outputs overflow float32
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.set_weights([w * np.float32(1e20) for w in
                                        self.model.get_weights()])

    model = _mlp("relu", backend, opt=fr.SGD(1e-2))
    ref = _mlp("relu", backend, opt=fr.SGD(1e-2))
    ref.fit(X, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        hist = model.fit(X, y, epochs=5, batch_size=4, shuffle=False, verbose=0,
                         callbacks=[Blow()])
    assert _nan_warnings(rec) and "end of epoch 2" in str(_nan_warnings(rec)[0].message)
    assert len(hist.history["loss"]) == 2
    assert trust_props.same_state(trust_props.state_of(model), trust_props.state_of(ref))
    assert np.isfinite(model.evaluate(X, y))


def test_multitask_divergence_restores_the_last_sound_state():
    X, y = _data(12)
    model = fr.MultiTask([fr.Dense(4, "relu")], {"a": ([fr.Dense(1)], "mse")}, input_dim=3)
    model.compile(optimizer=fr.SGD(1e30), backend="numpy")
    before = model.get_weights()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        model.fit(X, {"a": y}, epochs=2, batch_size=12, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_values_that_round_away_in_the_dtype_are_refused():
    with pytest.raises(ValueError, match="BatchNorm eps 1e-300 rounds to 0 in float32"):
        fr.Sequential([fr.Dense(2), fr.BatchNorm(eps=1e-300), fr.Dense(1)], input_dim=3)
    with pytest.raises(ValueError, match="BatchNorm momentum .* rounds to 1 in float32"):
        fr.Sequential([fr.Dense(2), fr.BatchNorm(momentum=1 - 1e-9), fr.Dense(1)])
    with pytest.raises(ValueError, match="eps 1e-50 rounds to 0 in float32"):
        _mlp(opt=fr.Adam(eps=1e-50), backend="numpy")
    with pytest.raises(ValueError, match="lr 1e\\+300 overflows to inf in float32"):
        _mlp(opt=fr.Adam(lr=1e300), backend="numpy")
    # float64 keeps them: BatchNorm at batch size 1 (variance 0) trains without dividing by 0
    X, y = _data(5)
    for backend in CPU:
        model = fr.Sequential([fr.Dense(2), fr.BatchNorm(eps=1e-300), fr.Dense(1)],
                              input_dim=3, dtype="float64")
        model.compile(backend=backend)
        model.fit(X, y, batch_size=1, verbose=0)
        assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("batch_size", [11, 64, 2 ** 62, 2 ** 63 - 1, 2 ** 63 + 5, 10 ** 30])
def test_any_batch_size_over_the_rows_is_one_batch(backend, batch_size):
    X, y = _data(10)
    model, ref = _mlp("tanh", backend, seed=2), _mlp("tanh", backend, seed=2)
    model.fit(X, y, epochs=2, batch_size=batch_size, verbose=0)
    ref.fit(X, y, epochs=2, batch_size=10, verbose=0)
    assert trust_props.same_state(trust_props.state_of(model), trust_props.state_of(ref))
    np.testing.assert_array_equal(model.predict(X, batch_size=batch_size), ref.predict(X))
    assert model.evaluate(X, y, batch_size=batch_size) == ref.evaluate(X, y)


@pytest.mark.parametrize("bad", [0, -1, True, "8", 1.5, np.float32(2)])
def test_evaluate_batch_size_is_validated(bad):
    X, y = _data(6)
    for model in (_mlp(backend="numpy"),
                  fr.MultiTask([fr.Dense(2)], {"a": ([fr.Dense(1)], "mse")}, input_dim=3)):
        if isinstance(model, fr.MultiTask):
            model.compile(backend="numpy")
            target = {"a": y}
        else:
            target = y
        with pytest.raises(ValueError, match="batch_size"):
            model.evaluate(X, target, batch_size=bad)


def test_complex_targets_and_weights_are_refused():
    X, y = _data(6)
    model = _mlp(backend="numpy")
    before = trust_props.state_of(model)
    with pytest.raises(TypeError, match="y must be real"):
        model.fit(X, y + 1j, verbose=0)
    with pytest.raises(TypeError, match="y_val must be real"):
        model.fit(X, y, validation_data=(X, y + 0j), verbose=0)
    with pytest.raises(TypeError, match="must be real"):
        model.set_weights([w + 1j for w in model.get_weights()])
    with pytest.raises(TypeError, match="y must be real"):
        model.evaluate(X, y.astype(np.complex128))
    assert trust_props.same_state(trust_props.state_of(model), before)


def test_numpy_scalar_hyperparameters_are_python_numbers():
    pairs = [
        (lambda v: fr.Adam(lr=v), np.float32(1e-3)), (lambda v: fr.SGD(lr=v), np.float64(0.1)),
        (lambda v: fr.SGD(0.1, momentum=v), np.float32(0.9)),
        (lambda v: fr.AdamW(weight_decay=v), np.float32(0.01)),
        (lambda v: fr.Adam(beta1=v), np.float16(0.5)), (lambda v: fr.L1(v), np.float32(1e-4)),
        (lambda v: fr.L2(v), np.float32(1e-4)), (lambda v: fr.ElasticNet(v, v), np.float32(0.1)),
        (lambda v: fr.MaxNorm(v), np.int64(3)), (lambda v: fr.GroupLasso(v), np.float32(0.1)),
        (lambda v: fr.Dense(v), np.int64(8)), (lambda v: fr.Dense(4, dropout=v), np.float32(0.25)),
        (lambda v: fr.Dense(4, "leaky_relu", negative_slope=v), np.float32(0.1)),
        (lambda v: fr.Dropout(v), np.float32(0.5)),
        (lambda v: fr.GaussianNoise(v), np.float32(0.1)),
        (lambda v: fr.GaussianDropout(v), np.float64(0.2)),
        (lambda v: fr.BatchNorm(momentum=v), np.float32(0.5)),
        (lambda v: fr.BatchNorm(eps=v), np.float32(1e-3)),
        (lambda v: fr.EarlyStopping(patience=v), np.int64(3)),
        (lambda v: fr.EarlyStopping(min_delta=v), np.float32(0.01)),
        (lambda v: fr.GaussianJitter(v), np.float32(0.1)), (lambda v: fr.Mixup(v), np.float32(0.2)),
        (lambda v: fr.RandomShift(v), np.int64(2)),
    ]
    for make, value in pairs:
        a, b = make(value), make(value.item())
        key = getattr(a, "get_config", None)
        if key is not None:
            assert a.get_config() == b.get_config(), (value, a)
        else:
            assert vars(a) == vars(b), (value, a)
    X, y = _data(12)
    model, ref = _mlp("tanh", "numpy", seed=np.uint64(3)), _mlp("tanh", "numpy", seed=3)
    model.fit(X, y, epochs=np.int64(2), batch_size=np.int32(4), verbose=np.int64(0))
    ref.fit(X, y, epochs=2, batch_size=4, verbose=0)
    assert trust_props.same_state(trust_props.state_of(model), trust_props.state_of(ref))
    np.testing.assert_array_equal(model.predict(X, batch_size=np.int64(5)),
                                  ref.predict(X, batch_size=5))
    m1 = model.predict(X, mc_samples=np.int64(3), seed=np.uint32(4))
    m2 = ref.predict(X, mc_samples=3, seed=4)
    np.testing.assert_array_equal(m1[0], m2[0])
    fr.Sequential([fr.Dense(2)], input_dim=np.int64(3))


def test_errors_name_what_is_wrong():
    X, y = _data(8)
    model = _mlp(backend="numpy")
    before = trust_props.state_of(model)
    with pytest.raises(TypeError, match=r"callbacks must be a list .*single EarlyStopping"):
        model.fit(X, y, callbacks=fr.EarlyStopping(monitor="loss"), verbose=0)
    with pytest.raises(TypeError, match=r"one name: a Sequential has one output\), got "
                                        r"\['mse'\]"):
        model.compile(loss=["mse"])
    with pytest.raises(TypeError, match="set_weights takes a list"):
        model.set_weights(None)
    with pytest.raises(ValueError, match="Dense units must be a positive integer below 2\\*\\*31"):
        fr.Dense(2 ** 63)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        fr.sweep(lambda seed: model, {"w": [1]}, X, y, seed=-1, as_frame=False)
    with pytest.raises(ValueError, match="verbose"):
        model.fit(X, y, verbose=True)
    assert trust_props.same_state(trust_props.state_of(model), before)


# ================================================================ files
def _saved(tmp_path, model=None, name="m.npz"):
    model = model or _mlp(backend="numpy")
    path = str(tmp_path / name)
    model.save(path)
    with np.load(path) as z:
        return path, {k: z[k] for k in z.files}


def _rewrite(path, members, cfg=None):
    if cfg is not None:
        members = dict(members, config=np.array(json.dumps(cfg)))
    np.savez(path, **members)


def _peak(fn):
    tracemalloc.start()
    try:
        try:
            fn()
        finally:
            peak = tracemalloc.get_traced_memory()[1]
        return peak
    finally:
        tracemalloc.stop()


def test_load_checks_the_config_against_the_arrays_before_allocating(tmp_path):
    path, members = _saved(tmp_path)
    cfg = json.loads(str(members["config"]))
    for key, value, what in (("input_dim", 20_000_000, "shape"), ("input_dim", True, "input_dim"),
                             ("input_dim", -3, "input_dim")):
        _rewrite(path, members, dict(cfg, **{key: value}))
        assert os.path.getsize(path) < 8192
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match="is not a valid fastreg model file") as info:
                fr.load_model(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert what in str(info.value)
        assert peak < 4 << 20, f"{peak / 2 ** 20:.0f} MiB for a {os.path.getsize(path)} B file"
    for units in (10 ** 9, 2 ** 63):
        big = json.loads(json.dumps(cfg))
        big["layers"][0]["units"] = units
        _rewrite(path, members, big)
        with pytest.raises(ValueError, match="is not a valid fastreg model file"):
            fr.load_model(path)
    # deep JSON: a clean error, no RecursionError
    members2 = dict(members, config=np.array("[" * 100000 + "]" * 100000))
    np.savez(path, **members2)
    with pytest.raises(ValueError, match="nested too deeply|nested deeper"):
        fr.load_model(path)
    deep = json.loads(json.dumps(cfg))
    deep["layers"][0]["regularizer"] = json.loads("[" * 500 + "]" * 500)
    _rewrite(path, members, deep)
    with pytest.raises(ValueError, match="nested deeper than 64"):
        fr.load_model(path)


def test_a_header_declaring_more_than_the_member_holds_is_refused_unread(tmp_path):
    path, members = _saved(tmp_path)
    trust_props._write_with_huge_header(path, members, "W0")
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="W0"):
            fr.load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_members_the_format_does_not_name_are_never_decompressed(tmp_path):
    """A 256 MiB member of zeros (a few hundred KB deflated) beside a valid model: loaded
    without decompressing it."""
    path, members = _saved(tmp_path)
    trust_props._mutate(path, {"mutation": "unused_bomb", "where": 0})
    assert os.path.getsize(path) < 2 << 20
    peak = _peak(lambda: fr.load_model(path))
    assert peak < 8 << 20, f"{peak / 2 ** 20:.0f} MiB"
    assert fr.load_model(path).get_weights()[0].shape == (3, 8)


def test_every_loaded_value_is_validated(tmp_path):
    model = fr.Sequential([fr.Dense(4, "relu"), fr.BatchNorm(), fr.Dense(1)], input_dim=3)
    model.compile(optimizer=fr.Adam(1e-2), backend="numpy")
    model.fit(*_data(12), epochs=1, batch_size=4, verbose=0)
    path, members = _saved(tmp_path, model)
    cfg = json.loads(str(members["config"]))

    def bad(name, fn):
        m = {k: v.copy() for k, v in members.items()}
        m[name] = fn(m[name])
        return m
    cases = [
        (bad("mW0", lambda a: np.where(a == a.flat[0], np.nan, a)), "'mW0' holds NaN or inf"),
        (bad("vW0", lambda a: a - 1), "'vW0' holds negative values"),
        (bad("vb1", lambda a: a * np.inf), "'vb1' holds NaN or inf"),
        (bad("bnstat0", lambda a: a * np.array([[1], [-1]], np.float32)), "running variance"),
        (bad("bn0", lambda a: a / 0), "'bn0' holds NaN or inf"),
        (bad("W0", lambda a: a.astype(np.complex64)), "real numbers"),
        (bad("W1", lambda a: a > 0), "real numbers"),
    ]
    for m, what in cases:
        _rewrite(path, m)
        with pytest.raises(ValueError, match="is not a valid fastreg model file") as info:
            fr.load_model(path)
        assert what in str(info.value), (what, str(info.value))
    for key, value in (("step", -1), ("t", 2.5), ("epochs_run", True), ("mc_step", 2 ** 40),
                       ("step", "7"), ("t", 2 ** 63)):
        _rewrite(path, members, dict(cfg, **{key: value}))
        with pytest.raises(ValueError, match=f"counter '{key}'"):
            fr.load_model(path)
    _rewrite(path, members, dict(cfg, dtype="complex64"))
    with pytest.raises(ValueError, match="dtype"):
        fr.load_model(path)
    _rewrite(path, members)
    loaded = fr.load_model(path)
    assert trust_props.same_state(trust_props.state_of(loaded), trust_props.state_of(model))


def test_multitask_files_are_validated_the_same_way(tmp_path):
    model = fr.MultiTask([fr.Dense(4, "relu")], {"a": ([fr.Dense(1)], "mse")}, input_dim=3)
    model.compile(backend="numpy")
    path, members = _saved(tmp_path, model)
    cfg = json.loads(str(members["config"]))
    _rewrite(path, members, dict(cfg, input_dim=20_000_000))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="is not a valid fastreg model file"):
            fr.load_model(path)
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()
    m = dict(members)
    m["p1_W0"] = m["p1_W0"] * np.nan
    _rewrite(path, m)
    with pytest.raises(ValueError, match="'p1_W0' holds NaN"):
        fr.load_model(path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_save_respects_the_umask_an_existing_mode_and_symlinks(tmp_path, umask):
    model = _mlp(backend="numpy")
    old = os.umask(umask)
    try:
        new = tmp_path / "new.npz"
        model.save(new)
        assert stat.S_IMODE(os.stat(new).st_mode) == 0o666 & ~umask
        kept = tmp_path / "kept.npz"
        kept.write_bytes(b"x")
        os.chmod(kept, 0o644)
        model.save(kept)
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o644
        link = tmp_path / "link.npz"
        target = tmp_path / "target.npz"
        os.symlink("target.npz", link)
        model.save(link)
        assert os.path.islink(link) and os.path.isfile(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.npz", "link.npz",
                                                              "new.npz", "target.npz"]
        fr.load_model(link)
        model.save_weights(tmp_path / "w.npz")
        assert stat.S_IMODE(os.stat(tmp_path / "w.npz").st_mode) == 0o666 & ~umask
    finally:
        os.umask(old)


# ================================================================ interruptions
def _fit_interrupted(model, X, y, **kw):
    """fit, with KeyboardInterrupt expected; (raised?, ...)."""
    try:
        try:
            model.fit(X, y, **kw)
        finally:
            trust_props._absorb()
    except KeyboardInterrupt:
        return True
    return False


class _CtrlCAfterEpoch(fr.Callback):
    def __init__(self, epoch):
        self.at = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            _thread.interrupt_main()     # as a Ctrl-C arriving now


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("kind", ["sequential", "multitask"])
def test_ctrl_c_keeps_the_completed_steps_and_epochs(backend, kind):
    X, y = _data(30, seed=1)
    case = {"backend": backend, "multitask": kind == "multitask", "dropout": 0.3, "seed": 4,
            "n": 30, "batch": 4}
    model = trust_props._int_model(case)
    target = {"a": y} if case["multitask"] else y
    X, target = trust_props._int_data(case)
    assert _fit_interrupted(model, X, target, epochs=5, batch_size=4, verbose=0,
                            callbacks=[_CtrlCAfterEpoch(1)])
    nb = 8
    assert _counters(model).step == _counters(model).t == 2 * nb
    assert _counters(model).epochs_run == 2
    assert len(model.history.history["loss"]) == 2
    ref = trust_props.reference_after_steps(case, 2 * nb)
    assert trust_props.same_state(trust_props.state_of(model), trust_props.state_of(ref))


@pytest.mark.parametrize("backend", CPU)
def test_ctrl_c_between_chunks_keeps_the_last_completed_step(backend, monkeypatch):
    """A Ctrl-C during a chunk of batches: the chunk completes, its steps are kept with
    counters that match them, and the fit stops there (mid-epoch)."""
    monkeypatch.setattr(training, "CHUNK_MACS", 1)      # one batch a chunk
    case = {"backend": backend, "multitask": False, "dropout": 0.3, "seed": 7, "n": 40,
            "batch": 4, "trigger": "chunk", "at": 13, "epochs": 3, "verbose": 0, "delay": 0}
    X, y = trust_props._int_data(case)
    model = trust_props._int_model(case)
    assert trust_props.run_interrupted(model, case, X, y)
    assert _counters(model).step == _counters(model).t == 14
    assert _counters(model).epochs_run == 1
    assert len(model.history.history["loss"]) == 1
    ref = trust_props.state_of(trust_props.reference_after_steps(case, 14))
    ref["epochs_run"] = 1       # the reference ran its 4 batches as a fit of its own
    assert trust_props.same_state(trust_props.state_of(model), ref)


@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_ctrl_c_stops_a_long_epoch_within_a_chunk(verbose):
    """A real Ctrl-C (SIGINT from another thread) during a long epoch: at most two chunks of
    batches run after it, at every verbose (counted in steps, not timed)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60000, 32)).astype(np.float32)
    y = rng.standard_normal((60000, 1)).astype(np.float32)
    model = fr.Sequential([fr.Dense(256, "relu"), fr.Dense(256, "relu"), fr.Dense(1)],
                          input_dim=32, seed=0)
    model.compile(optimizer=fr.Adam(1e-3), backend="numba")
    model.fit(X[:256], y[:256], epochs=1, batch_size=64, verbose=0)     # compiled, warm
    step0, epochs0 = _counters(model).step, _counters(model).epochs_run
    per_chunk = training.chunk_batches(64, model._network.kernels())
    n_batches = 60000 // 64 + 1
    assert n_batches > 20 * per_chunk
    seen = {}

    def press():
        while _counters(model).step < step0 + 300:  # training is under way
            time.sleep(0.01)
        seen["step"] = _counters(model).step
        os.kill(os.getpid(), __import__("signal").SIGINT)
    t = threading.Thread(target=press, daemon=True)
    t.start()
    assert _fit_interrupted(model, X, y, epochs=3, batch_size=64, verbose=verbose)
    t.join()
    assert _counters(model).step - seen["step"] <= 2 * per_chunk
    assert 0 < _counters(model).step - step0 < n_batches    # stopped in the first epoch, kept
    assert _counters(model).epochs_run == epochs0 and model.history.history == {}
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_repeated_ctrl_c_never_leaves_a_half_restored_model():
    """Two presses at drawn moments, over many fits: every model is the model of its own
    number of steps (consistent weights, moments and counters), never a mix."""
    rng = np.random.default_rng()
    for trial in range(12):
        case = {"backend": "numba", "multitask": bool(trial % 2), "dropout": 0.3,
                "seed": trial, "n": 48, "batch": 4, "trigger": "timer2", "epochs": 400,
                "verbose": 0, "at": 0, "delay": float(rng.uniform(0.0, 0.2))}
        trust_props.check_interrupts(case)


@pytest.mark.parametrize("kind", ["sequential", "multitask"])
@pytest.mark.parametrize("backend", CPU)
def test_backup_and_restore_resumes_bitwise(tmp_path, kind, backend):
    case = {"backend": backend, "multitask": kind == "multitask", "dropout": 0.3, "seed": 3,
            "n": 30, "batch": 4, "epochs": 4, "stop_after": 1}
    trust_props.check_resume(case, str(tmp_path))
    assert os.listdir(tmp_path) == ["b3-4-1"] and not os.listdir(tmp_path / "b3-4-1")


def test_backup_from_another_model_is_refused(tmp_path):
    X, y = _data(12)
    model = _mlp(backend="numpy")
    try:
        model.fit(X, y, epochs=3, batch_size=4, verbose=0,
                  callbacks=[fr.BackupAndRestore(tmp_path), _CtrlCAfterEpoch(0)])
    except KeyboardInterrupt:
        pass
    trust_props._absorb()
    assert (tmp_path / "backup.npz").exists()
    other = fr.Sequential([fr.Dense(5, "relu"), fr.Dense(1)], input_dim=3)
    other.compile(backend="numpy")
    before = trust_props.state_of(other)
    with pytest.raises(ValueError, match="another model"):
        other.fit(X, y, epochs=3, verbose=0, callbacks=[fr.BackupAndRestore(tmp_path)])
    assert trust_props.same_state(trust_props.state_of(other), before)


def test_model_checkpoint(tmp_path, capsys):
    X, y = _data(40)
    Xv, yv = _data(20)
    model = _mlp(backend="numpy", opt=fr.Adam(1e-2))
    every = fr.ModelCheckpoint(tmp_path / "e{epoch:02d}-{loss:.3f}.npz", monitor="loss")
    best = fr.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True, verbose=1)
    weights = fr.ModelCheckpoint(tmp_path / "w.npz", save_weights_only=True)
    hist = model.fit(X, y, epochs=4, batch_size=8, validation_data=(Xv, yv), verbose=0,
                     callbacks=[every, best, weights])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n[:3] for n in names if n.startswith("e")] == ["e01", "e02", "e03", "e04"]
    assert f"e04-{hist.history['loss'][-1]:.3f}.npz" in names
    b = int(np.argmin(hist.history["val_loss"]))
    assert best.best == hist.history["val_loss"][b]
    assert "improved" in capsys.readouterr().out
    assert fr.load_model(tmp_path / "best.npz").evaluate(Xv, yv) == pytest.approx(
        hist.history["val_loss"][b], rel=1e-6)
    other = _mlp(backend="numpy", seed=9)
    other.load_weights(tmp_path / "w.npz")
    np.testing.assert_array_equal(other.predict(X), model.predict(X))
    with pytest.raises(ValueError, match="ModelCheckpoint monitors 'val_loss'"):
        model.fit(X, y, verbose=0, callbacks=[fr.ModelCheckpoint(tmp_path / "x.npz",
                                                                 save_best_only=True)])
    with pytest.raises(ValueError, match="save_freq"):
        fr.ModelCheckpoint(tmp_path / "x.npz", save_freq=10)


@pytest.mark.skipif("cuda" not in ALL, reason="CUDA backend unavailable")
def test_ctrl_c_on_cuda_keeps_the_device_state(cuda_tiles):
    """The device holds the parameters during an epoch: a Ctrl-C brings them home."""
    case = {"backend": "cuda", "multitask": False, "dropout": 0.0, "seed": 2, "n": 12,
            "batch": 4}
    model = fr.Sequential([fr.Dense(4, "tanh"), fr.Dense(1)], input_dim=3, seed=2)
    model.compile(optimizer=fr.Adam(1e-2), backend="cuda")
    X, y = trust_props._int_data(case)
    assert _fit_interrupted(model, X, y, epochs=3, batch_size=4, verbose=0,
                            callbacks=[_CtrlCAfterEpoch(0)])
    ref = fr.Sequential([fr.Dense(4, "tanh"), fr.Dense(1)], input_dim=3, seed=2)
    ref.compile(optimizer=fr.Adam(1e-2), backend="cuda")
    ref.fit(X, y, epochs=1, batch_size=4, verbose=0)
    assert _counters(model).step == 3
    for a, b in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(a, b)


# ================================================================ threads and memory
def _blas():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_the_blas_limit_is_counted_across_threads():
    """Two holders in two threads, entering and leaving interleaved (A in, B in, A out, B
    out): the pools are back at their threads after the last one leaves."""
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas()
        assert before and all(n == 2 for n in before)
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        inside = {}

        def a():
            with threads.single_thread_blas():
                a_in.set()
                b_in.wait()
            a_out.set()

        def b():
            a_in.wait()
            with threads.single_thread_blas():
                b_in.set()
                a_out.wait()
                inside["b"] = _blas()
        ta, tb = threading.Thread(target=a), threading.Thread(target=b)
        ta.start()
        tb.start()
        ta.join()
        tb.join()
        assert inside["b"] == [1] * len(before)     # B still runs on one thread after A left
        assert _blas() == before


@pytest.mark.parametrize("backend", CPU)
def test_concurrent_fits_are_the_fits_run_alone(backend):
    specs = [{"backend": backend, "width": 12, "act": "tanh", "dropout": 0.2, "n": 200,
              "batch": 16, "epochs": 3, "seed": 1},
             {"backend": backend, "width": 7, "act": "relu", "dropout": 0.0, "n": 150,
              "batch": 8, "epochs": 3, "seed": 2}]
    trust_props.check_threads({"a": specs[0], "b": specs[1]})


@pytest.mark.parametrize("backend", CPU)
def test_fit_reads_a_c_contiguous_x_in_place(backend):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30000, 128)).astype(np.float32)
    y = rng.standard_normal((30000, 1)).astype(np.float32)
    model = fr.Sequential([fr.Dense(4, "tanh"), fr.Dense(1)], input_dim=128)
    model.compile(optimizer=fr.SGD(1e-3), backend=backend)
    model.fit(X[:64], y[:64], verbose=0)
    peak = _peak(lambda: model.fit(X, y, batch_size=256, verbose=0))
    assert peak < X.nbytes // 4, f"fit peaked at {peak / 2 ** 20:.1f} MiB for a " \
                                 f"{X.nbytes / 2 ** 20:.1f} MiB X"
    X0 = X.copy()
    model.fit(X, y, batch_size=256, verbose=0)
    np.testing.assert_array_equal(X, X0)


@pytest.mark.parametrize("backend", CPU)
def test_predict_and_evaluate_convert_x_a_chunk_at_a_time(backend):
    rng = np.random.default_rng(1)
    X64 = rng.standard_normal((30000, 128))          # float64: each chunk converted alone
    y = rng.standard_normal((30000, 1)).astype(np.float32)
    model = fr.Sequential([fr.Dense(4, "tanh"), fr.Dense(1)], input_dim=128)
    model.compile(backend=backend)
    ref = model.predict(X64.astype(np.float32))
    x32_bytes = X64.size * 4
    XF = np.asfortranarray(X64.astype(np.float32))
    for fn in (lambda: model.predict(X64), lambda: model.evaluate(X64, y),
               lambda: model.predict(XF)):
        peak = _peak(fn)
        assert peak < x32_bytes // 4, f"{peak / 2 ** 20:.1f} MiB"
    np.testing.assert_array_equal(model.predict(X64), ref)
    assert model.evaluate(X64, y) == model.evaluate(X64.astype(np.float32), y)


@pytest.mark.parametrize("backend", CPU)
def test_mc_passes_stack_at_most_8192_rows(backend, monkeypatch):
    """predict(mc_samples=n > 8192) cuts a row's samples into passes of 8192 stacked rows;
    mean and std are those of all n samples."""
    ops = _ops(backend).module       # the backend's operations, looked up at call time
    model = fr.Sequential([fr.Dense(6, "relu", dropout=0.4), fr.Dense(2)], input_dim=3,
                          seed=5)
    model.compile(loss="sparse_categorical_crossentropy", backend=backend)
    X, _ = _data(2)
    rows, outs = [], []
    real_dense, real_out = ops.dense_forward, ops.output_transform

    def spy_dense(x, *a, **k):
        rows.append(x.shape[0])
        return real_dense(x, *a, **k)

    def spy_out(z, loss):
        p = real_out(z, loss)
        outs.append(np.asarray(p, np.float64).copy())
        return p
    monkeypatch.setattr(ops, "dense_forward", spy_dense)
    monkeypatch.setattr(ops, "output_transform", spy_out)
    n = 20000
    mean, std = model.predict(X, mc_samples=n, seed=3)
    assert max(rows) == 8192 and len(outs) == 2 * 3      # 3 passes per row
    for r in range(2):
        s = np.concatenate(outs[3 * r:3 * r + 3])
        np.testing.assert_allclose(mean[r], s.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(std[r], s.std(axis=0), rtol=1e-5)
    mt = fr.MultiTask([fr.Dense(6, "relu", dropout=0.4)], {"a": ([fr.Dense(2)], "mse")},
                      input_dim=3, seed=5)
    mt.compile(backend=backend)
    rows.clear()
    mt.predict(X, mc_samples=n, seed=3)
    assert max(rows) == 8192


MEMMAP_SCRIPT = textwrap.dedent("""
    import os, resource, sys
    import numpy as np
    import fastreg as fr
    path, rows, cols, headroom = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    # compiled and warm before the limit, at the batch size of the fit below (the Numba
    # backend compiles its parallel passes only for batches that need them)
    warm = np.ones((4096, cols), np.float32)
    for backend in ("numba", "cython"):
        try:
            m = fr.Sequential([fr.Dense(4, "tanh"), fr.Dense(1)], input_dim=cols)
        except Exception:
            continue
        m.compile(optimizer=fr.SGD(1e-3), backend=backend)
        m.fit(warm, warm[:, :1], batch_size=4096, verbose=0)
        m.predict(warm)
        m.evaluate(warm, warm[:, :1])
    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    limit = vm_data() + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:                                          # the limit holds: X could not be loaded
        np.ones(rows * cols, np.float32)
        print("LIMIT-NOT-ENFORCED"); sys.exit(0)
    except MemoryError:
        pass
    for backend, mode in (("numba", "r+"), ("cython", "r")):
        try:
            fr.Sequential([fr.Dense(1)]).compile(backend=backend)
        except Exception:
            continue
        X = np.memmap(path, np.float32, mode, shape=(rows, cols))
        y = np.zeros((rows, 1), np.float32)
        m = fr.Sequential([fr.Dense(4, "tanh"), fr.Dense(1)], input_dim=cols, seed=1)
        m.compile(optimizer=fr.SGD(1e-3), backend=backend)
        m.fit(X, y, epochs=1, batch_size=4096, verbose=0)
        p = m.predict(X)
        e = m.evaluate(X, y)
        assert p.shape == (rows, 1) and np.isfinite(p).all() and np.isfinite(e)
        print("OK", backend, m._network.counters.step)
""")


@pytest.mark.slow
def test_a_memmap_larger_than_the_memory_given_trains_and_predicts(tmp_path):
    """X is a 256 MiB memmap file; the process may allocate 64 MiB beyond what it uses once
    warm (RLIMIT_DATA: file-backed pages are not counted, private copies would be)."""
    rows, cols = 1 << 20, 64                     # 256 MiB of float32
    path = tmp_path / "X.f32"
    X = np.memmap(path, np.float32, "w+", shape=(rows, cols))
    for start in range(0, rows, 1 << 16):
        X[start:start + (1 << 16)] = np.random.default_rng(start).standard_normal(
            (1 << 16, cols)).astype(np.float32)
    X.flush()
    del X
    out = subprocess.run([sys.executable, "-c", MEMMAP_SCRIPT, str(path), str(rows),
                          str(cols), str(64 << 20)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    if "LIMIT-NOT-ENFORCED" in out.stdout:
        pytest.skip("RLIMIT_DATA is not enforced here")
    assert "OK numba 256" in out.stdout, out.stdout + out.stderr[-2000:]
