"""The reference losses, from logits (contract.LOSS_TABLE): the batch mean and its gradient,
and what predict returns.

Shape legend: B batch rows, K outputs.

Every loss value is computed in float64 from the dtype's logits and targets; its gradient in
the dtype. `param` is the part's PF_LOSS_PARAM (the row's `param`: huber's delta, the
categorical losses' label smoothing); None means the row's default.
"""
import numpy as np

from .. import contract
from .activation import sigmoid


def loss_forward_backward(logits, y, grad, loss, param=None):
    """Mean loss of the batch (float); grad = d(mean loss)/d(logits) written in place.

    y is (B, K) targets for the elementwise losses and categorical_crossentropy (rows of
    probabilities); for sparse_categorical_crossentropy (B, 1) integer labels stored as
    floats, or (B, SCE_MIXED_WIDTH) mixed targets (label a, label b, lam: contract.py).
    """
    value, g = _loss_and_grad(logits, y, loss, loss_param(loss, param))
    grad[...] = g
    return value


def loss_value(logits, y, loss, param=None):
    return _loss_and_grad(logits, y, loss, loss_param(loss, param))[0]


def loss_param(loss, param):
    """The loss's parameter as a float: `param`, or the table's default when None."""
    return float(contract.LOSS_BY_CODE[int(loss)].default if param is None else param)


def _loss_and_grad(z, y, loss, param):
    B, K = z.shape
    dt = z.dtype.type
    if loss == contract.LOSS_SCE:
        return _sparse_categorical(z, y, param)
    if loss == contract.LOSS_CCE:
        return _categorical(z, y, param)
    c = dt(1.0 / (B * K))
    z64, y64 = z.astype(np.float64), y.astype(np.float64)
    if loss == contract.LOSS_MSE:
        diff = z - y
        return float(np.sum(diff.astype(np.float64) ** 2) / (B * K)), diff * dt(2.0 / (B * K))
    if loss == contract.LOSS_BCE:
        per = np.maximum(z64, 0) - z64 * y64 + np.log1p(np.exp(-np.abs(z64)))
        return float(per.sum() / (B * K)), (sigmoid(z) - y) * c
    if loss == contract.LOSS_POISSON:      # z is the log-rate: exp(z) - y z
        per = np.exp(z64) - y64 * z64
        return float(per.sum() / (B * K)), (np.exp(z) - y) * c
    d = z - y
    d64 = d.astype(np.float64)
    if loss == contract.LOSS_MAE:          # sign(0) = 0, as torch's L1Loss; NaN stays NaN
        return float(np.abs(d64).sum() / (B * K)), np.sign(d) * c
    if loss == contract.LOSS_HUBER:
        delta = dt(param)
        big = np.abs(d) > delta     # NaN is not big: its gradient stays NaN
        a64, delta64 = np.abs(d64), float(delta)
        per = np.where(big, delta64 * (a64 - 0.5 * delta64), 0.5 * d64 * d64)
        return float(per.sum() / (B * K)), np.where(big, np.sign(d) * delta, d) * c
    # log_cosh: |d| + log1p(exp(-2|d|)) - log 2, no overflow of cosh
    a64 = np.abs(d64)
    per = a64 + np.log1p(np.exp(-2.0 * a64)) - np.log(2.0)
    return float(per.sum() / (B * K)), np.tanh(d) * c


def _log_softmax_parts(z):
    """(softmax in the dtype, log-sum-exp per row in float64)."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    z64 = z.astype(np.float64)
    lse = np.log(np.exp(z64 - z64.max(axis=1, keepdims=True)).sum(axis=1)) + z64.max(axis=1)
    return p, lse


def smoothed(y, ls):
    """Targets t = (1 - ls) * y + ls / K in y's dtype (the coefficients rounded once);
    y itself when ls is 0."""
    if ls == 0:
        return y
    dt = y.dtype.type
    return y * dt(1.0 - ls) + dt(ls / y.shape[1])


def _categorical(z, y, ls):
    """Mean over rows of sum_k -t_k log softmax(z)_k, t the smoothed target rows: per row
    S * lse - sum_k t_k z_k (S = sum_k t_k, 1 for a distribution), gradient (p * S - t) / B
    (exactly p - t for one-hot rows without smoothing: S = 1)."""
    B = z.shape[0]
    dt = z.dtype.type
    t = smoothed(y, ls)
    p, lse = _log_softmax_parts(z)
    t64 = t.astype(np.float64)
    per = t64.sum(axis=1) * lse - (t64 * z.astype(np.float64)).sum(axis=1)
    S = t.sum(axis=1, keepdims=True, dtype=z.dtype)
    return float(per.sum() / B), (p * S - t) * dt(1.0 / B)


def _sparse_categorical(z, y, ls):
    """Sparse CE from labels (or Mixup's (label a, label b, lam)); with label smoothing ls
    the target row is (1 - ls) * onehot + ls / K: per row lse - (1 - ls) z_label
    - (ls / K) sum_k z_k, gradient p - (1 - ls) onehot - ls / K (in the dtype: p, minus
    ls / K everywhere, minus (1 - ls) [* lam] at the label[s])."""
    B, K = z.shape
    dt = z.dtype.type
    rows = np.arange(B)
    labels = y[:, contract.SCE_LABEL].astype(np.int64)
    p, lse = _log_softmax_parts(z)
    z64 = z.astype(np.float64)
    g = p
    mixed = y.shape[1] == contract.SCE_MIXED_WIDTH     # Mixup: lam * CE(a) + (1 - lam) * CE(b)
    if mixed:
        labels_b = y[:, contract.SCE_LABEL_B].astype(np.int64)
        lam = y[:, contract.SCE_LAM]
        lam64 = lam.astype(np.float64)
    if ls != 0:
        on64, off64 = 1.0 - ls, ls / K
        on, off = dt(on64), dt(off64)
        zsum = z64.sum(axis=1)
        g = g - off
        if mixed:
            per = lse - off64 * zsum - on64 * (lam64 * z64[rows, labels]
                                               + (1.0 - lam64) * z64[rows, labels_b])
            g[rows, labels] -= on * lam
            g[rows, labels_b] -= on * (dt(1) - lam)
        else:
            per = lse - off64 * zsum - on64 * z64[rows, labels]
            g[rows, labels] -= on
        return float(np.sum(per) / B), g * dt(1.0 / B)
    if mixed:
        per = lam64 * (lse - z64[rows, labels]) + (1.0 - lam64) * (lse - z64[rows, labels_b])
        g[rows, labels] -= lam
        g[rows, labels_b] -= dt(1) - lam
        return float(np.sum(per) / B), g * dt(1.0 / B)
    value = float(np.sum(lse - z64[rows, labels]) / B)
    g[rows, labels] -= 1
    return value, g * dt(1.0 / B)


def output_transform(logits, loss):
    """What predict returns (the row's `output`): probabilities for the cross-entropies, the
    rate exp(z) for poisson, the values themselves otherwise."""
    output = contract.LOSS_BY_CODE[int(loss)].output
    if output == "sigmoid":
        return sigmoid(logits)
    if output == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if output == "exp":
        return np.exp(logits)
    return logits
