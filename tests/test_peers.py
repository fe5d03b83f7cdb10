"""bench/peers.py: the peer engines of ``fastreg bench`` (each skips cleanly when missing)."""
import importlib
import subprocess
import sys

import numpy as np
import pytest

from fastreg.bench import peers
from fastreg.bench.workloads import Workload, initial_weights


def _tiny(kind="regression", n=100, d=6, hidden=16, batch=16, rate=0.0, act="relu", l2=1e-4,
          lr=1e-2, seed=0, n_hidden=1):
    """A small learnable workload; n % batch != 0 unless asked, so the partial batch runs.
    One hidden layer by default: every extra layer costs JAX about a second of compiling."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + 32, d)).astype(np.float32)
    if kind == "regression":
        y = np.tanh(X @ rng.standard_normal((d, 1)) / np.sqrt(d)).astype(np.float32)
        loss, out = "mse", 1
    else:
        y = np.argmax(X @ rng.standard_normal((d, 3)), axis=1).astype(np.int64)
        loss, out = "sparse_categorical_crossentropy", 3
    return Workload(name="tiny", X_train=X[:n], y_train=y[:n], X_val=X[n:], y_val=y[n:],
                    layers=[(hidden, act, rate)] * n_hidden + [(out, None, 0.0)],
                    loss=loss, l2=l2, lr=lr, batch_size=batch, epochs=2, seed=seed)


def _engine(name):
    cls = peers.PEERS[name]
    ok, why = cls.available()
    if not ok:
        pytest.skip(why)
    return cls


PEER_NAMES = ["torch", "torch-cuda", "jax", "sklearn"]   # torch-cuda skips without a GPU


def test_import_needs_no_peer_library():
    # A fresh interpreter: importing the module must not pull in torch, jax or sklearn.
    code = ("import sys; import fastreg.bench.peers; "
            "bad = [m for m in ('torch', 'jax', 'sklearn', 'optax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code],
                   check=True, timeout=60)


def test_available_reports_a_missing_library(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.split(".")[0] in ("torch", "jax", "jaxlib", "optax", "sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    for name, hint in [("torch", "pip install torch"), ("jax", "pip install jax jaxlib optax"),
                       ("sklearn", "pip install scikit-learn")]:
        ok, why = peers.PEERS[name].available()
        assert ok is False and hint in why
    with pytest.raises(ValueError, match="torch, torch-cuda, jax, sklearn"):
        peers.get_engine("tensorflow")


@pytest.mark.parametrize("name", PEER_NAMES)
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_peer_trains_and_loss_decreases(name, kind):
    cls = _engine(name)
    wl = _tiny(kind, rate=0.1, act="leaky_relu" if kind == "regression" else "relu")
    w0 = initial_weights(wl, seed=1)
    eng = cls(wl, w0, threads=1)
    for a, b in zip(eng.get_weights(), w0):          # the given weights were copied in
        np.testing.assert_array_equal(a, b)
    v0 = eng.val_loss()
    eng.run_epoch()
    l1 = eng.train_loss()
    eng.run_epoch()
    l2 = eng.train_loss()
    assert np.isfinite(l1) and np.isfinite(l2)
    assert l2 < l1
    assert eng.val_loss() < v0
    acc = eng.val_accuracy()
    if kind == "classification":
        assert 0.0 <= acc <= 1.0
    else:
        assert acc is None
    # the engine copied the weights: the caller's arrays are untouched
    np.testing.assert_array_equal(w0[0], initial_weights(wl, seed=1)[0])
    assert isinstance(eng.notes, str)
    assert eng.kept_bytes_per_element > 0


def _weights_after_one_epoch(name, wl, w0):
    eng = _engine(name)(wl, w0, threads=1)
    eng.run_epoch()
    return eng, eng.get_weights()


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_jax_matches_torch_without_dropout(kind):
    """Same weights, same batches, no dropout: optax's add_decayed_weights + adam is PyTorch's
    Adam with weight_decay on the weights, so the trajectories agree to float32 rounding."""
    wl = _tiny(kind, l2=0.05, lr=1e-2)
    w0 = initial_weights(wl, seed=2)
    t, wt = _weights_after_one_epoch("torch", wl, w0)
    j, wj = _weights_after_one_epoch("jax", wl, w0)
    for a, b in zip(wt, wj):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    assert t.train_loss() == pytest.approx(j.train_loss(), rel=1e-4)
    assert t.val_loss() == pytest.approx(j.val_loss(), rel=1e-4)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_sklearn_alpha_equals_our_l2(kind):
    """alpha = l2*batch/2 (mse) or l2*batch (CE) makes sklearn's Adam follow PyTorch's Adam with
    weight_decay=l2 (no dropout, relu, batches that divide the data: no partial batch). A
    strong l2 makes a wrong alpha visible."""
    wl = _tiny(kind, n=96, batch=16, l2=0.5, lr=1e-2, n_hidden=2)
    w0 = initial_weights(wl, seed=3)
    t, wt = _weights_after_one_epoch("torch", wl, w0)
    s, ws = _weights_after_one_epoch("sklearn", wl, w0)
    err = max(np.abs(a - b).max() for a, b in zip(wt, ws))
    assert err < 1e-4
    assert t.train_loss() == pytest.approx(s.train_loss(), rel=1e-4)
    assert t.val_loss() == pytest.approx(s.val_loss(), rel=1e-4)
    # and the penalty does matter at this strength: twice the alpha lands elsewhere
    cls = peers.SklearnEngine
    orig = cls.alpha_for
    try:
        cls.alpha_for = staticmethod(lambda w: 2.0 * orig(w))
        _, wrong = _weights_after_one_epoch("sklearn", wl, w0)
    finally:
        cls.alpha_for = staticmethod(orig)
    assert max(np.abs(a - b).max() for a, b in zip(wt, wrong)) > 10 * err


def test_sklearn_notes_say_no_dropout():
    cls = _engine("sklearn")
    eng = cls(_tiny(rate=0.2, act="leaky_relu"), initial_weights(_tiny(), seed=0), threads=1)
    assert "no dropout" in eng.notes and "leaky_relu" in eng.notes


def test_torch_kept_bytes_measured():
    _engine("torch")
    for act in ("relu", "leaky_relu"):
        assert peers.measure_torch_kept_bytes(act) == peers.TorchEngine.kept_bytes_per_element


def test_jax_kept_bytes_measured():
    _engine("jax")
    for act in ("relu", "leaky_relu"):
        assert peers.measure_jax_kept_bytes(act) == peers.JaxEngine.kept_bytes_per_element


def test_torch_cuda_says_why_it_cannot_run():
    ok, why = peers.TorchCudaEngine.available()
    if ok:
        pytest.skip("a GPU is here: torch-cuda runs (test_peer_trains_and_loss_decreases)")
    assert why and ("pip install torch" in why or "sees no CUDA GPU" in why)
