"""Seeing what regularization does, part 1: sweeps over a grid and regularization paths.

    table = fr.sweep(build, {"l2": [0, 1e-4, 1e-3], "dropout": [0, 0.1]}, X, y,
                     validation_data=(Xv, yv), epochs=50, batch_size=128, n_jobs=2, seed=0)
    path = fr.regularization_path(build_l1, [1e-2, 1e-3, 1e-4], X, y,
                                  validation_data=(Xv, yv), epochs=50, warm_epochs=15)

`build(**point)` returns a compiled Sequential for one grid point. Each point trains in its
own process (joblib's loky backend) when n_jobs > 1.

Determinism: a point's model is seeded from (seed, point), never from the worker or the
order in which points finish, so the table is the same for any n_jobs. The seed reaches the
model in one of three ways: a "seed" key in the grid is used as is; a `build` with a `seed`
parameter receives the derived seed; otherwise the derived seed is set on the returned model
(re-initialising its weights if `build` already created them).

Threads: Numba's pool, NumPy's OpenBLAS and SciPy's OpenBLAS all live in each worker. Every
job runs with max(1, cores // n_jobs) threads in all of them (numba.set_num_threads plus
threadpoolctl), so n_jobs parallel fits never oversubscribe the cores.

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
                  "final_penalty", "epochs_run", "time_s", "seed")


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


def _resolve_jobs(n_jobs, n_points):
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0 \
            or n_jobs < -1:
        raise ValueError(f"n_jobs must be a positive integer or -1 (all cores), got {n_jobs!r}")
    n = cpu_cores() if n_jobs == -1 else int(n_jobs)
    return max(1, min(n, n_points))


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


def _fit_point(build, point, X, y, validation_data, epochs, batch_size, seed, threads,
               fit_kwargs, return_model):
    """Train one grid point (in a worker or in this process); returns (row, model|None)."""
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


def _check_common(epochs, batch_size, validation_data):
    from .validation import check_positive_int
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if validation_data is not None and (not isinstance(validation_data, (tuple, list))
                                        or len(validation_data) != 2):
        raise ValueError("validation_data must be a tuple (X_val, y_val)")


# ------------------------------------------------------------------ sweep
def sweep(build, grid, X, y, validation_data=None, epochs=10, batch_size=32, n_jobs=1, seed=0,
          fit_kwargs=None, return_models=False, progress=None, as_frame=None):
    """Train one model per grid point (the cartesian product of `grid`), n_jobs at a time.

    Returns a table with one row per point, in grid order: the point's parameters, then
    final_loss / best_loss (training data loss per epoch, penalty excluded), final_val_loss /
    best_val_loss (nan without validation_data), best_epoch (1-based, by val_loss when there
    is one), final_penalty, epochs_run, time_s (wall seconds of that point) and seed (the
    model seed used). A DataFrame when pandas is installed (as_frame=None), else a list of
    dicts; as_frame=False forces the list.

    return_models=True returns (table, models): the trained models (with .history), in grid
    order. progress: optional callable(done, total, row), called as each point finishes.
    fit_kwargs: extra keyword arguments for model.fit (e.g. shuffle, callbacks: callbacks are
    copied into each worker, so stateful ones start fresh per point).
    """
    if not callable(build):
        raise TypeError("build must be a callable: build(**point) -> compiled Sequential")
    _check_common(epochs, batch_size, validation_data)
    points = expand_grid(grid)
    jobs = _resolve_jobs(n_jobs, len(points))
    threads = threads_per_job(jobs)
    if validation_data is not None:
        validation_data = tuple(validation_data)
    args = (X, y, validation_data, epochs, batch_size, seed, threads, fit_kwargs, return_models)
    results = []
    if jobs == 1:
        for i, point in enumerate(points):
            results.append(_fit_point(build, point, *args))
            if progress is not None:
                progress(i + 1, len(points), results[-1][0])
    else:
        try:
            from joblib import Parallel, delayed
        except ImportError as exc:
            raise ImportError("n_jobs > 1 needs joblib: pip install \"fastreg[sweep]\" "
                              "(or pass n_jobs=1)") from exc
        parallel = Parallel(n_jobs=jobs, backend="loky", return_as="generator",
                            inner_max_num_threads=threads)
        for i, res in enumerate(parallel(delayed(_fit_point)(build, point, *args)
                                         for point in points)):
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
    return list(model._W)


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
                        progress=None, as_frame=None, threads=None, restart_collapsed=True):
    """Fit from the strongest to the weakest penalty, each fit warm-started from the previous
    one's weights (glmnet's strategy); `build(lam)` returns a compiled model for penalty lam.

    The first (strongest) fit runs `epochs` epochs from the initial weights of `seed`; each
    later fit starts from the previous solution with fresh optimizer state and runs
    `warm_epochs` epochs (default: epochs). Every model uses the same `seed` (shuffles and
    dropout masks). Returns a table, one row per lambda in path order (descending): lambda,
    final_loss, final_val_loss, best_val_loss, final_penalty, sparsity (fraction of exact
    zeros in the kernels), weight_norm (Frobenius norm of the kernels), n_zero, epochs_run,
    time_s, warm_start and start ("init", "warm" or "restart"). return_models=True returns
    (table, models).

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
    _check_common(epochs, batch_size, validation_data)
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
    rows, models = [], []
    previous = None
    with limited_threads(threads or cpu_cores()):
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
                   "time_s": elapsed, "warm_start": start == "warm", "start": start}
            rows.append(row)
            if progress is not None:
                progress(i + 1, len(lams), row)
            if return_models:
                models.append(model)
            previous = model
    table = _table(rows, as_frame)
    return (table, models) if return_models else table
