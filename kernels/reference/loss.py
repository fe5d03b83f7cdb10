"""The reference losses, from logits (contract.LOSS_TABLE): the batch mean and its gradient,
and what predict returns.

Shape legend: B batch rows, K outputs.
"""
import numpy as np

from .. import contract as C
from .epilogue import sigmoid


def loss_forward_backward(logits, y, grad, loss):
    """Mean loss of the batch (float); grad = d(mean loss)/d(logits) written in place.

    y is (B, K) targets for mse / binary_crossentropy; for sparse_categorical_crossentropy
    (B, 1) integer labels stored as floats, or (B, SCE_MIXED_WIDTH) mixed targets (label a,
    label b, lam: contract.py).
    """
    value, g = _loss_and_grad(logits, y, loss)
    grad[...] = g
    return value


def loss_value(logits, y, loss):
    return _loss_and_grad(logits, y, loss)[0]


def _loss_and_grad(z, y, loss):
    B, K = z.shape
    dt = z.dtype.type
    if loss == C.LOSS_MSE:
        diff = z - y
        return float(np.sum(diff.astype(np.float64) ** 2) / (B * K)), diff * dt(2.0 / (B * K))
    if loss == C.LOSS_BCE:
        z64 = z.astype(np.float64)
        per = np.maximum(z64, 0) - z64 * y + np.log1p(np.exp(-np.abs(z64)))
        return float(per.sum() / (B * K)), (sigmoid(z) - y) * dt(1.0 / (B * K))
    rows = np.arange(B)
    labels = y[:, C.SCE_LABEL].astype(np.int64)
    zmax = z.max(axis=1, keepdims=True)
    e = np.exp(z - zmax)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    z64 = z.astype(np.float64)
    lse = np.log(np.exp(z64 - z64.max(axis=1, keepdims=True)).sum(axis=1)) + z64.max(axis=1)
    g = p
    if y.shape[1] == C.SCE_MIXED_WIDTH:     # Mixup: lam * CE(a) + (1 - lam) * CE(b)
        labels_b = y[:, C.SCE_LABEL_B].astype(np.int64)
        lam = y[:, C.SCE_LAM]
        lam64 = lam.astype(np.float64)
        per = lam64 * (lse - z64[rows, labels]) + (1.0 - lam64) * (lse - z64[rows, labels_b])
        g[rows, labels] -= lam
        g[rows, labels_b] -= dt(1) - lam
        return float(np.sum(per) / B), g * dt(1.0 / B)
    value = float(np.sum(lse - z64[rows, labels]) / B)
    g[rows, labels] -= 1
    return value, g * dt(1.0 / B)


def output_transform(logits, loss):
    """What predict returns: probabilities for the cross-entropies, the values for mse."""
    if loss == C.LOSS_BCE:
        return sigmoid(logits)
    if loss == C.LOSS_SCE:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return logits
