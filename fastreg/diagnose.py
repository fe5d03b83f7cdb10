"""Bias/variance diagnosis, after the overfitting guide's four cases.

With a baseline error (what a human or the best known system achieves; 0 by default):

    avoidable bias = train_error - baseline        variance = val_error - train_error

and a verdict from two documented thresholds, in the units of the errors (percent by
default): high bias when avoidable bias > bias_threshold (5 points), high variance when
variance > variance_threshold (5 points). On the guide's cases (errors in %, baseline 0):

    train 20,  val 22   bias 20,  variance 2    -> "high bias"
    train 1,   val 15   bias 1,   variance 14   -> "high variance"
    train 0.5, val 1    bias 0.5, variance 0.5  -> "neither"
    train 20,  val 30   bias 20,  variance 10   -> "high bias and high variance"

Any bias threshold in [1, 20) and variance threshold in [2, 10) reproduce these; 5 and 5 sit
well inside both ranges and read as "more than 5 percentage points".

model.diagnose / diagnose_model measure the errors on a model. metric="error" (classifiers):
the error rate in percent. metric="loss": the data loss in percent of the loss of the best
constant predictor fitted on the training targets (the mean for MSE, the class frequencies
for cross-entropy), so 0 is perfect, 100 is "learned nothing beyond the mean", and the same
5-point thresholds apply to any target scale (for MSE this is 100 * (1 - R^2)).
"""
from dataclasses import dataclass

import numpy as np

VERDICTS = ("high bias", "high variance", "high bias and high variance", "neither")
BIAS_THRESHOLD = 5.0
VARIANCE_THRESHOLD = 5.0

SUGGESTIONS = {
    "high bias": "underfitting: add capacity (wider or deeper layers), train longer, or "
                 "weaken the regularization (smaller L1/L2, lower dropout)",
    "high variance": "overfitting: strengthen the regularization (larger L2/L1, more "
                     "dropout, early stopping) or get more training data",
    "high bias and high variance": "first reduce the bias (more capacity, train longer), then "
                                   "regularize or add data to close the train/validation gap",
    "neither": "the model fits and generalizes: keep it (or try a smaller, cheaper one)",
}


@dataclass(frozen=True)
class Diagnosis:
    verdict: str
    train_error: float
    val_error: float
    baseline: float
    avoidable_bias: float
    variance: float
    high_bias: bool
    high_variance: bool
    suggestion: str
    bias_threshold: float = BIAS_THRESHOLD
    variance_threshold: float = VARIANCE_THRESHOLD
    unit: str = "%"

    def __str__(self):
        u = self.unit
        return (f"{self.verdict}: train {self.train_error:.4g}{u}, validation "
                f"{self.val_error:.4g}{u}, baseline {self.baseline:.4g}{u} -> avoidable bias "
                f"{self.avoidable_bias:.4g}{u} (threshold {self.bias_threshold:g}), variance "
                f"{self.variance:.4g}{u} (threshold {self.variance_threshold:g}). "
                f"Suggestion: {self.suggestion}.")

    def to_dict(self):
        return dict(self.__dict__)


def _number(name, value):
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number, got {value!r}") from exc
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def diagnose(train_error, val_error, baseline=0.0, bias_threshold=BIAS_THRESHOLD,
             variance_threshold=VARIANCE_THRESHOLD, unit="%"):
    """The guide's bias/variance verdict for a training and a validation error.

    Errors, baseline and thresholds share one unit (percent by default). Returns a
    Diagnosis with .verdict, .avoidable_bias (train - baseline), .variance (val - train) and
    .suggestion.
    """
    train = _number("train_error", train_error)
    val = _number("val_error", val_error)
    base = _number("baseline", baseline)
    bt = _number("bias_threshold", bias_threshold)
    vt = _number("variance_threshold", variance_threshold)
    if bt < 0 or vt < 0:
        raise ValueError("thresholds must be >= 0")
    bias, variance = train - base, val - train
    high_bias, high_var = bias > bt, variance > vt
    verdict = {(True, True): "high bias and high variance", (True, False): "high bias",
               (False, True): "high variance", (False, False): "neither"}[high_bias, high_var]
    return Diagnosis(verdict, train, val, base, bias, variance, high_bias, high_var,
                     SUGGESTIONS[verdict], bt, vt, unit)


# ------------------------------------------------------------------ on a model
def _error_rate(model, X, y):
    p = model.predict(X)
    y = np.asarray(y)
    if model.loss == "binary_crossentropy":
        pred = (p > 0.5).astype(np.int64).reshape(y.shape) if y.ndim == p.ndim \
            else (p[:, 0] > 0.5).astype(np.int64)
        return 100.0 * float(np.mean(pred.reshape(-1) != y.reshape(-1).astype(np.int64)))
    pred = np.argmax(p, axis=1)
    return 100.0 * float(np.mean(pred != y.reshape(-1).astype(np.int64)))


def _constant_loss(loss, y_fit, y_eval):
    """The data loss on y_eval of the best constant predictor fitted on y_fit."""
    y_fit = np.asarray(y_fit, np.float64)
    y_eval = np.asarray(y_eval, np.float64)
    if loss == "mse":
        yf = y_fit.reshape(len(y_fit), -1)
        ye = y_eval.reshape(len(y_eval), -1)
        return float(np.mean((ye - yf.mean(axis=0)) ** 2))
    eps = 1e-12
    if loss == "binary_crossentropy":
        p = np.clip(y_fit.mean(axis=0), eps, 1 - eps)
        ye = y_eval.reshape(len(y_eval), -1)
        return float(-np.mean(ye * np.log(p) + (1 - ye) * np.log(1 - p)))
    labels = y_fit.reshape(-1).astype(np.int64)
    freq = np.bincount(labels, minlength=int(max(labels.max(), y_eval.max())) + 1) + eps
    freq = freq / freq.sum()
    return float(-np.mean(np.log(freq[y_eval.reshape(-1).astype(np.int64)])))


def diagnose_model(model, X_tr, y_tr, X_val, y_val, baseline=0.0, metric="loss",
                   bias_threshold=BIAS_THRESHOLD, variance_threshold=VARIANCE_THRESHOLD):
    """model.diagnose(X_tr, y_tr, X_val, y_val, baseline=0.0, metric="loss").

    metric="error" (binary / sparse categorical cross-entropy models): error rates in
    percent. metric="loss": data losses in percent of the best constant predictor's loss
    (see the module docstring). baseline is in the same percent units.
    """
    if model.loss is None:
        raise RuntimeError("compile and fit the model before diagnosing it")
    if metric == "error":
        if model.loss == "mse":
            raise ValueError("metric='error' is for classifiers; use metric='loss' for an MSE "
                             "model")
        train, val = _error_rate(model, X_tr, y_tr), _error_rate(model, X_val, y_val)
    elif metric == "loss":
        ref_tr = _constant_loss(model.loss, y_tr, y_tr)
        ref_val = _constant_loss(model.loss, y_tr, y_val)
        if ref_tr <= 0 or ref_val <= 0:
            raise ValueError("the training targets are constant: a loss relative to the "
                             "constant predictor is undefined")
        train = 100.0 * model.evaluate(X_tr, y_tr) / ref_tr
        val = 100.0 * model.evaluate(X_val, y_val) / ref_val
    else:
        raise ValueError(f"metric must be 'loss' or 'error', got {metric!r}")
    return diagnose(train, val, baseline, bias_threshold, variance_threshold)
