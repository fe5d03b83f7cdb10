"""fr.sweep / fr.regularization_path under joblib backends (loky, a real dask LocalCluster,
Ray) and random search (n_iter, distributions)."""
import importlib
import os

import numpy as np
import pytest
from scipy.stats import loguniform

import fastreg as fr

sweeps = importlib.import_module("fastreg.sweep")

joblib = pytest.importorskip("joblib")


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, 2)).astype(np.float32)
    y = np.sin(2 * x[:, :1]) + 0.3 * x[:, 1:] + 0.05 * rng.standard_normal((n, 1))
    return x, y.astype(np.float32)


def build(l2=0.0, dropout=0.0, seed=0):
    """A compiled model that also remembers which process built it."""
    model = fr.Sequential([fr.Dense(16, "leaky_relu", dropout=dropout,
                                    regularizer=fr.L2(l2) if l2 else None),
                           fr.Dense(1)], input_dim=2, seed=seed)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numba")
    model.built_in_pid = os.getpid()
    return model


def build_l1(lam, seed=0):
    model = fr.Sequential([fr.Dense(16, "tanh", regularizer=fr.L1(lam)), fr.Dense(1)],
                          input_dim=2, seed=seed)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numba")
    model.built_in_pid = os.getpid()
    return model


GRID = {"l2": [0.0, 1e-2], "dropout": [0.0, 0.2]}


def _kw():
    X, y = _data()
    Xv, yv = _data(64, seed=1)
    return X, y, dict(validation_data=(Xv, yv), epochs=3, batch_size=32, seed=5,
                      as_frame=False)


def _results(rows):
    """What a row computed: every column but those that say how it ran."""
    return [{k: v for k, v in r.items() if k not in sweeps.RUN_COLUMNS} for r in rows]


def assert_same_table(local, other):
    assert _results(local) == _results(other)    # bitwise: floats compared with ==


# ------------------------------------------------------------------ random search
def test_random_points_are_seeded_and_drawn_from_the_distributions():
    pytest.importorskip("sklearn")
    dists = {"l2": loguniform(1e-6, 1e-1)}
    grid = {"dropout": [0.0, 0.1, 0.2]}
    a = sweeps.sample_points(grid, dists, 12, seed=3)
    assert a == sweeps.sample_points(grid, dists, 12, seed=3)
    assert a != sweeps.sample_points(grid, dists, 12, seed=4)
    assert len(a) == 12 and all(list(p) == ["dropout", "l2"] for p in a)
    assert all(1e-6 <= p["l2"] <= 1e-1 and p["dropout"] in grid["dropout"] for p in a)
    assert len({p["l2"] for p in a}) == 12                     # continuous: all distinct
    # log-uniform: about as many draws per decade; the median decade is near the middle
    assert 1e-5 < float(np.median([p["l2"] for p in a])) < 1e-2
    # a space of lists only is sampled without replacement, at most its size
    small = sweeps.sample_points({"l2": [0.0, 1e-3], "dropout": [0.0, 0.5]}, None, 10, seed=0)
    assert len(small) == 4 and len({tuple(p.values()) for p in small}) == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"distributions": {"l2": loguniform(1e-4, 1e-1)}}, "n_iter"),
    ({"n_iter": 0, "distributions": {"l2": [0.1]}}, "n_iter"),
    ({"n_iter": 2, "distributions": {"l2": "big"}}, "scipy.stats"),
    ({"n_iter": 2, "distributions": {"l2": []}}, "no values"),
    ({"n_iter": 2, "grid": {"l2": [0.1]}, "distributions": {"l2": [0.2]}}, "both"),
    ({"n_iter": 2, "grid": None}, "distributions"),
])
def test_random_search_arguments_are_checked(kwargs, match):
    pytest.importorskip("sklearn")
    X, y = _data(32)
    kwargs = dict(kwargs)
    grid = kwargs.pop("grid", None)
    with pytest.raises(ValueError, match=match):
        sweeps.sweep(build, grid, X, y, **kwargs)


def test_random_search_table_rows_are_the_drawn_points():
    pytest.importorskip("sklearn")
    X, y, kw = _kw()
    dists = {"l2": loguniform(1e-5, 1e-1)}
    table = sweeps.sweep(build, {"dropout": [0.0, 0.2]}, X, y, n_iter=3, distributions=dists,
                         n_jobs=1, **kw)
    points = sweeps.sample_points({"dropout": [0.0, 0.2]}, dists, 3, seed=kw["seed"])
    assert [{k: r[k] for k in ("dropout", "l2")} for r in table] == points
    assert [r["seed"] for r in table] == [sweeps.point_seed(kw["seed"], p) for p in points]
    assert all(r["final_penalty"] > 0 for r in table)


def test_n_jobs_is_checked_and_sweep_needs_data():
    X, y = _data(32)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="n_jobs"):
            sweeps.sweep(build, GRID, X, y, n_jobs=bad)
    with pytest.raises(ValueError, match="training data"):
        sweeps.sweep(build, GRID)


def test_worker_threads_outside_any_cluster_divide_this_machines_cores():
    cores = sweeps.cpu_cores()
    assert sweeps.worker_threads(1) == cores
    assert sweeps.worker_threads(2) == max(1, cores // 2)
    assert sweeps.worker_threads(10 * cores) == 1


# ------------------------------------------------------------------ loky (local processes)
@pytest.mark.slow
def test_the_active_parallel_config_is_honoured():
    X, y, kw = _kw()
    local = sweeps.sweep(build, GRID, X, y, n_jobs=1, **kw)
    with joblib.parallel_config(backend="loky", n_jobs=2):
        # n_jobs=None takes the config's 2 local processes, each sizing its own threads
        rows, models = sweeps.sweep(build, GRID, X, y, return_models=True, **kw)
    assert_same_table(local, rows)
    assert {m.built_in_pid for m in models}.isdisjoint({os.getpid()})
    assert all(r["threads"] == max(1, sweeps.cpu_cores() // 2) for r in rows)
    assert all(r["threads"] == sweeps.cpu_cores() for r in local)


# ------------------------------------------------------------------ dask.distributed
@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("dask")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.mark.slow
def test_sweep_on_a_dask_cluster_equals_the_local_table(dask_client):
    X, y, kw = _kw()
    local = sweeps.sweep(build, GRID, X, y, n_jobs=1, **kw)
    worker_pids = set(dask_client.run(os.getpid).values())
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    with joblib.parallel_config(backend="dask"):
        rows, models = sweeps.sweep(build, GRID, X, y, return_models=True, **kw)
    assert_same_table(local, rows)
    assert {m.built_in_pid for m in models} <= worker_pids      # trained on the workers
    # each worker sized its pools from its own machine: the cores over the 2 dask threads
    # on this host (the local run used every core)
    assert all(r["threads"] == max(1, sweeps.cpu_cores() // 2) for r in rows)
    assert all(r["threads"] == sweeps.cpu_cores() for r in local)
    for m, r in zip(models, rows):
        assert m.evaluate(*kw["validation_data"]) == r["final_val_loss"]


@pytest.mark.slow
def test_random_search_on_a_dask_cluster_equals_the_local_one(dask_client):
    pytest.importorskip("sklearn")
    X, y, kw = _kw()
    dists = {"l2": loguniform(1e-5, 1e-1), "dropout": [0.0, 0.1, 0.3]}
    local = sweeps.sweep(build, None, X, y, n_iter=4, distributions=dists, n_jobs=1, **kw)
    with joblib.parallel_config(backend="dask"):
        remote = sweeps.sweep(build, None, X, y, n_iter=4, distributions=dists, n_jobs=-1, **kw)
    assert_same_table(local, remote)


@pytest.mark.slow
def test_regularization_path_runs_as_one_task_on_a_dask_worker(dask_client):
    X, y, kw = _kw()
    path_kw = dict(kw, epochs=4, warm_epochs=2, return_models=True)
    local, _ = sweeps.regularization_path(build_l1, [1e-1, 1e-2, 1e-3], X, y, **path_kw)
    seen = []
    with joblib.parallel_config(backend="dask"):
        remote, models = sweeps.regularization_path(build_l1, [1e-1, 1e-2, 1e-3], X, y,
                                                    progress=lambda i, n, row: seen.append(i),
                                                    **path_kw)
    assert _results(local) == _results(remote)
    assert [r["start"] for r in remote] == ["init", "warm", "warm"]
    worker_pids = set(dask_client.run(os.getpid).values())
    assert len({m.built_in_pid for m in models}) == 1          # one chain, one task
    assert {m.built_in_pid for m in models} <= worker_pids
    assert seen == [1, 2, 3]


# ------------------------------------------------------------------ Ray
@pytest.mark.slow
# Ray starts its processes with fork + exec; Python warns about the fork when JAX (imported by
# the Keras export tests) has threads, but the child execs at once
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_sweep_under_rays_joblib_backend_equals_the_local_table():
    ray = pytest.importorskip("ray")
    from ray.util.joblib import register_ray
    X, y, kw = _kw()
    local = sweeps.sweep(build, GRID, X, y, n_jobs=1, **kw)
    # Ray's workers do not inherit sys.path: this module (build) must be importable there
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}})
    try:
        register_ray()
        with joblib.parallel_config(backend="ray"):
            rows, models = sweeps.sweep(build, GRID, X, y, n_jobs=-1, return_models=True, **kw)
    finally:
        ray.shutdown()
    assert_same_table(local, rows)
    assert os.getpid() not in {m.built_in_pid for m in models}
    assert all(r["threads"] == 1 for r in rows)      # Ray assigned each task one CPU
