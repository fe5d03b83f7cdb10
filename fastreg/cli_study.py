"""`fastreg sweep` and `fastreg study`: sweeps from the command line, and the study
"a visual intuition for regularization" reproduced on the built-in curve data.

fastreg/cli.py calls register(main) to add both commands to the `fastreg` group.

The curve data follow the study's notebook: x = linspace(0, 4π, n),
f(x) = sin(A x)(1 − cos(B x)) / exp(C x) with A, B ~ N(1, 0.5) and C ~ N(0, 0.1) drawn from
the seed, Gaussian noise (sd 0.1) added, y rescaled to [0, 1]; a random 80/20 train/validation
split. The study's network: 1 → 64 → 64 → 64 → 1, LeakyReLU hidden layers, Adam(1e-3), MSE;
an L2 sweep λ ∈ {0, 1e-4, 1e-3, 1e-2, 1e-1, 1} (λ/2·ΣW² on every kernel) and a dropout sweep
p ∈ {0, 0.1, ..., 0.9} (after every hidden layer). One difference from the original: its last
layer had a ReLU; ours is linear (fastreg's convention for a regression head), which changes
nothing on targets in [0, 1] except that the output cannot die.
"""
import functools
import json
import math
import os
import time

import click
import numpy as np

from .cli_common import (UserError, require_backend, require_modules, stderr_console,
                         stdout_console)

# `from .x import y`, never `from . import sweep`: fastreg exports functions named sweep and
# diagnose, which shadow these modules as attributes of the package.
from .diagnose import diagnose_model
from .sweep import expand_grid, kernel_stats, sweep

STUDY_L2 = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
STUDY_DROPOUT = tuple(round(0.1 * i, 1) for i in range(10))
STUDY_EPOCHS = 200
STUDY_BATCH = 64
QUICK_EPOCHS = 2
QUICK_POINTS = 600


# ------------------------------------------------------------------ data
def curve_data(n=10_000, seed=0, noise=0.1, val_fraction=0.2):
    """The study's 1-D "complex function" data: (X_train, y_train, X_val, y_val), float32."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 4.0 * np.pi, n)
    a, b = rng.normal(1.0, 0.5, 2)
    c = rng.normal(0.0, 0.1)
    y = np.sin(a * x) * (1.0 - np.cos(b * x)) / np.exp(c * x) + rng.normal(0.0, noise, n)
    y = (y - y.min()) / (y.max() - y.min())
    return _split(x.reshape(-1, 1), y.reshape(-1, 1), val_fraction, seed)


def _split(X, y, val_fraction, seed):
    if not 0.0 < val_fraction < 1.0:
        raise click.BadParameter(f"the validation fraction must be in (0, 1), got {val_fraction}")
    if len(X) < 2:
        raise UserError(f"{len(X)} row(s) of data: a train/validation split needs two or more")
    idx = np.random.default_rng([seed, 1]).permutation(len(X))
    n_val = max(1, int(round(val_fraction * len(X))))
    va, tr = idx[:n_val], idx[n_val:]
    f32 = (lambda a: np.ascontiguousarray(a, np.float32))
    return f32(X[tr]), f32(y[tr]), f32(X[va]), f32(y[va])


def _header_of(path):
    """The first row's cells if it is a header (not all numbers), else None."""
    import csv
    with open(path, newline="") as f:
        first = next(csv.reader(f), [])
    try:
        [float(v) for v in first]
        return None
    except ValueError:
        return [h.strip() for h in first]


def _bad_cell(path, line, column, header, value):
    name = f"column {column + 1}" + (f" ({header[column]!r})" if header else "")
    what = "a missing value" if value.strip() == "" else f"{value.strip()!r}, not a number"
    return UserError(f"{path}: line {line}, {name}: {what}")


def _read_csv_rows(path, header):
    """The CSV as a float64 array, without pandas: the csv module, cell by cell."""
    import csv
    rows = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        width = None
        for line, cells in enumerate(reader, start=1):
            if line == 1 and header is not None:
                width = len(header)
                continue
            if not cells or all(c.strip() == "" for c in cells):
                continue            # blank lines carry no row
            width = width or len(cells)
            if len(cells) != width:
                raise UserError(f"{path}: line {line} has {len(cells)} cells, the file has "
                                f"{width} columns")
            row = []
            for column, value in enumerate(cells):
                try:
                    v = float(value)
                except ValueError:
                    raise _bad_cell(path, line, column, header, value) from None
                if v != v:
                    raise _bad_cell(path, line, column, header, value)
                row.append(v)
            rows.append(row)
    return np.array(rows, dtype=np.float64).reshape(len(rows), width or 0)


def _read_csv_pandas(pd, path, header):
    """The CSV as a float64 array through pandas; the first bad cell named by line and
    column of the file."""
    try:
        frame = pd.read_csv(path, header=0 if header is not None else None, dtype=str,
                            keep_default_na=False, skip_blank_lines=True)
    except pd.errors.ParserError as exc:
        raise UserError(f"{path}: {' '.join(str(exc).split())}") from None
    values = frame.to_numpy(dtype=object)
    numbers = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(np.isnan(numbers))
    if len(bad):
        r, c = bad[0]
        # line in the file: 1-based, after the header; skipped blank lines are not counted
        # by pandas, so find the row's own line
        line = _line_of_row(path, int(r), header is not None)
        raise _bad_cell(path, line, int(c), header, str(values[r, c]))
    return numbers


def _line_of_row(path, row, has_header):
    """The 1-based file line of data row `row` (blank lines skipped, as pandas does)."""
    seen = -1
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if line == 1 and has_header:
                continue
            if text.strip():
                seen += 1
                if seen == row:
                    return line
    return row + 1 + int(has_header)


def _read_csv(path, target):
    """(X, y) of a numeric CSV (optional header row); the target column is the last unless
    `target` names or indexes (0-based) it. pandas reads it when installed."""
    header = _header_of(path)
    try:
        import pandas as pd
    except ImportError:
        data = _read_csv_rows(path, header)
    else:
        data = _read_csv_pandas(pd, path, header)
    if data.shape[0] == 0:
        raise UserError(f"{path}: no data rows")
    if data.shape[1] < 2:
        raise UserError(f"{path}: a CSV needs feature columns and a target column, it has "
                        f"{data.shape[1]} column(s)")
    col = data.shape[1] - 1
    if target is not None:
        if header and target in header:
            col = header.index(target)
        else:
            try:
                col = int(target)
            except ValueError:
                raise UserError(f"--target {target!r}: {path} has no column of that name "
                                f"(columns: {', '.join(header) if header else 'none named'})"
                                ) from None
            if not 0 <= col < data.shape[1]:
                raise UserError(f"--target {target}: out of range, {path} has "
                                f"{data.shape[1]} columns (indexes 0..{data.shape[1] - 1})")
    keep = [i for i in range(data.shape[1]) if i != col]
    return data[:, keep], data[:, col:col + 1]


DATA_EXTENSIONS = (".npz", ".csv")


def load_data(source, target=None, val_fraction=0.2, seed=0, n=None):
    """(X_train, y_train, X_val, y_val) from "curve", a workload name, or a .npz/.csv file.

    .npz: arrays X and y (optionally X_val and y_val; else a random split). .csv: numbers,
    optional header row; the target is the last column unless `target` names (or indexes) it.
    """
    if source == "curve":
        return curve_data(n or 10_000, seed=seed, val_fraction=val_fraction)
    ext = os.path.splitext(source)[1].lower()
    if not os.path.exists(source):
        if ext or os.sep in source or "/" in source:
            raise UserError(f"file not found: {source}")
        return _bench_workload(source, val_fraction, seed)
    if os.path.isdir(source):
        raise UserError(f"{source} is a directory, not a data file (.npz or .csv)")
    if ext == ".npz":
        X, y, Xv, yv = _read_npz(source)
        if Xv is not None:
            return X, y, Xv, yv
    elif ext == ".csv":
        X, y = _read_csv(source, target)
    else:
        raise UserError(f"{source}: data files must be .npz or .csv")
    X = np.asarray(X).reshape(len(X), -1)
    y = np.asarray(y).reshape(len(y), -1)
    return _split(X, y, val_fraction, seed)


def _read_npz(path):
    """(X, y, X_val or None, y_val or None) of an .npz with arrays X and y, read without
    pickle; every array numeric, finite and with one row per sample."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{path} is not a readable .npz archive: {exc}") from None
    with z:
        keys = {k.lower(): k for k in z.files}
        if "x" not in keys or "y" not in keys:
            raise UserError(f"{path}: a .npz needs arrays X and y (it has "
                            f"{', '.join(z.files) or 'none'})")
        try:
            arrays = [z[keys[k]] if k in keys else None for k in ("x", "y", "x_val", "y_val")]
        except ValueError as exc:      # object arrays need pickle: refused
            raise UserError(f"{path}: {exc}") from None
    for name, a in zip(("X", "y", "X_val", "y_val"), arrays):
        if a is not None and (not np.issubdtype(a.dtype, np.number) or a.ndim == 0
                              or np.iscomplexobj(a) or not np.isfinite(a).all()):
            raise UserError(f"{path}: array {name} must hold finite real numbers, one row "
                            f"per sample")
    X, y, Xv, yv = arrays
    if len(X) != len(y):
        raise UserError(f"{path}: X has {len(X)} rows but y has {len(y)}")
    f32 = (lambda a: np.ascontiguousarray(np.asarray(a).reshape(len(a), -1), np.float32))
    if Xv is not None and yv is not None:
        if len(Xv) != len(yv):
            raise UserError(f"{path}: X_val has {len(Xv)} rows but y_val has {len(yv)}")
        return f32(X), f32(y), f32(Xv), f32(yv)
    return X, y, None, None


def _bench_workload(name, val_fraction, seed):
    from .bench.workloads import WORKLOADS, make_workload
    if name not in WORKLOADS:
        raise UserError(f"{name!r} is neither a data file (.npz or .csv) nor a built-in "
                        f"workload ({', '.join(WORKLOADS)})")
    w = make_workload(name)
    f32 = (lambda a: np.ascontiguousarray(np.asarray(a).reshape(len(a), -1), np.float32))
    return f32(w.X_train), f32(w.y_train), f32(w.X_val), f32(w.y_val)


# ------------------------------------------------------------------ model
def build_mlp(input_dim, hidden=(64, 64, 64), activation="leaky_relu", l2=0.0, l1=0.0,
              dropout=0.0, lr=1e-3, loss="mse", outputs=1, seed=0, backend=None):
    """The study's MLP: hidden Dense layers with `activation`, dropout after each hidden
    layer, the L1/L2 penalty on every kernel, a linear output; Adam(lr)."""
    import fastreg as fr
    reg = []
    if l1:
        reg.append(fr.L1(float(l1)))
    if l2:
        reg.append(fr.L2(float(l2)))
    layers = [fr.Dense(int(h), activation, dropout=float(dropout), regularizer=reg or None)
              for h in hidden]
    layers.append(fr.Dense(int(outputs), regularizer=reg or None))
    model = fr.Sequential(layers, input_dim=input_dim, seed=seed)
    model.compile(loss=loss, optimizer=fr.Adam(lr=float(lr)), backend=backend)
    return model


def _floats(text, name, low=None, high=None, low_open=False, high_open=False):
    """Comma-separated numbers of option --name, each finite and inside its range."""
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"takes comma-separated numbers, got {text!r}",
                                 param_hint=f"--{name}") from None
    if not vals:
        raise click.BadParameter("is empty", param_hint=f"--{name}")
    for v in vals:
        below = low is not None and (v < low or (low_open and v == low))
        above = high is not None and (v > high or (high_open and v == high))
        if not math.isfinite(v) or below or above:
            rng = (f"{'(' if low_open else '['}{low:g}, "
                   f"{'inf' if high is None else format(high, 'g')}"
                   f"{')' if high_open or high is None else ']'}")
            raise click.BadParameter(f"{v:g} is outside {rng}", param_hint=f"--{name}")
    return vals


def _ints(text, name):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"takes comma-separated integers, got {text!r}",
                                 param_hint=f"--{name}") from None
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"needs positive integers, got {text!r}",
                                 param_hint=f"--{name}")
    return tuple(vals)


def _n_jobs(ctx, param, value):
    """click callback: n_jobs >= 1, or -1 for every core (joblib's convention)."""
    if value == 0 or value < -1:
        raise click.BadParameter(f"must be a positive integer or -1 (all cores), got {value}")
    return value


def _outputs_for(loss, y):
    if loss == "sparse_categorical_crossentropy":
        return int(np.max(y)) + 1
    return y.shape[1]


# ------------------------------------------------------------------ output helpers
def _rows(table):
    return table.to_dict("records") if hasattr(table, "to_dict") else list(table)


def _fmt(v):
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _print_table(console, rows, columns, title):
    from rich.table import Table
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    console.print(t)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _write_json(path, obj):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default, allow_nan=True)
        f.write("\n")


class _Progress:
    """Sweep progress on the status console (stderr): a live bar on a terminal, else one
    plain line per finished point."""

    def __init__(self, console, enabled=True):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[last]}"), console=console,
                                 disable=not self.live)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def task(self, description, total):
        tid = self.progress.add_task(description, total=total, last="")

        def callback(done, total_, row):
            last = "  ".join(f"{k} {_fmt(v)}" for k, v in row.items()
                             if k in ("l2", "l1", "dropout", "lr", "lambda", "final_loss",
                                      "best_val_loss"))
            if self.live:
                self.progress.update(tid, completed=done, last=last)
            elif self.enabled:
                self.console.print(f"{description} {done}/{total_}: {last}", highlight=False,
                                   markup=False)
        return callback


# ------------------------------------------------------------------ fastreg sweep
SWEEP_COLUMNS = ("final_loss", "best_loss", "final_val_loss", "best_val_loss", "best_epoch",
                 "epochs_run", "time_s")


ACTIVATION_NAMES = ("linear", "relu", "leaky_relu", "tanh", "sigmoid")
LOSS_NAMES = ("mse", "binary_crossentropy", "sparse_categorical_crossentropy")
BACKEND_NAMES = ("numpy", "numba", "cython", "cuda")


@click.command("sweep")
@click.argument("source", default="curve")
@click.option("--l2", "l2", default=None, help="L2 strengths >= 0, comma-separated (e.g. "
                                               "0,1e-4,1e-3).")
@click.option("--l1", "l1", default=None, help="L1 strengths >= 0, comma-separated.")
@click.option("--dropout", default=None, help="Dropout rates in [0, 1), comma-separated "
                                              "(e.g. 0,0.1).")
@click.option("--lr", default=None, help="Adam learning rates > 0, comma-separated "
                                         "(default 1e-3).")
@click.option("--hidden", default="64,64,64", show_default=True, help="Hidden layer widths.")
@click.option("--activation", default="leaky_relu", show_default=True,
              type=click.Choice(ACTIVATION_NAMES))
@click.option("--loss", default="mse", show_default=True, type=click.Choice(LOSS_NAMES))
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--n-jobs", default=2, show_default=True, type=int, callback=_n_jobs,
              help="Parallel fits (processes); -1 for all cores.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**64 - 1))
@click.option("--val-fraction", default=0.2, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Validation split when the data have none.")
@click.option("--target", default=None, help="CSV target column (name or 0-based index; "
                                             "default the last).")
@click.option("--backend", default=None, type=click.Choice(BACKEND_NAMES),
              help="Kernel backend (default: cython when built, else numba).")
@click.option("--json", "json_path", default=None,
              type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the table as JSON here (- for stdout, instead of the table).")
@click.option("--plot", "plot_dir", default=None, type=click.Path(file_okay=False),
              help="Write figures (sweep, loss curves, parameter KDE, predictions) here "
                   "(needs matplotlib: pip install \"fastreg[plot]\").")
@click.option("--quick", is_flag=True, help=f"{QUICK_EPOCHS} epochs on at most "
                                            f"{QUICK_POINTS} rows (a smoke test).")
def sweep_command(source, l2, l1, dropout, lr, hidden, activation, loss, epochs, batch_size,
                  n_jobs, seed, val_fraction, target, backend, json_path, plot_dir, quick):
    """Train one model per grid point on SOURCE ("curve", a workload, or a .npz/.csv file)
    and print the table. The grid is the product of the values given to --l2, --l1,
    --dropout and --lr."""
    grid = {k: v for k, v in (("l2", _floats(l2, "l2", low=0.0)),
                              ("l1", _floats(l1, "l1", low=0.0)),
                              ("dropout", _floats(dropout, "dropout", low=0.0, high=1.0,
                                                  high_open=True)),
                              ("lr", _floats(lr, "lr", low=0.0, low_open=True)))
            if v is not None}
    if not grid:
        raise click.UsageError("give at least one of --l2, --l1, --dropout, --lr (e.g. "
                               "--l2 0,1e-4,1e-3)")
    hidden = _ints(hidden, "hidden")
    if plot_dir:
        require_modules("matplotlib", extra="plot", what="--plot")
    if backend:
        require_backend(backend)
    console, status = stdout_console(), stderr_console()
    X, y, Xv, yv = load_data(source, target, val_fraction, seed,
                             n=QUICK_POINTS if quick and source == "curve" else None)
    if quick:
        epochs = min(epochs, QUICK_EPOCHS)
        X, y = X[:QUICK_POINTS], y[:QUICK_POINTS]
        Xv, yv = Xv[:QUICK_POINTS], yv[:QUICK_POINTS]
    _check_targets(loss, y, yv)
    build = functools.partial(build_mlp, X.shape[1], hidden=hidden, activation=activation,
                              loss=loss, outputs=_outputs_for(loss, np.concatenate([y, yv])),
                              backend=backend)
    n_points = len(expand_grid(grid))
    status.print(f"fastreg sweep {source}: {len(X)} train / {len(Xv)} validation rows, "
                 f"{n_points} points, {epochs} epochs, n_jobs {n_jobs}", highlight=False,
                 markup=False)
    t0 = time.perf_counter()
    with _Progress(status) as prog:
        table, models = sweep(build, grid, X, y, validation_data=(Xv, yv), epochs=epochs,
                              batch_size=batch_size, n_jobs=n_jobs, seed=seed,
                              return_models=True, as_frame=False,
                              progress=prog.task("sweep", n_points))
    rows = _rows(table)
    result = {"source": source, "grid": grid, "epochs": epochs, "batch_size": batch_size,
              "seed": seed, "rows": rows}
    if json_path == "-":
        console.file.write(json.dumps(result, indent=2, default=_json_default) + "\n")
    else:
        _print_table(console, rows, list(grid) + list(SWEEP_COLUMNS),
                     f"sweep on {source} ({time.perf_counter() - t0:.1f} s)")
    if json_path and json_path != "-":
        _write_json(json_path, result)
        status.print(f"table written to {json_path}", highlight=False, markup=False)
    if plot_dir:
        written = _sweep_figures(plot_dir, grid, rows, models, X, y, Xv, yv)
        status.print(f"figures written to {plot_dir}: {', '.join(written)}", highlight=False,
                     markup=False)


def _check_targets(loss, y, yv):
    """Targets the loss can take, checked before any training (the model checks them
    again, with the layer's width)."""
    both = np.concatenate([y.ravel(), yv.ravel()])
    if loss == "sparse_categorical_crossentropy":
        if y.shape[1] != 1 or np.any(both != np.round(both)) or both.min() < 0:
            raise UserError("--loss sparse_categorical_crossentropy needs one target column of "
                            "integer class labels 0, 1, 2, ...")
    elif loss == "binary_crossentropy" and (both.min() < 0 or both.max() > 1):
        raise UserError(f"--loss binary_crossentropy needs targets in [0, 1], found "
                        f"{both.min():g} to {both.max():g}")


def _point_label(row, keys):
    return ", ".join(f"{k}={row[k]:g}" for k in keys)


def _sweep_figures(plot_dir, grid, rows, models, X, y, Xv, yv):
    from . import plots
    os.makedirs(plot_dir, exist_ok=True)
    keys = list(grid)
    varying = [k for k in keys if len(grid[k]) > 1] or keys[:1]
    out = []
    if len(varying) >= 2:
        plots.sweep_plot(rows, varying[0], "best_val_loss", hue=varying[1], kind="heatmap",
                         path=os.path.join(plot_dir, "sweep_heatmap.png"))
        out.append("sweep_heatmap.png")
    else:
        plots.sweep_plot(rows, varying[0], ["final_loss", "best_val_loss"],
                         path=os.path.join(plot_dir, "sweep.png"))
        out.append("sweep.png")
    labels = [_point_label(r, keys) for r in rows]
    plots.loss_curves(models, labels=labels, path=os.path.join(plot_dir, "loss_curves.png"))
    plots.param_kde(models, labels=labels, path=os.path.join(plot_dir, "param_kde.png"))
    out += ["loss_curves.png", "param_kde.png"]
    if X.shape[1] == 1 and y.shape[1] == 1:
        plots.predictions(models, Xv, yv, labels=labels,
                          path=os.path.join(plot_dir, "predictions.png"))
        out.append("predictions.png")
    return out


# ------------------------------------------------------------------ fastreg study
def _spearman(a, b):
    from scipy.stats import spearmanr
    rho = spearmanr(a, b).statistic
    return float(rho) if rho == rho else float("nan")


def _point_stats(model, X, y, Xv, yv):
    from .plots import parameters_of
    theta = parameters_of(model)
    q25, q75 = np.percentile(theta, [25, 75])
    pred = model.predict(Xv)
    sparsity, norm, _, _ = kernel_stats(model)
    diag = diagnose_model(model, X, y, Xv, yv)
    return {"train_loss_eval": model.evaluate(X, y), "val_loss_eval": model.evaluate(Xv, yv),
            "pred_spread": float(np.std(pred) / np.std(yv)),
            "theta_std": float(np.std(theta)), "theta_iqr": float(q75 - q25),
            "theta_max_abs": float(np.max(np.abs(theta))), "weight_norm": norm,
            "sparsity": sparsity, "verdict": diag.verdict}


def _study_sweep(name, param, values, build, data, epochs, batch_size, n_jobs, seed, prog):
    X, y, Xv, yv = data
    grid = {param: list(values), "seed": [seed]}  # one init for every point: only `param` varies
    table, models = sweep(build, grid, X, y, validation_data=(Xv, yv), epochs=epochs,
                          batch_size=batch_size, n_jobs=n_jobs, seed=seed,
                          return_models=True, as_frame=False,
                          progress=prog.task(f"{name} sweep", len(values)))
    rows = []
    for r, m in zip(_rows(table), models):
        r = dict(r)
        r.update(_point_stats(m, X, y, Xv, yv))
        rows.append(r)
    return rows, models


def study_checks(l2_rows, dropout_rows):
    """The study's findings as numbers and pass/fail flags."""
    lam = [r["l2"] for r in l2_rows]
    p = [r["dropout"] for r in dropout_rows]
    l2_loss = [r["final_loss"] for r in l2_rows]
    dr_loss = [r["final_loss"] for r in dropout_rows]
    l2_sd = [r["theta_std"] for r in l2_rows]
    dr_sd = [r["theta_std"] for r in dropout_rows]
    strongest = l2_rows[int(np.argmax(lam))]
    sd0 = l2_rows[int(np.argmin(lam))]["theta_std"]
    sd_p0 = dropout_rows[int(np.argmin(p))]["theta_std"]
    with_dropout = [r["theta_std"] for r in dropout_rows if r["dropout"] > 0] or [sd_p0]
    wide = float(min(with_dropout) / sd_p0)
    near = l2_rows[int(np.argmin([abs(v - 1e-2) for v in lam]))]["theta_std"]
    l2_ratio = float(near / sd0)
    checks = {
        "l2_train_loss_grows": {
            "claim": "final training loss grows with λ",
            "spearman": _spearman(lam, l2_loss),
            "values": dict(zip(map(str, lam), l2_loss)),
            "ok": _spearman(lam, l2_loss) >= 0.8 and l2_loss[-1] > l2_loss[0]},
        "l2_largest_collapses_to_mean": {
            "claim": "at the largest λ the predictions collapse toward the data mean",
            "lambda": strongest["l2"],
            "pred_spread": strongest["pred_spread"],
            "ok": strongest["pred_spread"] < 0.1},
        "l2_params_narrow": {
            "claim": "the parameter distribution narrows toward 0 as λ grows",
            "spearman": _spearman(lam, l2_sd),
            "theta_std": dict(zip(map(str, lam), l2_sd)),
            "ok": _spearman(lam, l2_sd) <= -0.8 and strongest["theta_std"] < 0.1 * sd0},
        "dropout_params_stay_wide": {
            "claim": "with dropout the parameter distribution stays wide",
            "theta_std": dict(zip(map(str, p), dr_sd)),
            "min_ratio_to_unregularized": wide,
            "l2_ratio_at_0.01": l2_ratio,
            "ok": wide >= 0.5},
        "dropout_train_loss_grows": {
            "claim": "training loss grows with the dropout rate",
            "spearman": _spearman(p, dr_loss),
            "values": dict(zip(map(str, p), dr_loss)),
            "ok": _spearman(p, dr_loss) >= 0.8 and dr_loss[-1] > dr_loss[0]},
    }
    return checks


STUDY_COLUMNS = ("final_loss", "train_loss_eval", "best_val_loss", "final_val_loss",
                 "pred_spread", "theta_std", "theta_iqr", "sparsity", "verdict", "time_s")


def _markdown(config, l2_rows, dropout_rows, checks):
    def table(rows, param):
        cols = (param,) + STUDY_COLUMNS
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
        return "\n".join(lines)
    out = ["# fastreg study: a visual intuition for regularization", "",
           f"curve data: {config['n_train']} train / {config['n_val']} validation points; "
           f"1→64→64→64→1 LeakyReLU, Adam(lr={config['lr']}), MSE, {config['epochs']} epochs, "
           f"batch {config['batch_size']}, seed {config['seed']}; {config['seconds']:.0f} s "
           f"with n_jobs={config['n_jobs']}.", "",
           "Columns: final_loss is the last epoch's training loss (data term, dropout on, as "
           "it trains); train_loss_eval the training-set loss with dropout off; pred_spread = "
           "std(predictions) / std(targets) on the validation set; theta_std / theta_iqr the "
           "spread of the kernel weights; verdict is fr.diagnose on the losses in % of the "
           "constant predictor's.", "",
           "## L2 sweep", "", table(l2_rows, "l2"), "", "## Dropout sweep", "",
           table(dropout_rows, "dropout"), "", "## The study's findings", ""]
    if config.get("quick"):
        out += [QUICK_NOTE + ".", ""]
    for name, c in checks.items():
        nums = {k: v for k, v in c.items() if k not in ("claim", "ok")}
        text = "; ".join(f"{k} " + (_fmt(v) if not isinstance(v, dict) else
                                    ", ".join(f"{kk}: {_fmt(vv)}" for kk, vv in v.items()))
                         for k, v in nums.items())
        verdict = {True: "holds", False: "does not hold", None: "not assessed"}[c["ok"]]
        out.append(f"- **{verdict}** — {c['claim']}: {text}")
    return "\n".join(out) + "\n"


QUICK_NOTE = (f"a --quick run ({QUICK_EPOCHS} epochs on {QUICK_POINTS} points) is a smoke test, "
              f"too short for the study's findings: they are not assessed (run without "
              f"--quick to check them)")


def run_study(out, epochs=STUDY_EPOCHS, batch_size=STUDY_BATCH, n_jobs=2, seed=0, quick=False,
              console=None, dpi=100, progress=True, status=None):
    """Run both sweeps and write the figures, summary.md and summary.json into `out`.
    Tables go to `console` (stdout), status and progress to `status` (stderr)."""
    from . import plots
    console = console or stdout_console()
    status = status or stderr_console()
    os.makedirs(out, exist_ok=True)
    if quick:
        epochs = min(epochs, QUICK_EPOCHS)
    data = curve_data(QUICK_POINTS if quick else 10_000, seed=seed)
    X, y, Xv, yv = data
    build = functools.partial(build_mlp, 1, hidden=(64, 64, 64), activation="leaky_relu",
                              lr=1e-3)
    status.print(f"fastreg study: {len(X)} train / {len(Xv)} validation points, {epochs} "
                 f"epochs, batch {batch_size}, n_jobs {n_jobs} -> {out}", highlight=False,
                 markup=False)
    t0 = time.perf_counter()
    with _Progress(status, progress) as prog:
        l2_rows, l2_models = _study_sweep("L2", "l2", STUDY_L2, build, data, epochs,
                                          batch_size, n_jobs, seed, prog)
        dr_rows, dr_models = _study_sweep("dropout", "dropout", STUDY_DROPOUT, build, data,
                                          epochs, batch_size, n_jobs, seed, prog)
    seconds = time.perf_counter() - t0
    init = build(seed=seed)  # the weights every point started from
    figures = []

    def fig(name, f, *args, **kw):
        f(*args, path=os.path.join(out, name), dpi=dpi, **kw)
        figures.append(name)
    l2_labels = [f"λ={r['l2']:g}" for r in l2_rows]
    dr_labels = [f"p={r['dropout']:g}" for r in dr_rows]
    fig("l2_loss_curves.png", plots.loss_curves, l2_models, labels=l2_labels, cmap="Reds",
        title="L2: training (solid) and validation (dashed) MSE")
    fig("l2_predictions.png", plots.predictions, l2_models, Xv, yv, labels=l2_labels, cmap="Reds",
        title="L2: predictions against the validation data")
    fig("l2_param_kde.png", plots.param_kde, l2_models, labels=l2_labels, init=init, cmap="Reds",
        title="L2: kernel weights θ", magnitude=True)
    fig("dropout_loss_curves.png", plots.loss_curves, dr_models, labels=dr_labels, cmap="Blues",
        title="dropout: training (solid) and validation (dashed) MSE")
    fig("dropout_predictions.png", plots.predictions, dr_models, Xv, yv, labels=dr_labels,
        cmap="Blues", title="dropout: predictions against the validation data")
    fig("dropout_param_kde.png", plots.param_kde, dr_models, labels=dr_labels, init=init,
        cmap="Blues", title="dropout: kernel weights θ", magnitude=True)
    checks = study_checks(l2_rows, dr_rows)
    if quick:       # two epochs cannot show what 200 do: no verdict either way
        for c in checks.values():
            c["ok"] = None
    config = {"epochs": epochs, "batch_size": batch_size, "n_jobs": n_jobs, "seed": seed,
              "lr": 1e-3, "n_train": len(X), "n_val": len(Xv), "quick": quick,
              "seconds": seconds, "l2": list(STUDY_L2), "dropout": list(STUDY_DROPOUT),
              "figures": figures}
    summary = {"config": config, "l2": l2_rows, "dropout": dr_rows, "checks": checks}
    _write_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(_markdown(config, l2_rows, dr_rows, checks))
    short = ("final_loss", "best_val_loss", "pred_spread", "theta_std", "verdict")
    _print_table(console, l2_rows, ("l2",) + short, "L2 sweep")
    _print_table(console, dr_rows, ("dropout",) + short, "dropout sweep")
    if quick:
        console.print(QUICK_NOTE, highlight=False, markup=False)
    else:
        for c in checks.values():
            console.print(f"{'[green]holds[/green]' if c['ok'] else '[red]does not hold[/red]'}"
                          f": {c['claim']}")
    status.print(f"{len(figures)} figures, summary.md and summary.json in {out} "
                 f"({seconds:.0f} s of training)", highlight=False, markup=False)
    return summary


@click.command("study")
@click.option("--epochs", default=STUDY_EPOCHS, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=STUDY_BATCH, show_default=True, type=click.IntRange(1))
@click.option("--n-jobs", default=2, show_default=True, type=int, callback=_n_jobs,
              help="Parallel fits (processes); -1 for all cores.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**64 - 1))
@click.option("--out", "out", default="fastreg-study", show_default=True,
              type=click.Path(file_okay=False), help="Output directory.")
@click.option("--dpi", default=100, show_default=True, type=click.IntRange(10, 1200))
@click.option("--quick", is_flag=True, help=f"{QUICK_EPOCHS} epochs on {QUICK_POINTS} points "
                                            f"(a smoke test: the findings are not assessed).")
def study_command(epochs, batch_size, n_jobs, seed, out, dpi, quick):
    """Reproduce the study "a visual intuition for regularization" on the curve data: an L2
    sweep and a dropout sweep of a 3x64 LeakyReLU MLP, with loss-curve, prediction and
    parameter-KDE figures and a summary table (markdown + JSON) in --out (needs matplotlib:
    pip install "fastreg[plot]")."""
    require_modules("matplotlib", extra="plot", what="fastreg study (its figures)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a directory")
    run_study(out, epochs=epochs, batch_size=batch_size, n_jobs=n_jobs, seed=seed,
              quick=quick, dpi=dpi)


def register(main_group):
    """Add `sweep` and `study` to the `fastreg` click group."""
    main_group.add_command(sweep_command)
    main_group.add_command(study_command)
    return main_group
