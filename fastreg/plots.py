"""Seeing what regularization does, part 2: figures (matplotlib, the `plot` extra).

Every function returns a matplotlib Figure and, given path=, also writes it as a PNG.
Figures are made with the object-oriented API (matplotlib.figure.Figure, rendered by Agg),
never through pyplot's global state: they work without a display, do not pile up in a
long sweep, and still show inline in Jupyter when returned.

- loss_curves(histories): train (solid) and validation (dashed) loss per epoch, one colour
  per model, the penalty term in its own panel.
- predictions(models, X, y): a 1-D problem's data and each model's prediction curve.
- param_kde(models): the distribution of each model's kernel weights as a Gaussian kernel
  density estimate (scipy.stats.gaussian_kde): how L2 squeezes theta toward 0 and dropout
  keeps it wide.
- sweep_plot(table, x, y): a metric against a swept parameter (curves, one per `hue`
  value), or a heat map over two parameters.
"""
import io
import math
import os

import numpy as np

DPI = 100


def _matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("fastreg's plots need matplotlib: pip install \"fastreg[plot]\"") \
            from exc
    if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND") \
            and "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use("Agg")  # no display: never try an interactive backend
    from matplotlib.figure import Figure
    return matplotlib, Figure


def _finish(fig, path, dpi=DPI):
    fig.tight_layout()
    if path is not None:
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, format="png")
        data = _palette_png(buf.getvalue())
        with open(path, "wb") as f:
            f.write(data)
    return fig


def _palette_png(data):
    """Line art needs no more than 256 colours: an adaptive palette makes the PNG about 3x
    smaller with no visible change. Falls back to the original without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return data
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG",
                                                                   optimize=True)
    small = out.getvalue()
    return small if len(small) < len(data) else data


def _colors(n, cmap="viridis"):
    matplotlib, _ = _matplotlib()
    cm = matplotlib.colormaps[cmap]
    if n == 1:
        return [cm(0.6)]
    return [cm(0.3 + 0.65 * i / (n - 1)) for i in range(n)]


def _labels(items, labels):
    if labels is None:
        if isinstance(items, dict):
            return [str(k) for k in items]
        return [f"model {i}" for i in range(len(items))]
    labels = [str(v) for v in labels]
    if len(labels) != len(items):
        raise ValueError(f"got {len(labels)} labels for {len(items)} items")
    return labels


def _as_list(items):
    if isinstance(items, dict) and not _is_history_dict(items):
        return list(items.values())
    if isinstance(items, (list, tuple)):
        return list(items)
    return [items]


# ------------------------------------------------------------------ loss curves
def _is_history_dict(obj):
    return isinstance(obj, dict) and "loss" in obj and isinstance(obj["loss"], (list, tuple,
                                                                                np.ndarray))


def _history_dict(obj):
    """History, Sequential (its last fit) or history dict -> {"loss": [...], ...}."""
    if _is_history_dict(obj):
        return obj
    hist = getattr(obj, "history", None)
    if _is_history_dict(hist):
        return hist
    if hist is not None and _is_history_dict(getattr(hist, "history", None)):
        return hist.history
    raise TypeError(f"expected a History, a fitted Sequential or a history dict, got "
                    f"{type(obj).__name__}")


def loss_curves(histories, labels=None, path=None, log=True, penalty=True, title=None,
                cmap="viridis", dpi=DPI):
    """Training (solid) and validation (dashed) loss per epoch; the penalty in a second panel.

    histories: one History / fitted Sequential / history dict, a list of them, or a dict
    {label: history}. Loss panel: one solid line per model, plus a dashed one when it has
    val_loss. Penalty panel (penalty=True and some model has a penalty > 0): one line per
    model with a nonzero penalty.
    """
    _, Figure = _matplotlib()
    items = _as_list(histories)
    keyed = isinstance(histories, dict) and not _is_history_dict(histories)
    labels = _labels(histories if keyed else items, labels)
    hs = [_history_dict(h) for h in items]
    has_pen = penalty and any(np.any(np.asarray(h.get("penalty", [0])) > 0) for h in hs)
    fig = Figure(figsize=(10 if has_pen else 6.5, 4.2))
    axes = fig.subplots(1, 2 if has_pen else 1, squeeze=False)[0]
    ax = axes[0]
    colors = _colors(len(hs), cmap)
    for h, lab, c in zip(hs, labels, colors):
        epochs = np.arange(1, len(h["loss"]) + 1)
        ax.plot(epochs, h["loss"], color=c, lw=1.5, label=f"{lab} train")
        if h.get("val_loss"):
            ax.plot(epochs, h["val_loss"], color=c, lw=1.2, ls="--", label=f"{lab} val")
    all_loss = np.concatenate([np.asarray(h["loss"], float) for h in hs] +
                              [np.asarray(h.get("val_loss", []), float) for h in hs])
    if log and all_loss.size and np.all(all_loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("data loss" + (" (log)" if ax.get_yscale() == "log" else ""))
    ax.set_title(title or "training (solid) and validation (dashed) loss")
    ax.legend(fontsize=7, ncol=2 if len(hs) > 4 else 1)
    ax.grid(alpha=0.3)
    if has_pen:
        ax2 = axes[1]
        pens = []
        for h, lab, c in zip(hs, labels, colors):
            p = np.asarray(h.get("penalty", []), float)
            if p.size and np.any(p > 0):
                ax2.plot(np.arange(1, p.size + 1), p, color=c, lw=1.5, label=lab)
                pens.append(p)
        allp = np.concatenate(pens)
        if log and np.all(allp > 0):
            ax2.set_yscale("log")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("penalty term")
        ax2.set_title("regularization penalty")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    return _finish(fig, path, dpi)


# ------------------------------------------------------------------ predictions
def _predict_curve(m, xs):
    if hasattr(m, "predict"):
        return np.asarray(m.predict(xs.reshape(-1, 1)), float)[:, 0]
    arr = np.asarray(m, float).reshape(-1)
    if arr.size != xs.size:
        raise ValueError(f"a prediction array has {arr.size} values for {xs.size} points")
    return arr


def predictions(models, X, y, labels=None, path=None, X_plot=None, panels=None,
                max_points=2000, seed=0, title=None, cmap="viridis", dpi=DPI):
    """A 1-D problem's data (grey points) and each model's predictions (one line each).

    models: fitted models (or arrays of predictions at X_plot), a list or {label: model}.
    X_plot: where to draw the curves (default: 400 points across the data's range).
    panels: one stacked panel per model (the study's layout; default when more than 3
    models), else all curves on one axes.
    """
    _, Figure = _matplotlib()
    X = np.asarray(X, float)
    if X.ndim == 2 and X.shape[1] != 1 or X.ndim > 2:
        raise ValueError(f"predictions() draws 1-D problems; X has shape {X.shape}")
    x = X.reshape(-1)
    yv = np.asarray(y, float).reshape(len(x), -1)[:, 0]
    ms = _as_list(models)
    labels = _labels(models if isinstance(models, dict) else ms, labels)
    xs = np.linspace(x.min(), x.max(), 400) if X_plot is None \
        else np.asarray(X_plot, float).reshape(-1)
    order = np.argsort(xs)
    xs = xs[order]
    curves = []
    for m in ms:
        c = _predict_curve(m, xs)
        curves.append(c if X_plot is None else c[order])
    if len(x) > max_points:
        idx = np.random.default_rng(seed).choice(len(x), max_points, replace=False)
        xd, yd = x[idx], yv[idx]
    else:
        xd, yd = x, yv
    panels = len(ms) > 3 if panels is None else bool(panels)
    colors = _colors(len(ms), cmap)
    if panels:
        ncols = 2 if len(ms) > 4 else 1
        nrows = math.ceil(len(ms) / ncols)
        fig = Figure(figsize=(6 * ncols, 1.9 * nrows + 0.6))
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).reshape(-1)
        for ax, c, lab, col in zip(axes, curves, labels, colors):
            ax.scatter(xd, yd, s=2, color="0.7", rasterized=True)
            ax.plot(xs, c, color=col, lw=1.8)
            ax.set_title(lab, fontsize=9, loc="left")
        for ax in axes[len(ms):]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
    else:
        fig = Figure(figsize=(7, 4.2))
        ax = fig.subplots()
        ax.scatter(xd, yd, s=2, color="0.7", label="data", rasterized=True)
        for c, lab, col in zip(curves, labels, colors):
            ax.plot(xs, c, color=col, lw=1.8, label=lab)
        ax.legend(fontsize=8)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(title or "predictions against the data")
    return _finish(fig, path, dpi)


# ------------------------------------------------------------------ parameter KDE
def parameters_of(model, include_biases=False):
    """All kernel weights (and biases if asked) of a model, or of a [W0, b0, ...] list, as
    one flat float64 vector."""
    if hasattr(model, "_network"):     # a model (with BatchNorm, not [W0, b0, ...])
        net = model._network
        chosen = net.kernels() + (net.biases() if include_biases else [])
    else:
        weights = model.get_weights() if hasattr(model, "get_weights") else list(model)
        chosen = weights if include_biases else weights[::2]
    return np.concatenate([np.asarray(w, np.float64).reshape(-1) for w in chosen])


def param_kde(models, labels=None, path=None, include_biases=False, init=None, grid=None,
              points=1024, ylim=None, magnitude=False, title=None, cmap="viridis", dpi=DPI):
    """Gaussian KDEs of each model's parameters (kernels; biases with include_biases=True).

    models: fitted models or [W0, b0, ...] weight lists, a list or {label: model}.
    init: optionally the weights before training (drawn grey, dashed, as "init").
    One line per model (a vertical line for a model whose parameters are all equal). Peaks
    much taller than the rest are truncated (ylim=None picks the cut), as in the study.
    magnitude=True adds a second panel: the KDE of log10|θ| over the nonzero parameters,
    which shows shrinkage spanning orders of magnitude (one line per model).
    """
    from scipy.stats import gaussian_kde
    _, Figure = _matplotlib()
    ms = _as_list(models)
    labels = _labels(models if isinstance(models, dict) else ms, labels)
    thetas = [parameters_of(m, include_biases) for m in ms]
    if init is not None:
        thetas.append(parameters_of(init, include_biases))
        labels = labels + ["init"]
    if grid is None:
        lo = min(np.percentile(t, 0.5) for t in thetas)
        hi = max(np.percentile(t, 99.5) for t in thetas)
        span = max(hi - lo, 1e-6)
        grid = np.linspace(lo - 0.1 * span, hi + 0.1 * span, points)
    grid = np.asarray(grid, float)
    fig = Figure(figsize=(12, 4.2) if magnitude else (7, 4.2))
    axes = fig.subplots(1, 2 if magnitude else 1, squeeze=False)[0]
    ax = axes[0]
    colors = _colors(len(ms), cmap) + (["0.45"] if init is not None else [])
    peaks = []
    for t, lab, col in zip(thetas, labels, colors):
        ls = "--" if (init is not None and lab == "init" and col == "0.45") else "-"
        sd = float(np.std(t))
        if sd < 1e-12 * max(1.0, float(np.max(np.abs(t)))):
            ax.axvline(float(t[0]), color=col, lw=1.8, ls=ls, label=f"{lab} (all {t[0]:.3g})")
            continue
        try:
            dens = gaussian_kde(t)(grid)
        except np.linalg.LinAlgError:  # numerically degenerate: a spike
            ax.axvline(float(np.median(t)), color=col, lw=1.8, ls=ls, label=lab)
            continue
        peaks.append(float(dens.max()))
        ax.plot(grid, dens, color=col, lw=1.6, ls=ls, label=f"{lab} (sd {sd:.3g})")
    truncated = False
    if ylim is not None:
        ax.set_ylim(*ylim)
    elif peaks:
        cap = 8.0 * min(peaks)  # the widest distribution stays readable
        if max(peaks) > cap:
            ax.set_ylim(0, cap)
            truncated = True
        else:
            ax.set_ylim(0, 1.05 * max(peaks))
    ax.set_xlabel("parameter value θ" + (" (kernels and biases)" if include_biases
                                         else " (kernel weights)"))
    ax.set_ylabel("density")
    ax.set_title((title or "parameter distribution (KDE)") +
                 (" — peaks truncated" if truncated else ""))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if magnitude:
        _magnitude_panel(axes[1], thetas, labels, colors, init is not None, gaussian_kde)
    return _finish(fig, path, dpi)


def _magnitude_panel(ax, thetas, labels, colors, has_init, gaussian_kde):
    logs = [np.log10(np.abs(t[t != 0])) for t in thetas]
    finite = [v for v in logs if v.size > 1 and np.std(v) > 0]
    if not finite:
        return
    lo = min(np.percentile(v, 0.5) for v in finite)
    hi = max(np.percentile(v, 99.5) for v in finite)
    grid = np.linspace(lo - 0.5, hi + 0.5, 512)
    for v, lab, col in zip(logs, labels, colors):
        if v.size < 2 or np.std(v) == 0:
            continue
        ls = "--" if (has_init and lab == "init") else "-"
        ax.plot(grid, gaussian_kde(v)(grid), color=col, lw=1.6, ls=ls, label=lab)
    ax.set_xlabel("log10 |θ| (nonzero parameters)")
    ax.set_ylabel("density")
    ax.set_title("magnitudes: how far toward 0")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


# ------------------------------------------------------------------ sweeps
def _rows(table):
    if hasattr(table, "to_dict"):
        return table.to_dict("records")
    return [dict(r) for r in table]


def _scale_for(values):
    v = np.asarray(values, float)
    pos = v[v > 0]
    if pos.size < 2 or np.any(v < 0) or pos.max() / pos.min() < 50:
        return "linear", None
    return ("log", None) if pos.size == v.size else ("symlog", float(pos.min()))


def sweep_plot(table, x, y="best_val_loss", hue=None, kind="curve", path=None, logy=True,
               title=None, cmap="viridis", dpi=DPI):
    """A sweep table drawn against the parameter `x`.

    kind="curve": one line per metric in `y` (a name or a list) and per value of `hue`.
    kind="heatmap": `y` (one metric) over the grid of `x` (columns) and `hue` (rows), with
    the values written in the cells; a missing combination is left blank.
    """
    _, Figure = _matplotlib()
    rows = _rows(table)
    if not rows:
        raise ValueError("the sweep table is empty")
    ys = [y] if isinstance(y, str) else list(y)
    for col in [x] + ys + ([hue] if hue else []):
        if col not in rows[0]:
            raise ValueError(f"no column {col!r} in the sweep table; columns: "
                             f"{list(rows[0])}")
    if kind == "heatmap":
        if hue is None or len(ys) != 1:
            raise ValueError("a heat map needs hue= (the second parameter) and one metric y")
        xv = sorted({r[x] for r in rows})
        hv = sorted({r[hue] for r in rows})
        Z = np.full((len(hv), len(xv)), np.nan)
        for r in rows:
            Z[hv.index(r[hue]), xv.index(r[x])] = r[ys[0]]
        fig = Figure(figsize=(1.1 * len(xv) + 2.5, 0.6 * len(hv) + 2.0))
        ax = fig.subplots()
        data = np.log10(Z) if logy and np.all(Z[np.isfinite(Z)] > 0) else Z
        im = ax.imshow(data, cmap=cmap + "_r" if not cmap.endswith("_r") else cmap,
                       aspect="auto", origin="lower")
        ax.set_xticks(range(len(xv)), [f"{v:g}" if isinstance(v, float) else str(v)
                                       for v in xv])
        ax.set_yticks(range(len(hv)), [f"{v:g}" if isinstance(v, float) else str(v)
                                       for v in hv])
        for i in range(len(hv)):
            for j in range(len(xv)):
                if np.isfinite(Z[i, j]):
                    ax.text(j, i, f"{Z[i, j]:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if data[i, j] > np.nanmean(data) else "black")
        fig.colorbar(im, ax=ax, label=("log10 " if data is not Z else "") + ys[0])
        ax.set_xlabel(x)
        ax.set_ylabel(hue)
        ax.set_title(title or f"{ys[0]} over {x} × {hue}")
        return _finish(fig, path, dpi)
    if kind != "curve":
        raise ValueError(f"kind must be 'curve' or 'heatmap', got {kind!r}")
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    groups = sorted({r[hue] for r in rows}) if hue else [None]
    styles = ["-", "--", ":", "-."]
    colors = _colors(len(groups), cmap)
    for gi, g in enumerate(groups):
        sub = sorted([r for r in rows if hue is None or r[hue] == g], key=lambda r: r[x])
        xs = [r[x] for r in sub]
        for yi, col in enumerate(ys):
            lab = col if hue is None else f"{col}, {hue}={g}"
            ax.plot(xs, [r[col] for r in sub], marker="o", ms=4, color=colors[gi],
                    ls=styles[yi % len(styles)], label=lab)
    scale, linthresh = _scale_for([r[x] for r in rows])
    if scale == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh)
    elif scale == "log":
        ax.set_xscale("log")
    vals = np.array([r[c] for r in rows for c in ys], float)
    if logy and np.all(vals[np.isfinite(vals)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ys[0] if len(ys) == 1 else "value")
    ax.set_title(title or f"sweep over {x}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _finish(fig, path, dpi)
