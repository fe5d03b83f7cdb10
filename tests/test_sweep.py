"""fr.sweep and fr.regularization_path (fastreg/sweep.py)."""
import numpy as np
import pytest

import importlib

import fastreg as fr

# the module, not the function fr.sweep that shadows it as a package attribute
sweeps = importlib.import_module("fastreg.sweep")

pytest.importorskip("joblib")


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, 2)).astype(np.float32)
    y = (np.sin(2 * x[:, :1]) + 0.3 * x[:, 1:] + 0.05 * rng.standard_normal((n, 1)))
    return x, y.astype(np.float32)


def build(l2=0.0, dropout=0.0, seed=0):
    model = fr.Sequential([fr.Dense(16, "leaky_relu", dropout=dropout,
                                    regularizer=fr.L2(l2) if l2 else None),
                           fr.Dense(1)], input_dim=2, seed=seed)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numba")
    return model


def build_no_seed(l2=0.0):
    return build(l2=l2, seed=123)


def build_l1(lam):
    model = fr.Sequential([fr.Dense(16, "tanh", regularizer=fr.L1(lam)), fr.Dense(1)],
                          input_dim=2, seed=3)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numba")
    return model


def test_expand_grid_is_the_cartesian_product_in_order():
    pts = sweeps.expand_grid({"l2": [0, 1], "dropout": [0.0, 0.1, 0.2]})
    assert len(pts) == 6
    assert pts[0] == {"l2": 0, "dropout": 0.0} and pts[1] == {"l2": 0, "dropout": 0.1}
    assert sweeps.expand_grid([{"a": 1}]) == [{"a": 1}]
    with pytest.raises(ValueError):
        sweeps.expand_grid({"l2": []})
    with pytest.raises(ValueError):
        sweeps.expand_grid({})


def test_point_seed_depends_on_the_point_not_the_order():
    a = sweeps.point_seed(0, {"l2": 0.1, "dropout": 0.0})
    assert a == sweeps.point_seed(0, {"dropout": 0.0, "l2": 0.1})
    assert a != sweeps.point_seed(0, {"l2": 0.2, "dropout": 0.0})
    assert a != sweeps.point_seed(1, {"l2": 0.1, "dropout": 0.0})
    assert sweeps.point_seed(0, {"seed": 7, "l2": 1}) == 7
    assert 0 <= a < 2 ** 63


@pytest.mark.slow
def test_sweep_is_deterministic_across_n_jobs():
    X, y = _data()
    Xv, yv = _data(64, seed=1)
    grid = {"l2": [0.0, 1e-2], "dropout": [0.0, 0.2]}
    kw = dict(validation_data=(Xv, yv), epochs=3, batch_size=32, seed=5, as_frame=False)
    t1 = sweeps.sweep(build, grid, X, y, n_jobs=1, **kw)
    t2, models = sweeps.sweep(build, grid, X, y, n_jobs=2, return_models=True, **kw)
    assert [r["l2"] for r in t1] == [0.0, 0.0, 1e-2, 1e-2]
    for r1, r2 in zip(t1, t2):
        for key in ("final_loss", "best_loss", "final_val_loss", "best_val_loss",
                    "final_penalty", "seed", "epochs_run", "best_epoch"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-6, abs=1e-9), key
    assert len({r["seed"] for r in t1}) == 4  # each point its own seed
    assert all(r["final_penalty"] > 0 for r in t1 if r["l2"] > 0)
    assert all(len(m.history.history["loss"]) == 3 for m in models)


def test_sweep_table_columns_and_seed_without_a_seed_parameter():
    X, y = _data(128)
    table = sweeps.sweep(build_no_seed, {"l2": [0.0, 1e-3]}, X, y, epochs=1, batch_size=64,
                         n_jobs=1, seed=0)
    rows = table.to_dict("records") if hasattr(table, "to_dict") else table
    assert list(rows[0])[:1] == ["l2"]
    for col in sweeps.METRIC_COLUMNS:
        assert col in rows[0]
    assert np.isnan(rows[0]["final_val_loss"])  # no validation data
    # build ignores seeds: the derived point seed was set on the model and it was rebuilt
    assert rows[0]["seed"] == sweeps.point_seed(0, {"l2": 0.0})
    again = sweeps.sweep(build_no_seed, {"l2": [0.0]}, X, y, epochs=1, batch_size=64, seed=0,
                         as_frame=False)
    assert again[0]["final_loss"] == rows[0]["final_loss"]


def test_sweep_validates_its_arguments():
    X, y = _data(32)
    with pytest.raises(TypeError):
        sweeps.sweep("not callable", {"l2": [0]}, X, y)
    with pytest.raises(ValueError):
        sweeps.sweep(build, {"l2": [0]}, X, y, n_jobs=0)
    with pytest.raises(ValueError):
        sweeps.sweep(lambda l2: fr.Sequential([fr.Dense(1)], input_dim=2), {"l2": [0]}, X, y)


def test_warm_start_path_first_point_equals_an_independent_fit():
    X, y = _data(192)
    Xv, yv = _data(64, seed=2)
    lambdas = [1e-3, 1e-1, 1e-2]
    table, models = sweeps.regularization_path(build_l1, lambdas, X, y, validation_data=(Xv, yv),
                                               epochs=4, warm_epochs=2, batch_size=32, seed=9,
                                               return_models=True, as_frame=False)
    assert [r["lambda"] for r in table] == [1e-1, 1e-2, 1e-3]  # strongest first
    assert [r["start"] for r in table] == ["init", "warm", "warm"]
    assert [r["warm_start"] for r in table] == [False, True, True]
    assert [r["epochs_run"] for r in table] == [4, 2, 2]
    solo = build_l1(1e-1)
    solo.seed = 9
    solo.build(2)
    solo.fit(X, y, epochs=4, batch_size=32, validation_data=(Xv, yv), verbose=0)
    for a, b in zip(models[0].get_weights(), solo.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert table[0]["final_val_loss"] == pytest.approx(solo.evaluate(Xv, yv), rel=1e-6)
    # proximal L1 gives exact zeros, more of them at the stronger penalty
    assert table[0]["sparsity"] > 0
    assert table[0]["sparsity"] >= table[-1]["sparsity"]
    assert table[0]["weight_norm"] <= table[-1]["weight_norm"]
    sparsity, norm, zeros, n = sweeps.kernel_stats(models[0])
    assert zeros == table[0]["n_zero"] and n == 2 * 16 + 16


def test_warm_start_continues_from_the_previous_weights():
    X, y = _data(128)
    seen = []

    class Spy(fr.Callback):
        def on_train_begin(self, logs=None):
            seen.append([w.copy() for w in self.model.get_weights()])

    table, models = sweeps.regularization_path(build_l1, [1e-2, 1e-3], X, y, epochs=2,
                                               batch_size=64, fit_kwargs={"callbacks": [Spy()]},
                                               return_models=True, as_frame=False)
    for a, b in zip(seen[1], models[0].get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        sweeps.regularization_path(build_l1, [], X, y)


def test_a_collapsed_solution_is_not_warm_started():
    X, y = _data(128)
    # L1 of 10 zeroes every kernel: the null model, a stationary point for any penalty
    table, models = sweeps.regularization_path(build_l1, [10.0, 1e-4], X, y, epochs=5,
                                               warm_epochs=2, batch_size=32,
                                               return_models=True, as_frame=False)
    assert table[0]["sparsity"] > 0.5 and sweeps.collapsed(models[0], X)
    assert table[1]["start"] == "restart" and table[1]["epochs_run"] == 5
    assert not sweeps.collapsed(models[1], X)
    kept, _ = sweeps.regularization_path(build_l1, [10.0, 1e-4], X, y, epochs=5, warm_epochs=2,
                                         batch_size=32, restart_collapsed=False,
                                         return_models=True, as_frame=False)
    assert kept[1]["start"] == "warm"


def test_a_nearly_dead_layer_counts_as_collapsed():
    X, y = _data(256)
    model = build()
    W = model.get_weights()
    W[0][:, 1:] = 0.0                      # one live unit of 16: the penalty's bottleneck
    model.set_weights(W)
    assert sweeps.live_units(model) == [1]
    assert sweeps.collapsed(model, X)
    assert not sweeps.collapsed(model, X, min_live_fraction=0.0)   # output not constant
    model.fit(X, y, epochs=5, batch_size=32, verbose=0)       # no penalty: units revive
    assert sweeps.live_units(model) == [16] and not sweeps.collapsed(model, X)
