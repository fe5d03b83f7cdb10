"""Input validation at the API boundary: one clear ValueError/TypeError per problem.

Nothing the user passed is modified: arrays are converted into new arrays when a conversion is
needed, and only read otherwise.
"""
import numpy as np

from .kernels import contract as C


def as_features(X, name="X", width=None, dtype=np.float32):
    """A C-contiguous 2-D float array (a copy only when needed), checked for NaN/inf."""
    if X is None:
        raise ValueError(f"{name} is None")
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be read as a numeric array: {exc}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == np.bool_):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {arr.shape}"
                         f"{_reshape_hint(arr, width)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if width is not None and arr.shape[1] != width:
        raise ValueError(f"{name} has {arr.shape[1]} features but the model expects {width}")
    out = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        kind = "NaN" if np.isnan(out[tuple(bad)]) else "inf"
        raise ValueError(f"{name} contains {kind} (first at row {bad[0]}, column {bad[1]}); "
                         f"clean or impute the data first")
    if out is arr:
        out = out.copy()  # the model never holds a view of the caller's data
    return out


def _reshape_hint(arr, width):
    """What a 1-D array most likely is, and the reshape that makes it 2-D."""
    if arr.ndim != 1:
        return ""
    one_sample = f"one sample of {arr.shape[0]} features: use X.reshape(1, -1)"
    one_feature = f"{arr.shape[0]} samples of one feature: use X.reshape(-1, 1)"
    if width is not None and width == arr.shape[0] and width != 1:
        return f"; it looks like {one_sample}"
    if width == 1:
        return f"; for {one_feature}"
    return f"; for {one_sample}, or for {one_feature}"


def as_targets(y, n_rows, loss, n_outputs, name="y", dtype=np.float32):
    """Targets as a (n, Ky) float array in the layout the loss kernels take."""
    if y is None:
        raise ValueError(f"{name} is None")
    arr = np.asarray(y)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == np.bool_):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0:1] != (n_rows,):
        raise ValueError(f"{name} has {arr.shape[0] if arr.ndim else 0} rows but X has {n_rows}")
    if loss == C.LOSS_SCE:
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"{name} for sparse_categorical_crossentropy must be integer labels "
                             f"of shape (n,), got shape {arr.shape}")
        if not np.isfinite(arr.astype(np.float64)).all():
            raise ValueError(f"{name} contains NaN or inf")
        if np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold integer class labels 0..{n_outputs - 1}")
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= n_outputs:
            raise ValueError(f"{name} has labels outside 0..{n_outputs - 1} (found {lo} to "
                             f"{hi}); the last Dense has {n_outputs} units")
        return np.ascontiguousarray(arr.reshape(-1, 1), dtype=dtype)
    kind = C.LOSS_BY_CODE[loss].targets
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}")
    if kind == "distributions" and arr.shape[1] != n_outputs:
        raise ValueError(f"{name} for categorical_crossentropy must be one-hot (or soft) rows "
                         f"of {n_outputs} columns, one per unit of the last Dense, got shape "
                         f"{arr.shape}; for integer labels use "
                         f"sparse_categorical_crossentropy")
    if arr.shape[1] != n_outputs:
        raise ValueError(f"{name} has {arr.shape[1]} columns but the last Dense has "
                         f"{n_outputs} units")
    out = np.array(arr, dtype=dtype, order="C", copy=True)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or inf")
    if kind in ("probabilities", "distributions") and (out.min() < 0 or out.max() > 1):
        raise ValueError(f"{name} for {C.LOSS_BY_CODE[loss].name} must lie in [0, 1], found "
                         f"values from {out.min()} to {out.max()}")
    if kind == "distributions":
        sums = out.sum(axis=1, dtype=np.float64)
        bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-3)
        if bad.size:
            raise ValueError(f"{name} for categorical_crossentropy must be rows of "
                             f"probabilities summing to 1 (one-hot or soft); row {bad[0]} sums "
                             f"to {sums[bad[0]]:.6g} ({bad.size} rows do not)")
    if kind == "counts" and out.min() < 0:
        raise ValueError(f"{name} for poisson must be counts or rates >= 0, found "
                         f"{out.min()}")
    return out


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
