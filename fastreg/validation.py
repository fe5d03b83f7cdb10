"""Input validation at the API boundary: one clear ValueError/TypeError per problem.

Nothing the user passed is modified. A number argument takes a Python or NumPy number
(np.float32(1e-3) as 1e-3, np.int64(8) as 8), never a bool; an array argument is only read:
fit trains on the caller's X itself when it is already C-contiguous in the model's dtype,
predict / evaluate convert X a chunk of rows at a time, and the finiteness checks run chunk
by chunk too, so no check holds a second array the size of X.
"""
import math
import numbers
import operator

import numpy as np

from .kernels import contract

# Rows per chunk of a check or a conversion: about CHUNK_BYTES of the converted rows.
CHUNK_BYTES = 1 << 20
# BLAS takes 32-bit dimensions: a layer or input wider than this cannot be multiplied.
MAX_WIDTH = 2 ** 31 - 1


# ---------------------------------------------------------------- numbers
def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def _range_text(minimum, maximum):
    if maximum is None:
        return f"an integer >= {minimum}"
    if minimum is None:
        return f"an integer <= {maximum}"
    return f"an integer in [{minimum}, {maximum}]"


def check_int(name, value, minimum=None, maximum=None, what=None):
    """A Python or NumPy integer (not a bool) in [minimum, maximum], as an int."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {what or 'an integer'}, got {value!r}")
    v = operator.index(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be {what or _range_text(minimum, maximum)}, got "
                         f"{value!r}")
    return v


def check_positive_int(name, value):
    return check_int(name, value, 1, what="a positive integer")


def check_width(name, value):
    """A layer or input width: a positive integer BLAS can take."""
    return check_int(name, value, 1, MAX_WIDTH,
                     what="a positive integer below 2**31 (BLAS takes 32-bit dimensions)")


def check_seed(name, value):
    return check_int(name, value, 0, 2 ** 64 - 1, what="an integer in [0, 2**64)")


def check_real(name, value, minimum=None, maximum=None, min_open=False, max_open=False,
               error=ValueError):
    """A finite Python or NumPy real number (not a bool, not complex) in the given range, as
    a float. min_open / max_open exclude the bound; error: the exception for a value that is
    not a number at all (ValueError, or TypeError where the API has always raised that)."""
    if maximum is None and minimum is None:
        text = ""
    elif maximum is None:
        text = f"{'>' if min_open else '>='} {minimum:g}"
    elif minimum is None:
        text = f"{'<' if max_open else '<='} {maximum:g}"
    else:
        text = (f"in {'(' if min_open else '['}{minimum:g}, {maximum:g}"
                f"{')' if max_open else ']'}")
    finite = f"a finite number{' ' + text if text else ''}"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be {finite}, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {finite}, got {value!r}")
    low_bad = minimum is not None and (v < minimum or (min_open and v == minimum))
    high_bad = maximum is not None and (v > maximum or (max_open and v == maximum))
    if low_bad or high_bad:
        raise ValueError(f"{name} must be {text}, got {value!r}")
    return v


def check_in_dtype(name, value, dtype, positive=True, below_one=False):
    """A hyperparameter as the kernels see it, rounded once to the model dtype: it must stay
    finite there (and > 0, or < 1, where asked). Returns value."""
    dt = np.dtype(dtype)
    with np.errstate(over="ignore", under="ignore"):
        rounded = dt.type(value)
    if not np.isfinite(rounded):
        raise ValueError(f"{name} {value!r} overflows to inf in {dt.name}: use a value below "
                         f"{float(np.finfo(dt).max):g}")
    if positive and not rounded > 0:
        raise ValueError(f"{name} {value!r} rounds to 0 in {dt.name}, the dtype the kernels "
                         f"compute in: use at least {float(np.finfo(dt).smallest_subnormal):g} "
                         f"(or dtype='float64')")
    if below_one and not rounded < 1:
        below = float(np.nextafter(dt.type(1), dt.type(0)))
        raise ValueError(f"{name} {value!r} rounds to 1 in {dt.name}, the dtype the kernels "
                         f"compute in: use a value below {below:.9g}")
    return value


def check_verbose(verbose):
    if _is_bool(verbose) or not isinstance(verbose, numbers.Integral) \
            or int(verbose) not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    return int(verbose)


def check_batch_size(batch_size):
    """None or a positive integer (any size: a batch of more rows than X has is all rows)."""
    return None if batch_size is None else check_positive_int("batch_size", batch_size)


# ---------------------------------------------------------------- arrays
def _numeric_array(X, name):
    """X as an ndarray without copying (subclasses such as np.memmap become plain views),
    refusing what is not a real numeric array."""
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
    return arr


def as_sample_weight(w, n_rows, name="sample_weight"):
    """fit's sample_weight: one finite number >= 0 per row ((n,) or (n, 1)), as float64."""
    arr = _numeric_array(w, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one weight per row), got shape {arr.shape}")
    if arr.shape[0] != n_rows:
        raise ValueError(f"{name} has {arr.shape[0]} weights but X has {n_rows} rows")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (arr < 0).any():
        raise ValueError(f"{name} must be >= 0 (a row's weight in the loss), found "
                         f"{arr.min():g}")
    return np.ascontiguousarray(arr)


def class_sample_weight(class_weight, Y, family, n_outputs):
    """The per-row weights of fit's class_weight={label: weight} (Keras): each row weighs
    the weight of its class (missing labels weigh 1). Y: the validated targets (a label
    column for sparse_categorical_crossentropy, one-hot or soft rows for the categorical one
    (the class: argmax), 0/1 for a one-output binary_crossentropy)."""
    from . import metrics
    if not isinstance(class_weight, dict):
        raise TypeError(f"class_weight must be a dict {{label: weight}}, got "
                        f"{type(class_weight).__name__}")
    if family == metrics.REGRESSION:
        raise ValueError("class_weight needs a classification loss; for a regression loss "
                         "pass sample_weight")
    if family == metrics.BINARY and n_outputs != 1:
        raise ValueError("class_weight is defined for one output; a multi-label "
                         "binary_crossentropy model takes sample_weight")
    n_classes = 2 if family == metrics.BINARY else n_outputs
    table = np.ones(n_classes)
    for label, weight in class_weight.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
                or not 0 <= label < n_classes:
            raise ValueError(f"class_weight has the label {label!r}; the labels are "
                             f"0..{n_classes - 1}")
        table[int(label)] = check_real(f"class_weight[{label!r}]", weight, 0.0)
    if family == metrics.CATEGORICAL:
        labels = np.argmax(Y, axis=1)
    else:
        labels = np.rint(Y[:, 0]).astype(np.int64)
        if family == metrics.BINARY and not np.isin(labels, (0, 1)).all():
            raise ValueError("class_weight with binary_crossentropy needs 0/1 targets")
    return table[labels]


def chunk_rows(width, dtype):
    """Rows of a (rows, width) chunk of about CHUNK_BYTES in dtype."""
    return max(1, CHUNK_BYTES // max(1, int(width) * np.dtype(dtype).itemsize))


def as_chunk(arr, start, stop, dtype):
    """Rows [start, stop) of arr as a C-contiguous array of dtype (a view when they already
    are one)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(arr[start:stop], dtype=dtype)


def _check_finite(chunk, name, row0):
    if np.isfinite(chunk).all():
        return
    bad = np.argwhere(~np.isfinite(chunk))[0]
    kind = "NaN" if np.isnan(chunk[tuple(bad)]) else "inf"
    raise ValueError(f"{name} contains {kind} (first at row {row0 + bad[0]}, column {bad[1]}); "
                     f"clean or impute the data first")


def feature_source(X, name="X", width=None, dtype=np.float32, hint=""):
    """A 2-D real array of the right width, read in place (not converted, not copied), with
    every value finite once converted to dtype (checked a chunk of rows at a time). hint:
    what a wrong width error adds (an input-pruned model's columns)."""
    arr = _numeric_array(X, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {arr.shape}"
                         f"{_reshape_hint(arr, width)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if width is not None and arr.shape[1] != width:
        raise ValueError(f"{name} has {arr.shape[1]} features but the model expects {width}"
                         f"{hint}")
    rows = chunk_rows(arr.shape[1], dtype)
    for start in range(0, arr.shape[0], rows):
        _check_finite(as_chunk(arr, start, start + rows, dtype), name, start)
    return arr


def as_features(X, name="X", width=None, dtype=np.float32, hint=""):
    """A C-contiguous 2-D array of dtype, checked for NaN/inf: the caller's array itself when
    it already is one (read, never written: an np.memmap then trains out of core), else one
    converted copy."""
    arr = feature_source(X, name, width, dtype, hint)
    if arr.dtype == np.dtype(dtype) and arr.flags.c_contiguous:
        return arr
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(arr, dtype=dtype)


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
    """Targets as a (n, Ky) float array in the layout the loss kernels take (converted; the
    kernels only read it)."""
    if y is None:
        raise ValueError(f"{name} is None")
    arr = np.asarray(y)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == np.bool_):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):    # its imaginary part would be dropped
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.shape[0:1] != (n_rows,):
        raise ValueError(f"{name} has {arr.shape[0] if arr.ndim else 0} rows but X has {n_rows}")
    if loss == contract.LOSS_SCE:
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
    kind = contract.LOSS_BY_CODE[loss].targets
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
    with np.errstate(over="ignore", invalid="ignore"):    # an overflow is refused below
        out = np.array(arr, dtype=dtype, order="C", copy=True)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or inf")
    if kind in ("probabilities", "distributions") and (out.min() < 0 or out.max() > 1):
        raise ValueError(f"{name} for {contract.LOSS_BY_CODE[loss].name} must lie in [0, 1], found "
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
