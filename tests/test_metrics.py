"""fastreg.metrics against scikit-learn on the same predictions, every loss family."""
import numpy as np
import pytest

from fastreg import metrics
from netutil import fresh_rng

sk = pytest.importorskip("sklearn.metrics")


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _compiled(name, loss):
    metric, = metrics.resolve([name], loss)
    return metric


@pytest.mark.parametrize("trial", range(5))
def test_binary_metrics_equal_scikit_learn(trial):
    rng = fresh_rng()
    n = int(rng.integers(40, 200))
    y = (rng.random(n) < 0.4).astype(np.float32).reshape(n, 1)
    p = rng.random((n, 1)).astype(np.float32)
    p[:5] = 0.5                                        # ties and the threshold itself
    t, hard = y[:, 0].astype(int), (p[:, 0] >= 0.5).astype(int)
    bce = "binary_crossentropy"
    assert _compiled("accuracy", bce)(y, p) == pytest.approx(sk.accuracy_score(t, hard), abs=1e-15)
    assert _compiled("precision", bce)(y, p) == pytest.approx(
        sk.precision_score(t, hard, zero_division=0), abs=1e-15)
    assert _compiled("recall", bce)(y, p) == pytest.approx(sk.recall_score(t, hard), abs=1e-15)
    assert _compiled("f1", bce)(y, p) == pytest.approx(sk.f1_score(t, hard), abs=1e-15)
    assert _compiled("auc", bce)(y, p) == pytest.approx(sk.roc_auc_score(t, p[:, 0]), abs=1e-12)


@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "categorical_crossentropy"])
@pytest.mark.parametrize("trial", range(4))
def test_multiclass_metrics_equal_scikit_learn(loss, trial):
    rng = fresh_rng()
    n, K = int(rng.integers(30, 200)), int(rng.integers(3, 6))
    labels = rng.integers(0, K, n)
    labels[:K] = np.arange(K)                          # every class present
    P = _softmax(rng.standard_normal((n, K)) * 2).astype(np.float32)
    y = labels.reshape(n, 1).astype(np.float32) if loss.startswith("sparse") \
        else np.eye(K, dtype=np.float32)[labels]
    hard = P.argmax(axis=1)
    assert _compiled("accuracy", loss)(y, P) == pytest.approx(sk.accuracy_score(labels, hard))
    for name, fn in (("precision", sk.precision_score), ("recall", sk.recall_score),
                     ("f1", sk.f1_score)):
        assert _compiled(name, loss)(y, P) == pytest.approx(
            fn(labels, hard, average="macro", zero_division=0), abs=1e-12), name
    assert _compiled("auc", loss)(y, P) == pytest.approx(
        sk.roc_auc_score(labels, P.astype(np.float64) / P.sum(axis=1, keepdims=True),
                         multi_class="ovr", average="macro"), abs=1e-12)


def test_two_class_softmax_auc_scores_the_second_class():
    rng = fresh_rng()
    labels = rng.integers(0, 2, 80)
    P = _softmax(rng.standard_normal((80, 2)))
    got = _compiled("auc", "sparse_categorical_crossentropy")(labels.reshape(-1, 1), P)
    assert got == pytest.approx(sk.roc_auc_score(labels, P[:, 1]), abs=1e-12)


def test_multi_label_metrics_flatten_and_auc_is_macro():
    rng = fresh_rng()
    Y = (rng.random((100, 4)) < 0.5).astype(np.float32)
    P = rng.random((100, 4)).astype(np.float32)
    bce = "binary_crossentropy"
    t, hard = Y.ravel().astype(int), (P.ravel() >= 0.5).astype(int)
    assert _compiled("accuracy", bce)(Y, P) == pytest.approx(sk.accuracy_score(t, hard))
    assert _compiled("precision", bce)(Y, P) == pytest.approx(sk.precision_score(t, hard))
    assert _compiled("auc", bce)(Y, P) == pytest.approx(sk.roc_auc_score(Y, P), abs=1e-12)


@pytest.mark.parametrize("K", [1, 3])
def test_regression_metrics_equal_scikit_learn(K):
    rng = fresh_rng()
    y = rng.standard_normal((50, K)).astype(np.float32)
    p = (y + 0.3 * rng.standard_normal((50, K))).astype(np.float32)
    y64, p64 = y.astype(np.float64), p.astype(np.float64)   # ours sums in float64
    for name, peer in (("mae", sk.mean_absolute_error), ("mse", sk.mean_squared_error),
                       ("r2", sk.r2_score)):
        assert _compiled(name, "mse")(y, p) == pytest.approx(peer(y64, p64), rel=1e-12), name


def test_r2_of_a_constant_target_follows_scikit_learn():
    y = np.ones((10, 2))
    p = np.ones((10, 2))
    p[0, 1] = 2.0
    assert metrics.r2(y, p, metrics.REGRESSION) == pytest.approx(sk.r2_score(y, p)) == 0.5


def test_resolve_names_errors_and_callables():
    def hit_rate(y_true, y_pred):
        return 0.25
    ms = metrics.resolve(["acc", "F1_score", hit_rate], "binary_crossentropy")
    assert [m.name for m in ms] == ["accuracy", "f1", "hit_rate"]
    assert ms[2](None, None) == 0.25
    with pytest.raises(ValueError, match="needs a classification loss"):
        metrics.resolve(["accuracy"], "mse")
    with pytest.raises(ValueError, match="unknown metric 'accuracyy'"):
        metrics.resolve(["accuracyy"], "mse")
    with pytest.raises(ValueError, match="given twice"):
        metrics.resolve(["mae", "mean_absolute_error"], "mse")
    with pytest.raises(ValueError, match="lambda"):
        metrics.resolve([lambda t, p: 0.0], "mse")
    with pytest.raises(TypeError, match="must return a number"):
        bad = type("bad", (), {"__call__": lambda s, t, p: "x", "__name__": "bad"})()
        metrics.resolve([bad], "mse")[0](None, None)
    with pytest.raises(ValueError, match="one class only"):
        _compiled("auc", "binary_crossentropy")(np.ones((4, 1)), np.random.rand(4, 1))
