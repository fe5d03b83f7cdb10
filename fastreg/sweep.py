"""Seeing what regularization does, part 1: sweeps over a grid and regularization paths.

    table = fr.sweep(build, {"l2": [0, 1e-4, 1e-3], "dropout": [0, 0.1]}, X, y,
                     validation_data=(Xv, yv), epochs=50, batch_size=128, n_jobs=2, seed=0)
    table = fr.sweep(build, {"dropout": [0, 0.1]}, X, y, n_iter=20, seed=0,   # random search
                     distributions={"l2": scipy.stats.loguniform(1e-6, 1e-1)})
    path = fr.regularization_path(build_l1, [1e-2, 1e-3, 1e-4], X, y,
                                  validation_data=(Xv, yv), epochs=50, warm_epochs=15)

`build(**point)` returns a compiled Sequential for one grid point.

Where the points run: through joblib, under whatever backend is active. With n_jobs > 1 and
no `joblib.parallel_config`, each point trains in its own local process (loky); inside
`with joblib.parallel_config(backend="dask"):` (a `dask.distributed.Client` connected) or
Ray's joblib backend (`ray.util.joblib.register_ray()`, backend="ray") they train on that
cluster's workers. n_jobs=None takes joblib's active setting: the n_jobs given to
parallel_config, else the backend's default (dask: every worker thread of the cluster; loky
and Ray: 1, so pass n_jobs=-1 for every CPU Ray has); -1 asks the backend for every slot. As
in joblib, a backend that offers one slot runs the points in this process. A regularization path is a
chain of warm starts, so it runs as one task: in this process, or on a worker of the active
backend when that offers more than one slot.

Determinism: a point's model is seeded from (seed, point), never from the worker or the
order in which points finish, so the table is the same for any n_jobs and any backend
(every column but time_s and threads, which say how it ran). The seed reaches the model in
one of three ways: a "seed" key in the grid is used as is; a `build` with a `seed`
parameter receives the derived seed; otherwise the derived seed is set on the returned model
(re-initialising its weights if `build` already created them). Random-search points are drawn
in this process (scikit-learn's ParameterSampler, seeded by `seed`) before any is sent out.

Threads: Numba's pool, NumPy's OpenBLAS and SciPy's OpenBLAS all live in each worker. Each
fit sizes them where it runs, from that machine's own cores (worker_threads): a Ray task
uses the CPUs Ray assigned it; a dask task its machine's cores divided by the dask worker
threads on that machine; a local process (loky) or this process the cores divided by the
jobs running here. numba.set_num_threads plus threadpoolctl apply it, so parallel fits never
oversubscribe a machine. Results do not depend on it (DESIGN.md: threads never change
results); the table's `threads` column records it.

The table is a pandas DataFrame when pandas is installed (the `sweep` extra), else a list of
dicts with the same keys.
"""
import inspect
import itertools
import json
import math
import os
import sys
import time
import zlib
from contextlib import contextmanager

import numpy as np

METRIC_COLUMNS = ("final_loss", "best_loss", "final_val_loss", "best_val_loss", "best_epoch",
                  "final_penalty", "epochs_run", "time_s", "threads", "seed")
RUN_COLUMNS = ("time_s", "threads")   # how a point ran, not what it computed


# ------------------------------------------------------------------ grid and seeds
def expand_grid(grid):
    """A dict of lists -> the cartesian product as a list of dicts (keys in the given order).

    A list of dicts is taken as explicit points. Scalars are taken as one-value lists.
    """
    if isinstance(grid, (list, tuple)):
        points = [dict(p) for p in grid]
        if not points or not all(isinstance(p, dict) for p in grid):
            raise ValueError("grid must be a non-empty dict of lists or a list of dicts")
        return points
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid must be a non-empty dict such as {{'l2': [0, 1e-3]}}, got "
                         f"{grid!r}")
    keys, values = [], []
    for key, vals in grid.items():
        if not isinstance(key, str):
            raise ValueError(f"grid keys must be strings (build's keyword arguments), got "
                             f"{key!r}")
        if isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__"):
            vals = [vals]
        vals = list(vals)
        if not vals:
            raise ValueError(f"grid entry {key!r} has no values")
        keys.append(key)
        values.append(vals)
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def sample_points(grid, distributions, n_iter, seed):
    """n_iter random points: each key of `distributions` (scipy.stats distributions, or
    lists) and of `grid` (lists) drawn by scikit-learn's ParameterSampler, seeded by `seed`
    (a list-only space is sampled without replacement, at most its size). Keys keep their
    order: the grid's, then the distributions'."""
    from .validation import check_positive_int
    n_iter = check_positive_int("n_iter", n_iter)
    space = {}
    for source, entries in (("grid", grid), ("distributions", distributions)):
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ValueError(f"{source} must be a dict {{name: values}} for random search, got "
                             f"{entries!r}")
        for key, values in entries.items():
            if not isinstance(key, str):
                raise ValueError(f"{source} keys must be strings (build's keyword arguments), "
                                 f"got {key!r}")
            if key in space:
                raise ValueError(f"{key!r} is both in grid and in distributions")
            if hasattr(values, "rvs"):
                space[key] = values
            elif isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                if source == "distributions":
                    raise ValueError(f"distributions[{key!r}] must be a scipy.stats "
                                     f"distribution (with .rvs) or a list, got {values!r}")
                space[key] = [values]
            else:
                space[key] = list(values)
                if not space[key]:
                    raise ValueError(f"{source} entry {key!r} has no values")
    if not space:
        raise ValueError("random search needs distributions (or a grid) to draw from")
    try:
        from sklearn.model_selection import ParameterSampler
    except ImportError as exc:
        raise ImportError("random search (n_iter=...) draws with scikit-learn's "
                          "ParameterSampler: pip install \"fastreg[sweep]\"") from exc
    state = np.random.SeedSequence([int(seed), zlib.crc32(b"fastreg random search")])
    sampler = ParameterSampler(space, n_iter,
                               random_state=int(state.generate_state(1, np.uint32)[0]))
    import warnings
    with warnings.catch_warnings():   # a list-only space smaller than n_iter: all its points
        warnings.simplefilter("ignore", UserWarning)
        drawn = list(sampler)
    return [{k: _plain(p[k]) for k in space} for p in drawn]


def _plain(value):
    """A JSON-friendly version of a grid value (numpy scalars to Python numbers)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def point_seed(seed, point):
    """The model seed of one grid point: a pure function of (seed, point)."""
    if "seed" in point:
        return int(point["seed"])
    text = json.dumps({k: _plain(v) for k, v in point.items()}, sort_keys=True, default=repr)
    words = np.random.SeedSequence([int(seed), zlib.crc32(text.encode())]).generate_state(
        2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1  # < 2**63


def _seeded_model(build, kwargs, seed, seed_in_kwargs):
    """Call build and make sure the model it returns uses `seed`."""
    from .model import Sequential
    accepts_seed = _accepts(build, "seed")
    if accepts_seed and not seed_in_kwargs:
        model = build(**kwargs, seed=seed)
    else:
        model = build(**kwargs)
    if not isinstance(model, Sequential):
        raise TypeError(f"build must return a fastreg Sequential, got {type(model).__name__}")
    if model.loss is None:
        raise ValueError("build must return a compiled model (call model.compile(...) in "
                         "build)")
    if model.seed != seed:
        model.seed = int(seed)
        if model.built:
            model.build(model.input_dim)  # fresh weights from the point's seed
    return model


def _accepts(fn, name):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


# ------------------------------------------------------------------ threads
def cpu_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(n_jobs):
    return max(1, cpu_cores() // max(1, n_jobs))


def worker_threads(local_jobs=1):
    """Threads one fit may use where it runs, from that machine's own resources: the CPUs Ray
    assigned this task; in a dask worker, this machine's cores over the dask worker threads
    on it (every worker process on the host counted, from the scheduler's view); else
    (this process, a local loky/multiprocessing pool) the cores over `local_jobs`, the jobs
    running on this machine at once."""
    granted = _ray_assigned_cpus()
    if granted:
        return granted
    slots = _dask_host_slots()
    if slots:
        return max(1, cpu_cores() // slots)
    return threads_per_job(local_jobs)


def _ray_assigned_cpus():
    ray = sys.modules.get("ray")      # never imported here: only inside a Ray worker
    if ray is None:
        return 0
    try:
        if not ray.is_initialized():
            return 0
        context = ray.get_runtime_context()
        if context.worker.mode != ray.WORKER_MODE:
            return 0      # the driver: no assignment
        return int(context.get_assigned_resources().get("CPU", 0))
    except Exception:     # an older or newer Ray without these calls: fall back
        return 0


def _dask_host_slots():
    if "distributed" not in sys.modules:
        return 0
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):   # ValueError: not in a dask worker
        return 0
    slots = int(worker.state.nthreads)
    try:
        info = worker.client.scheduler_info(n_workers=-1)
        host = worker.address.rsplit(":", 1)[0]
        on_host = [w["nthreads"] for addr, w in info["workers"].items()
                   if addr.rsplit(":", 1)[0] == host]
        slots = max(slots, int(sum(on_host)))
    except Exception:    # no scheduler view: this worker's own threads
        pass
    return slots


@contextmanager
def limited_threads(n):
    """Numba's pool and every BLAS pool limited to n threads for the duration."""
    if "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = str(n)  # read once, when numba is first imported
    import numba
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a core dependency
        threadpool_limits = None
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(limits=n):
                yield
    finally:
        numba.set_num_threads(previous)


def _check_jobs(n_jobs):
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0 \
            or n_jobs < -1:
        raise ValueError(f"n_jobs must be None (joblib's active setting), a positive integer "
                         f"or -1 (every slot of the backend), got {n_jobs!r}")
    return int(n_jobs)


def _resolve_jobs(n_jobs, n_points):
    """How many points run at once: 1 (this process) or what the active joblib backend
    offers for n_jobs (joblib.effective_n_jobs), at most n_points."""
    n_jobs = _check_jobs(n_jobs)
    if n_jobs == 1:
        return 1
    try:
        import joblib
    except ImportError as exc:
        if n_jobs is None:
            return 1
        raise ImportError("n_jobs other than 1 needs joblib: pip install \"fastreg[sweep]\" "
                          "(or pass n_jobs=1)") from exc
    return max(1, min(int(joblib.effective_n_jobs(n_jobs)), n_points))


def _run_on_backend(fn, calls, n_jobs):
    """fn(*args) for each args in calls through joblib.Parallel under the active backend;
    yields the results in order."""
    from joblib import Parallel, delayed
    try:
        parallel = Parallel(n_jobs=n_jobs, return_as="generator")
    except ValueError:    # a backend that cannot stream results: all at the end
        parallel = Parallel(n_jobs=n_jobs)
    yield from parallel(delayed(fn)(*args) for args in calls)


# ------------------------------------------------------------------ one fit
def _summary(history):
    h = history.history
    loss = h.get("loss", [])
    val = h.get("val_loss")
    row = {"final_loss": _f(loss[-1]) if loss else math.nan,
           "best_loss": _f(min(loss)) if loss else math.nan,
           "final_val_loss": _f(val[-1]) if val else math.nan,
           "best_val_loss": _f(min(val)) if val else math.nan,
           "final_penalty": _f(h["penalty"][-1]) if h.get("penalty") else math.nan,
           "epochs_run": len(loss)}
    track = val if val else loss
    row["best_epoch"] = int(np.argmin(track)) + 1 if track else 0
    return row


def _f(x):
    return float(x)


def _fit_point(build, point, X, y, validation_data, epochs, batch_size, seed, local_jobs,
               fit_kwargs, return_model):
    """Train one grid point (in a worker or in this process), with the threads this machine
    gives it (worker_threads); returns (row, model|None)."""
    threads = worker_threads(local_jobs)
    with limited_threads(threads):
        t0 = time.perf_counter()
        pseed = point_seed(seed, point)
        model = _seeded_model(build, point, pseed, "seed" in point)
        history = model.fit(X, y, epochs=epochs, batch_size=batch_size,
                            validation_data=validation_data, verbose=0, **(fit_kwargs or {}))
        elapsed = time.perf_counter() - t0
    row = {k: _plain(v) for k, v in point.items()}
    row.update(_summary(history))
    row["time_s"] = elapsed
    row["threads"] = threads
    row["seed"] = pseed
    row = {**{k: row[k] for k in point}, **{k: row[k] for k in METRIC_COLUMNS}}
    return row, (model if return_model else None)


def _table(rows, as_frame):
    if as_frame is False:
        return rows
    try:
        import pandas as pd
    except ImportError:
        if as_frame:
            raise ImportError("as_frame=True needs pandas: pip install \"fastreg[sweep]\"")
        return rows
    return pd.DataFrame(rows)


def _check_common(epochs, batch_size, validation_data, seed=0):
    from .validation import check_positive_int, check_seed
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    check_seed("seed", seed)
    if validation_data is not None and (not isinstance(validation_data, (tuple, list))
                                        or len(validation_data) != 2):
        raise ValueError("validation_data must be a tuple (X_val, y_val)")


# ------------------------------------------------------------------ sweep
def sweep(build, grid=None, X=None, y=None, validation_data=None, epochs=10, batch_size=32,
          n_jobs=None, seed=0, fit_kwargs=None, return_models=False, progress=None,
          as_frame=None, n_iter=None, distributions=None):
    """Train one model per point, n_jobs at a time, under the active joblib backend.

    Points: the cartesian product of `grid` (a dict of lists, or a list of dicts), or, with
    n_iter=N, N random points (random search): every key of `distributions` (scipy.stats
    distributions such as loguniform(1e-6, 1e-1), or lists) and of `grid` (lists) drawn by
    scikit-learn's ParameterSampler, seeded by `seed`.

    Returns a table with one row per point, in grid (or draw) order: the point's parameters,
    then final_loss / best_loss (training data loss per epoch, penalty excluded),
    final_val_loss / best_val_loss (nan without validation_data), best_epoch (1-based, by
    val_loss when there is one), final_penalty, epochs_run, time_s (wall seconds of that
    point), threads (the threads its fit used where it ran) and seed (the model seed used).
    A DataFrame when pandas is installed (as_frame=None), else a list of dicts;
    as_frame=False forces the list.

    n_jobs: None (default) takes joblib's active setting (1 outside a
    joblib.parallel_config; every worker thread under backend="dask"; 1 under "ray"), -1
    every slot of the backend, 1 this process. The table does not depend on it (module
    docstring).

    return_models=True returns (table, models): the trained models (with .history), in grid
    order. progress: optional callable(done, total, row), called as each point finishes.
    fit_kwargs: extra keyword arguments for model.fit (e.g. shuffle, callbacks: callbacks are
    copied into each worker, so stateful ones start fresh per point).
    """
    if not callable(build):
        raise TypeError("build must be a callable: build(**point) -> compiled Sequential")
    if X is None or y is None:
        raise ValueError("sweep needs the training data: sweep(build, grid, X, y, ...)")
    _check_common(epochs, batch_size, validation_data, seed)
    if n_iter is not None:
        points = sample_points(grid, distributions, n_iter, seed)
    elif distributions is not None:
        raise ValueError("distributions are for random search: pass n_iter (how many points "
                         "to draw) too")
    else:
        points = expand_grid(grid)
    jobs = _resolve_jobs(n_jobs, len(points))
    if validation_data is not None:
        validation_data = tuple(validation_data)
    args = (X, y, validation_data, epochs, batch_size, seed, jobs, fit_kwargs, return_models)
    if jobs == 1:
        runs = (_fit_point(build, point, *args) for point in points)
    else:
        runs = _run_on_backend(_fit_point, [(build, point) + args for point in points], n_jobs)
    results = []
    for i, res in enumerate(runs):
        results.append(res)
        if progress is not None:
            progress(i + 1, len(points), res[0])
    table = _table([r for r, _ in results], as_frame)
    if return_models:
        return table, [m for _, m in results]
    return table


# ------------------------------------------------------------------ regularization path
def _bind_lambda(build, lam):
    """build(lam[, seed=...]) as a function of seed only (when build takes one)."""
    if _accepts(build, "seed"):
        def bound(seed):
            return build(lam, seed=seed)
    else:
        def bound():
            return build(lam)
    return bound


MIN_LIVE_FRACTION = 0.1


def _kernels(model):
    """The kernels W of every Dense, in order (not get_weights()[::2]: a Dense with BatchNorm
    adds gamma, beta and the running statistics to that list)."""
    return model._network.kernels()


def live_units(model):
    """Per hidden layer, how many units still have a nonzero incoming weight."""
    return [int(np.count_nonzero(np.any(W != 0, axis=0))) for W in _kernels(model)[:-1]]


def collapsed(model, X, rows=1024, min_live_fraction=MIN_LIVE_FRACTION):
    """True when the model is (nearly) the null model: some kernel is all zeros, its output
    is constant (to float32 rounding) on the first `rows` rows of X, or a hidden layer has
    fewer than `min_live_fraction` of its units alive (at least one), the bottleneck an L1
    penalty leaves just before it kills a layer."""
    kernels = _kernels(model)
    if any(not np.any(W) for W in kernels):
        return True
    widths = [W.shape[1] for W in kernels[:-1]]
    if any(live < max(1.0, min_live_fraction * width)
           for live, width in zip(live_units(model), widths)):
        return True
    out = np.asarray(model.predict(np.asarray(X)[:rows]), np.float64)
    spread = float(np.max(np.ptp(out, axis=0))) if out.shape[0] > 1 else 0.0
    scale = float(np.max(np.abs(out))) if out.size else 0.0
    return spread <= 1e-5 * max(scale, 1e-3)


def kernel_stats(model):
    """(sparsity, weight_norm, n_zero, n_weights) of a model's kernels (biases excluded):
    sparsity is the fraction of exact zeros, weight_norm the Frobenius norm of all kernels."""
    kernels = _kernels(model)
    n = sum(W.size for W in kernels)
    zeros = sum(int(np.count_nonzero(W == 0)) for W in kernels)
    norm = math.sqrt(sum(float(np.sum(W.astype(np.float64) ** 2)) for W in kernels))
    return (zeros / n if n else 0.0), norm, zeros, n


def regularization_path(build, lambdas, X, y, validation_data=None, epochs=10, batch_size=32,
                        warm_epochs=None, seed=0, fit_kwargs=None, return_models=False,
                        progress=None, as_frame=None, threads=None, restart_collapsed=True,
                        n_jobs=None):
    """Fit from the strongest to the weakest penalty, each fit warm-started from the previous
    one's weights (glmnet's strategy); `build(lam)` returns a compiled model for penalty lam.

    The first (strongest) fit runs `epochs` epochs from the initial weights of `seed`; each
    later fit starts from the previous solution with fresh optimizer state and runs
    `warm_epochs` epochs (default: epochs). Every model uses the same `seed` (shuffles and
    dropout masks). Returns a table, one row per lambda in path order (descending): lambda,
    final_loss, final_val_loss, best_val_loss, final_penalty, sparsity (fraction of exact
    zeros in the kernels), weight_norm (Frobenius norm of the kernels), n_zero, epochs_run,
    time_s, threads, warm_start and start ("init", "warm" or "restart"). return_models=True
    returns (table, models).

    Where it runs: the path is one chain, so one task. With n_jobs=None (joblib's active
    setting) or 1 it runs in this process; when the active joblib backend offers more than one
    slot for n_jobs (e.g. inside joblib.parallel_config(backend="dask")) it runs as one task
    on a worker, which sizes its threads from its own cores (threads=None; worker_threads),
    and progress is called for each row once the task returns. The table is the same.

    Unlike glmnet's convex problems, a network that the penalty has collapsed (a kernel
    entirely zero, or a constant output: the null model) is a stationary point for every
    smaller penalty too: no gradient reaches the dead layers, and with proximal L1 in Adam's
    metric the tiny gradients make the threshold huge. Warm-starting from it would stay
    there down the whole path; a nearly dead one (a hidden layer with under 10% of its units
    alive; measured on the curve data: L1 3e-3 leaves such a net at 89% of the constant
    predictor's loss, and warm starts from it stay there down to 3e-5, where a fresh fit
    reaches 5%) does the same. So with
    restart_collapsed=True (the default) a fit that
    follows a collapsed solution starts again from the initial weights (start="restart",
    `epochs` epochs) instead.
    """
    if not callable(build):
        raise TypeError("build must be a callable: build(lam) -> compiled Sequential")
    _check_common(epochs, batch_size, validation_data, seed)
    warm_epochs = epochs if warm_epochs is None else warm_epochs
    _check_common(warm_epochs, batch_size, None)
    try:
        lams = sorted({float(v) for v in lambdas}, reverse=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lambdas must be numbers, got {lambdas!r}") from exc
    if not lams or any(not math.isfinite(v) or v < 0 for v in lams):
        raise ValueError(f"lambdas must be a non-empty list of finite numbers >= 0, got "
                         f"{lambdas!r}")
    if validation_data is not None:
        validation_data = tuple(validation_data)
    args = (build, lams, X, y, validation_data, epochs, warm_epochs, batch_size, seed,
            fit_kwargs, return_models, threads, restart_collapsed)
    if _resolve_jobs(n_jobs, 2) == 1:     # the backend offers one slot (or n_jobs=1): here
        rows, models = _path(*args, progress)
    else:
        rows, models = next(_run_on_backend(_path, [args + (None,)], n_jobs))
        for i, row in enumerate(rows):
            if progress is not None:
                progress(i + 1, len(lams), row)
    table = _table(rows, as_frame)
    return (table, models) if return_models else table


def _path(build, lams, X, y, validation_data, epochs, warm_epochs, batch_size, seed, fit_kwargs,
          return_models, threads, restart_collapsed, progress):
    """regularization_path's chain of fits (here or in a worker); returns (rows, models)."""
    rows, models = [], []
    previous = None
    threads = threads or worker_threads(1)
    with limited_threads(threads):
        for i, lam in enumerate(lams):
            t0 = time.perf_counter()
            model = _seeded_model(_bind_lambda(build, lam), {}, seed, False)
            start = "init"
            if previous is not None:
                if restart_collapsed and collapsed(previous, X):
                    start = "restart"
                else:
                    if not model.built:
                        model.build(previous.input_dim)
                    model.set_weights(previous.get_weights())
                    start = "warm"
            history = model.fit(X, y, epochs=warm_epochs if start == "warm" else epochs,
                                batch_size=batch_size, validation_data=validation_data,
                                verbose=0, **(fit_kwargs or {}))
            elapsed = time.perf_counter() - t0
            s = _summary(history)
            sparsity, norm, zeros, _ = kernel_stats(model)
            row = {"lambda": lam, "final_loss": s["final_loss"],
                   "final_val_loss": s["final_val_loss"], "best_val_loss": s["best_val_loss"],
                   "final_penalty": s["final_penalty"], "sparsity": sparsity,
                   "weight_norm": norm, "n_zero": zeros, "epochs_run": s["epochs_run"],
                   "time_s": elapsed, "threads": threads, "warm_start": start == "warm",
                   "start": start}
            rows.append(row)
            if progress is not None:
                progress(i + 1, len(lams), row)
            if return_models:
                models.append(model)
            previous = model
    return rows, models
