"""fastreg.sklearn: the estimator contract (check_estimator), model selection, labels,
pandas, partial_fit, warm_start, pickling."""
import pickle

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.model_selection import (GridSearchCV, RandomizedSearchCV,  # noqa: E402
                                     cross_val_score, train_test_split)
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402
from sklearn.utils.validation import check_is_fitted  # noqa: E402

import fastreg as fr  # noqa: E402
from fastreg.sklearn import FastregClassifier, FastregRegressor  # noqa: E402

# No expected failures: every check of scikit-learn's suite must pass for both estimators.
EXPECTED_FAILED_CHECKS = {}


@parametrize_with_checks([FastregRegressor(), FastregClassifier()],
                         expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_check_estimator(estimator, check):
    check(estimator)


def _regression(n=160, seed=0, outputs=1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    W = rng.normal(size=(4, outputs))
    y = np.tanh(X @ W) + 0.05 * rng.normal(size=(n, outputs))
    return X, (y[:, 0] if outputs == 1 else y)


def _classification(n=180, seed=0, labels=("cat", "dog", "emu")):
    rng = np.random.default_rng(seed)
    k = len(labels)
    centers = rng.normal(scale=5.0, size=(k, 3))
    codes = rng.integers(0, k, n)
    X = centers[codes] + rng.normal(size=(n, 3))
    return X, np.asarray(labels, dtype=object)[codes] if isinstance(labels[0], str) \
        else np.asarray(labels)[codes]


SMALL = dict(hidden_layer_sizes=(16,), epochs=30, batch_size=32, learning_rate=1e-2)


def test_string_and_arbitrary_labels_round_trip():
    X, y = _classification()
    clf = FastregClassifier(random_state=0, **SMALL).fit(X, y)
    assert clf.classes_.tolist() == ["cat", "dog", "emu"]
    assert set(clf.predict(X)) <= set(clf.classes_)
    assert clf.score(X, y) > 0.9
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(X))
    # integer labels that are not 0..k-1, two classes: one sigmoid output
    Xb, yb = _classification(labels=(-7, 42))
    clfb = FastregClassifier(random_state=0, **SMALL).fit(Xb, yb)
    assert clfb.classes_.tolist() == [-7, 42]
    assert clfb.model_.n_outputs == 1 and clfb.model_.loss == "binary_crossentropy"
    assert clfb.predict_proba(Xb).shape == (len(Xb), 2)
    assert clfb.score(Xb, yb) > 0.9


def test_random_state_is_the_model_seed():
    X, y = _regression()
    est = FastregRegressor(hidden_layer_sizes=(8,), activation="tanh", l2=1e-3, epochs=3,
                           batch_size=16, learning_rate=1e-2, random_state=7).fit(X, y)
    model = fr.Sequential([fr.Dense(8, "tanh", regularizer=fr.L2(1e-3)),
                           fr.Dense(1, regularizer=fr.L2(1e-3))], input_dim=4, seed=7,
                          dtype="float64")
    model.compile(loss="mse", optimizer=fr.Adam(1e-2))
    model.fit(X, y, epochs=3, batch_size=16, verbose=0)
    for a, b in zip(est.model_.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert est.n_iter_ == 3 and len(est.history_["loss"]) == 3


def test_dtype_follows_the_input_unless_given():
    X, y = _regression(64)
    kw = dict(hidden_layer_sizes=(4,), epochs=1, random_state=0)
    assert FastregRegressor(**kw).fit(X, y).model_.dtype == np.float64
    assert FastregRegressor(**kw).fit(X.astype(np.float32), y).model_.dtype == np.float32
    est = FastregRegressor(dtype="float32", **kw).fit(X, y)
    assert est.model_.dtype == np.float32 and est.predict(X).dtype == np.float32


def test_multioutput_regression():
    X, y = _regression(outputs=2)
    est = FastregRegressor(random_state=0, **SMALL).fit(X, y)
    assert est.n_outputs_ == 2 and est.predict(X).shape == (len(X), 2)
    assert est.score(X, y) > 0.8


def test_pipeline_gridsearch_randomizedsearch_cross_val_score():
    from scipy.stats import loguniform
    X, y = _classification(240)
    pipe = make_pipeline(StandardScaler(), FastregClassifier(random_state=0, **SMALL))
    grid = GridSearchCV(pipe, {"fastregclassifier__l2": [0.0, 1e-2],
                               "fastregclassifier__dropout": [0.0, 0.2]}, cv=3)
    grid.fit(X, y)
    assert len(grid.cv_results_["params"]) == 4
    assert grid.best_score_ > 0.85
    assert grid.best_estimator_.predict(X).shape == (len(X),)
    rand = RandomizedSearchCV(FastregRegressor(random_state=0, **SMALL),
                              {"l2": loguniform(1e-5, 1e-1), "hidden_layer_sizes": [(8,), (16,)]},
                              n_iter=3, cv=2, random_state=0)
    Xr, yr = _regression()
    rand.fit(Xr, yr)
    assert len(rand.cv_results_["params"]) == 3
    assert all(1e-5 <= p["l2"] <= 1e-1 for p in rand.cv_results_["params"])
    scores = cross_val_score(FastregRegressor(random_state=0, **SMALL), Xr, yr, cv=3)
    assert scores.shape == (3,) and np.all(scores > 0.5)


@pytest.mark.slow
def test_cross_val_score_in_worker_processes_equals_in_process():
    X, y = _regression()
    est = FastregRegressor(random_state=0, **SMALL)
    local = cross_val_score(est, X, y, cv=2, n_jobs=1)
    workers = cross_val_score(est, X, y, cv=2, n_jobs=2)
    np.testing.assert_array_equal(local, workers)


def test_clone_and_pickle():
    X, y = _classification()
    clf = FastregClassifier(random_state=3, **SMALL)
    fresh = clone(clf)
    assert fresh.get_params() == clf.get_params() and not hasattr(fresh, "model_")
    clf.fit(X, y)
    assert not hasattr(clone(clf), "model_")
    back = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))
    assert back.classes_.tolist() == clf.classes_.tolist() and back.n_iter_ == clf.n_iter_
    # the optimizer state travels too: partial_fit continues identically after unpickling
    clf.partial_fit(X, y)
    back.partial_fit(X, y)
    for a, b in zip(back.model_.get_weights(), clf.model_.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_pandas_input_records_feature_names():
    pd = pytest.importorskip("pandas")
    X, y = _regression()
    df = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    est = FastregRegressor(random_state=0, **SMALL).fit(df, pd.Series(y))
    assert est.feature_names_in_.tolist() == ["a", "b", "c", "d"]
    assert est.n_features_in_ == 4
    with pytest.warns(UserWarning, match="feature names"):
        plain = est.predict(X)
    np.testing.assert_array_equal(est.predict(df), plain)
    with pytest.raises(ValueError, match="feature names"):
        est.predict(df[["d", "c", "b", "a"]])
    Xc, yc = _classification()
    clf = FastregClassifier(random_state=0, **SMALL).fit(pd.DataFrame(Xc), pd.Series(yc))
    assert clf.classes_.tolist() == ["cat", "dog", "emu"]


def test_partial_fit_continues_the_optimizer_like_more_epochs():
    X, y = _regression()
    kw = dict(hidden_layer_sizes=(8,), batch_size=32, random_state=1)
    inc = FastregRegressor(**kw)
    inc.partial_fit(X, y)
    inc.partial_fit(X, y)
    full = FastregRegressor(epochs=2, **kw).fit(X, y)
    for a, b in zip(inc.model_.get_weights(), full.model_.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert inc.n_iter_ == 2 and len(inc.history_["loss"]) == 2
    with pytest.raises(ValueError, match="features"):
        inc.partial_fit(X[:, :3], y)
    # partial_fit continues the model as built (as MLP's); a later warm fit applies new layers
    inc.set_params(l2=1e-2)
    inc.partial_fit(X, y)
    assert inc.model_.penalty() == 0 and inc.n_iter_ == 3
    inc.set_params(warm_start=True, epochs=1)
    inc.fit(X, y)
    assert inc.model_.penalty() > 0 and inc.n_iter_ == 4


def test_classifier_partial_fit_needs_classes_and_rejects_unseen_labels():
    X, y = _classification()
    clf = FastregClassifier(random_state=0, **SMALL)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X, y)
    # the first batch need not show every class
    some = y != "emu"
    clf.partial_fit(X[some], y[some], classes=["cat", "dog", "emu"])
    assert clf.classes_.tolist() == ["cat", "dog", "emu"] and clf.model_.n_outputs == 3
    clf.partial_fit(X, y)
    with pytest.raises(ValueError, match="not seen"):
        clf.partial_fit(X[:5], np.array(["cat", "gnu", "dog", "cat", "dog"], dtype=object))
    with pytest.raises(ValueError, match="not in classes"):
        FastregClassifier().partial_fit(X, y, classes=["cat", "dog"])


def test_warm_start_keeps_the_weights_with_a_fresh_optimizer():
    X, y = _regression()
    kw = dict(hidden_layer_sizes=(8,), batch_size=32, learning_rate=1e-2, random_state=2)
    est = FastregRegressor(epochs=3, warm_start=True, **kw).fit(X, y)
    est.set_params(epochs=2, learning_rate=5e-3)
    est.fit(X, y)
    assert est.n_iter_ == 5 and len(est.history_["loss"]) == 5
    ref = fr.Sequential([fr.Dense(8, "relu"), fr.Dense(1)], input_dim=4, seed=2,
                        dtype="float64")
    ref.compile(loss="mse", optimizer=fr.Adam(1e-2))
    ref.fit(X, y, epochs=3, batch_size=32, verbose=0)
    ref.compile(loss="mse", optimizer=fr.Adam(5e-3))    # MLP's warm start: a new optimizer
    ref.fit(X, y, epochs=2, batch_size=32, verbose=0)
    for a, b in zip(est.model_.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(a, b)
    # a changed penalty applies to the next warm fit, from the fitted weights
    before = est.model_.get_weights()
    est.set_params(l2=1e-2, epochs=1)
    est.fit(X, y)
    assert est.model_.penalty() > 0 and est.n_iter_ == 6
    redo = fr.Sequential([fr.Dense(8, "relu", regularizer=fr.L2(1e-2)),
                          fr.Dense(1, regularizer=fr.L2(1e-2))], input_dim=4, seed=2,
                         dtype="float64")
    redo.set_weights(before)
    redo.compile(loss="mse", optimizer=fr.Adam(5e-3))
    redo.fit(X, y, epochs=1, batch_size=32, verbose=0)
    for a, b in zip(est.model_.get_weights(), redo.get_weights()):
        np.testing.assert_array_equal(a, b)
    est.set_params(hidden_layer_sizes=(4,))
    with pytest.raises(ValueError, match="warm_start"):
        est.fit(X, y)
    # without warm_start a second fit starts over
    cold = FastregRegressor(epochs=3, **kw).fit(X, y)
    assert cold.fit(X, y).n_iter_ == 3


def test_early_stopping_restores_the_best_weights_of_a_seeded_hold_out():
    X, y = _classification(300)
    clf = FastregClassifier(hidden_layer_sizes=(32,), epochs=60, learning_rate=3e-2,
                            early_stopping=True, validation_fraction=0.2, patience=3,
                            random_state=4).fit(X, y)
    val = clf.history_["val_loss"]
    assert len(val) == clf.n_iter_ == len(clf.history_["loss"])
    codes = np.searchsorted(clf.classes_, y)
    _, X_val, _, y_val = train_test_split(X, codes, test_size=0.2, random_state=4,
                                          stratify=codes)
    assert clf.model_.evaluate(X_val, y_val) == pytest.approx(min(val), rel=1e-9)


@pytest.mark.parametrize("params, match", [
    ({"hidden_layer_sizes": (0,)}, "hidden_layer_sizes"),
    ({"hidden_layer_sizes": "big"}, "hidden_layer_sizes"),
    ({"activation": "gelu"}, "activation"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"epochs": 0}, "epochs"),
    ({"early_stopping": True, "validation_fraction": 1.5}, "validation_fraction"),
    ({"dropout": 1.0}, "dropout"),
    ({"l2": -1.0}, "L2"),
    ({"dtype": "int8"}, "dtype"),
    ({"backend": "abacus"}, "backend"),
])
def test_bad_parameters_are_named_at_fit_and_leave_it_unfitted(params, match):
    X, y = _regression(32)
    est = FastregRegressor(**params)     # __init__ only stores
    with pytest.raises(ValueError, match=match):
        est.fit(X, y)
    with pytest.raises(NotFittedError):
        check_is_fitted(est)


def test_a_failed_fit_leaves_the_fitted_estimator_as_it_was():
    X, y = _classification()
    clf = FastregClassifier(random_state=0, **SMALL).fit(X, y)
    before = clf.predict_proba(X)
    with pytest.raises(ValueError, match="at least 2 classes"):
        clf.fit(X[:, :2], np.array(["a"] * len(X)))          # new width, one class
    assert clf.n_features_in_ == 3 and clf.classes_.tolist() == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(clf.predict_proba(X), before)
    fresh = FastregClassifier(**SMALL)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fresh.fit(X, np.array(["a"] * len(X)))
    with pytest.raises(NotFittedError):
        check_is_fitted(fresh)


def test_one_class_is_refused_with_a_clear_message():
    X, _ = _classification(20)
    with pytest.raises(ValueError, match="at least 2 classes"):
        FastregClassifier().fit(X, np.array(["a"] * 20))


def test_sample_weight_is_a_weighted_average_and_follows_the_hold_out():
    X, y = _regression(n=120)
    w = np.random.default_rng(1).integers(0, 3, 120).astype(float)
    weighted = FastregRegressor(hidden_layer_sizes=(8,), epochs=5, batch_size=500,
                                random_state=0).fit(X, y, sample_weight=w)
    repeated = FastregRegressor(hidden_layer_sizes=(8,), epochs=5, batch_size=500,
                                random_state=0).fit(np.repeat(X, w.astype(int), axis=0),
                                                    np.repeat(y, w.astype(int)))
    np.testing.assert_allclose(weighted.predict(X), repeated.predict(X), rtol=1e-5, atol=1e-6)
    stopped = FastregClassifier(hidden_layer_sizes=(8,), epochs=3, early_stopping=True,
                                random_state=0)
    Xc, yc = _classification(n=120)
    stopped.fit(Xc, yc, sample_weight=np.linspace(0.5, 1.5, 120))
    assert len(stopped.history_["val_loss"]) == stopped.n_iter_
    with pytest.raises(ValueError, match="non-zero"):
        FastregRegressor(epochs=1).fit(X, y, sample_weight=np.zeros(120))
