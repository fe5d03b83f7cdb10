"""Metrics: `compile(metrics=[...])`, reported per epoch in History (``accuracy``,
``val_accuracy``, ...), by `evaluate(..., return_dict=True)`, and monitorable by the callbacks.

A metric is a function of (y_true, y_pred) -> float on what the model already has: y_true in
the model's target layout (a column of integer labels for sparse_categorical_crossentropy,
one-hot or soft rows for categorical_crossentropy, values in [0, 1] for binary_crossentropy,
values for the regression losses) and y_pred what `predict` returns (probabilities for the
cross-entropies). The values equal scikit-learn's on the same predictions:

==========  =================================================================================
accuracy    binary_crossentropy: the fraction of outputs on the right side of 0.5 (Keras'
            binary_accuracy: over all labels of a multi-label model); the categorical losses:
            argmax == label (accuracy_score). Not defined for the regression losses.
precision,  one output (binary): of the positive class (prediction >= 0.5, target >= 0.5);
recall, f1  multi-label: micro, over all labels flattened (Keras' flattening); multiclass:
            macro (the unweighted mean over the classes, scikit-learn's average="macro").
auc         ROC AUC: binary; multiclass one-vs-rest macro; multi-label macro over the labels
            (roc_auc_score's defaults). Ties count one half (the trapezoid rule).
mae, mse    mean absolute / squared error over all outputs.
r2          r2_score with multioutput="uniform_average" (a constant target: 1 when predicted
            exactly, else 0, as scikit-learn's force_finite).
==========  =================================================================================

Metrics are not weighted by sample_weight (Keras' `metrics=`; its `weighted_metrics` is not
offered). A callable f(y_true, y_pred) -> float is reported under its __name__.
"""
import numpy as np

# the loss families metrics look at (fastreg/losses.py names the losses; here only their
# target layout matters)
REGRESSION = "regression"
BINARY = "binary"            # binary_crossentropy: probabilities, one per output
SPARSE = "sparse"            # integer labels in one column
CATEGORICAL = "categorical"  # one-hot / soft target rows

_FAMILY = {"mse": REGRESSION, "mae": REGRESSION, "huber": REGRESSION, "log_cosh": REGRESSION,
           "poisson": REGRESSION, "binary_crossentropy": BINARY,
           "sparse_categorical_crossentropy": SPARSE, "categorical_crossentropy": CATEGORICAL}


def loss_family(loss_name):
    """The target layout of a loss name (REGRESSION, BINARY, SPARSE or CATEGORICAL)."""
    return _FAMILY.get(loss_name, REGRESSION)


# ---------------------------------------------------------------- classification helpers
def _labels(y_true, y_pred, family):
    """(true labels, predicted labels) as integer arrays for the categorical families."""
    pred = np.argmax(y_pred, axis=1)
    if family == SPARSE:
        return np.asarray(y_true).reshape(-1).astype(np.int64), pred
    return np.argmax(y_true, axis=1), pred


def _binary(y_true, y_pred):
    """Flattened (true, predicted) booleans at the 0.5 threshold."""
    return (np.asarray(y_true).reshape(-1) >= 0.5), (np.asarray(y_pred).reshape(-1) >= 0.5)


def accuracy(y_true, y_pred, family):
    if family == BINARY:
        t, p = _binary(y_true, y_pred)
        return float(np.mean(t == p))
    if family in (SPARSE, CATEGORICAL):
        t, p = _labels(y_true, y_pred, family)
        return float(np.mean(t == p))
    raise ValueError("the 'accuracy' metric needs a classification loss (binary_crossentropy, "
                     "categorical_crossentropy, sparse_categorical_crossentropy); for a "
                     "regression loss use 'mae', 'mse' or 'r2'")


def _counts(t, p):
    tp = float(np.sum(t & p))
    return tp, float(np.sum(~t & p)), float(np.sum(t & ~p))


def _ratio(num, den):
    # scikit-learn's zero_division="warn" value, without the warning: 0 when undefined
    return num / den if den > 0 else 0.0


def _per_class(y_true, y_pred, family, score):
    """score(tp, fp, fn) for the binary / multi-label case (positive class, or micro over the
    flattened labels) or the macro mean over the classes of a categorical one."""
    if family == BINARY:
        return score(*_counts(*_binary(y_true, y_pred)))
    if family in (SPARSE, CATEGORICAL):
        t, p = _labels(y_true, y_pred, family)
        classes = np.union1d(t, p)      # scikit-learn's labels: those present in either
        return float(np.mean([score(*_counts(t == c, p == c)) for c in classes]))
    raise ValueError("precision, recall and f1 need a classification loss")


def precision(y_true, y_pred, family):
    return _per_class(y_true, y_pred, family, lambda tp, fp, fn: _ratio(tp, tp + fp))


def recall(y_true, y_pred, family):
    return _per_class(y_true, y_pred, family, lambda tp, fp, fn: _ratio(tp, tp + fn))


def f1(y_true, y_pred, family):
    return _per_class(y_true, y_pred, family, lambda tp, fp, fn: _ratio(2 * tp, 2 * tp + fp + fn))


def _binary_auc(positive, score):
    """ROC AUC of scores for a boolean target: the Mann-Whitney statistic with ties counted
    one half (average ranks), which is the area under the trapezoidal ROC curve."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc is not defined when y_true holds one class only")
    score = np.asarray(score, np.float64)
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(score.size, np.float64)
    # average rank (1-based) over each run of equal scores
    edges = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [score.size]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc(y_true, y_pred, family):
    y_pred = np.asarray(y_pred, np.float64)
    if family == BINARY:
        y_true = np.asarray(y_true)
        if y_pred.shape[1] == 1:
            return _binary_auc(y_true.reshape(-1) >= 0.5, y_pred[:, 0])
        return float(np.mean([_binary_auc(y_true[:, k] >= 0.5, y_pred[:, k])
                              for k in range(y_pred.shape[1])]))
    if family in (SPARSE, CATEGORICAL):
        t, _ = _labels(y_true, y_pred, family)
        present = np.unique(t)
        if present.size < 2:
            raise ValueError("auc is not defined when y_true holds one class only")
        if y_pred.shape[1] == 2:        # two classes: scikit-learn scores the second
            return _binary_auc(t == 1, y_pred[:, 1])
        return float(np.mean([_binary_auc(t == c, y_pred[:, c]) for c in present]))
    raise ValueError("auc needs a classification loss")


def _values(y_true, y_pred):
    t = np.asarray(y_true, np.float64)
    p = np.asarray(y_pred, np.float64)
    return t.reshape(p.shape), p


def mae(y_true, y_pred, family):
    t, p = _values(y_true, y_pred)
    return float(np.mean(np.abs(t - p)))


def mse(y_true, y_pred, family):
    t, p = _values(y_true, y_pred)
    return float(np.mean((t - p) ** 2))


def r2(y_true, y_pred, family):
    t, p = _values(y_true, y_pred)
    ss_res = ((t - p) ** 2).sum(axis=0)
    ss_tot = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    scores = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0),
                      np.where(ss_res == 0, 1.0, 0.0))
    return float(np.mean(scores))


BUILT_IN = {"accuracy": accuracy, "acc": accuracy, "precision": precision, "recall": recall,
            "f1": f1, "f1_score": f1, "auc": auc, "mae": mae, "mean_absolute_error": mae,
            "mse": mse, "mean_squared_error": mse, "r2": r2}
# the name each is reported under (History keys, evaluate's dict)
REPORTED = {"acc": "accuracy", "f1_score": "f1", "mean_absolute_error": "mae",
            "mean_squared_error": "mse"}
# names the model reports itself: a metric may not take them
RESERVED = ("loss", "penalty", "lr", "learning_rate")


class Metric:
    """One compiled metric: its reported `name` and fn(y_true, y_pred) -> float."""

    def __init__(self, name, fn, family=None):
        self.name = name
        self._fn = fn
        self._family = family

    def __call__(self, y_true, y_pred):
        if self._family is None:        # a user's callable
            value = self._fn(y_true, y_pred)
        else:
            value = self._fn(y_true, y_pred, self._family)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {self.name!r} must return a number, got "
                            f"{type(value).__name__}") from None

    def __repr__(self):
        return f"Metric({self.name!r})"


def resolve(metrics, loss_name):
    """[Metric] for compile(metrics=...): names and callables, checked against the loss (a
    classification metric on a regression loss is an error now, not at the first epoch)."""
    if metrics is None:
        return []
    if isinstance(metrics, (str, bytes)) or callable(metrics):
        metrics = [metrics]
    try:
        items = list(metrics)
    except TypeError:
        raise TypeError(f"metrics must be a list of metric names or callables, got "
                        f"{type(metrics).__name__}") from None
    family = loss_family(loss_name)
    out, seen = [], set()
    for item in items:
        if isinstance(item, str):
            key = item.lower()
            if key not in BUILT_IN:
                raise ValueError(f"unknown metric {item!r}; choose one of "
                                 f"{sorted(set(BUILT_IN) - set(REPORTED))} or pass a callable "
                                 f"f(y_true, y_pred) -> float")
            fn = BUILT_IN[key]
            if fn in (accuracy, precision, recall, f1, auc) and family == REGRESSION:
                raise ValueError(f"metric {item!r} needs a classification loss; the loss is "
                                 f"{loss_name!r} (use 'mae', 'mse' or 'r2')")
            metric = Metric(REPORTED.get(key, key), fn, family)
        elif callable(item):
            name = getattr(item, "__name__", None) or type(item).__name__
            if name == "<lambda>":
                raise ValueError("a metric callable needs a name (a def, or set its "
                                 "__name__); a lambda would be reported as '<lambda>'")
            metric = Metric(name, item)
        else:
            raise TypeError(f"a metric must be a name or a callable, got {item!r}")
        if metric.name in RESERVED or metric.name.startswith("val_"):
            raise ValueError(f"metric name {metric.name!r} is taken by what fit reports")
        if metric.name in seen:
            raise ValueError(f"metric {metric.name!r} is given twice")
        seen.add(metric.name)
        out.append(metric)
    return out


def names(metrics):
    """The configs that recreate metrics (saved with the model): built-in names; a callable
    cannot be saved and is dropped, as Keras asks for custom_objects."""
    return [m.name for m in metrics if m._family is not None]


__all__ = ["accuracy", "precision", "recall", "f1", "auc", "mae", "mse", "r2", "resolve",
           "Metric", "loss_family"]
