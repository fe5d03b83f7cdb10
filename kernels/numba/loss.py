"""The Numba losses, from logits (twin of kernels/reference/loss.py): the batch mean in
float64 and its gradient in the dtype, one pass over the logits. `param` is the part's
PF_LOSS_PARAM (huber's delta, the categorical losses' label smoothing).

Each loss is its own kernel; `loss_of(uses, loss, ...)` is a ladder over the loss codes a
network uses (jit.specialized, `uses` from jit.uses_of) that calls the loss with its code as a
compile-time constant, so a network compiles its own loss only (every loss in one function
cost about 5 s of a cold compile, mostly for losses the network did not have).

Shape legend: B batch rows, K outputs.
"""
import math

import numpy as np

from .. import contract
from .activation import sigmoid
from .jit import by_code, kernel, kernel_inline, specialized, uses_of


@kernel_inline
def _sign(d):
    """np.sign: -1, 0 or 1, NaN for NaN."""
    if d > 0:
        return type(d)(1)
    if d < 0:
        return type(d)(-1)
    return d * type(d)(0)


@kernel
def _elementwise(z, y, grad, loss, param, want_grad):
    """mae, huber, log_cosh, poisson: the mean over B * K elements (reference _loss_and_grad)."""
    B, K = z.shape
    c = z.dtype.type(1.0 / (B * K))
    delta = z.dtype.type(param)
    delta64 = np.float64(delta)
    total = 0.0
    for i in range(B):
        for k in range(K):
            if loss == contract.LOSS_POISSON:      # z the log-rate: exp(z) - y z
                zz = np.float64(z[i, k])
                total += math.exp(zz) - np.float64(y[i, k]) * zz
                if want_grad:
                    grad[i, k] = (np.exp(z[i, k]) - y[i, k]) * c
                continue
            d = z[i, k] - y[i, k]
            a64 = abs(np.float64(d))
            if loss == contract.LOSS_MAE:
                total += a64
                if want_grad:
                    grad[i, k] = _sign(d) * c
            elif loss == contract.LOSS_HUBER:
                if abs(d) > delta:          # NaN is not: its gradient stays NaN
                    total += delta64 * (a64 - 0.5 * delta64)
                    if want_grad:
                        grad[i, k] = (_sign(d) * delta) * c
                else:
                    total += 0.5 * np.float64(d) * np.float64(d)
                    if want_grad:
                        grad[i, k] = d * c
            else:                           # log_cosh
                total += a64 + math.log1p(math.exp(-2.0 * a64)) - math.log(2.0)
                if want_grad:
                    grad[i, k] = np.tanh(d) * c
    return total / (B * K)


@kernel_inline
def _row_lse(z, i):
    """Row i of the logits: (zmax, the dtype's sum of exp(z - zmax) that the softmax gradient
    divides by, the float64 log-sum-exp the loss uses)."""
    K = z.shape[1]
    zmax = z[i, 0]
    for k in range(1, K):
        if z[i, k] > zmax:
            zmax = z[i, k]
    s = z.dtype.type(0)
    s64 = 0.0
    for k in range(K):
        s += np.exp(z[i, k] - zmax)
        s64 += math.exp(np.float64(z[i, k]) - np.float64(zmax))
    return zmax, s, math.log(s64) + np.float64(zmax)


@kernel
def _categorical(z, y, grad, ls, want_grad):
    """categorical_crossentropy from target rows t = (1 - ls) y + ls / K (y itself when ls
    is 0): per row S lse - sum t z, gradient (p S - t) / B (reference _categorical)."""
    B, K = z.shape
    dt = z.dtype.type
    c = dt(1.0 / B)
    on = dt(1.0 - ls)
    off = dt(ls / K)
    smooth = ls != 0
    total = 0.0
    for i in range(B):
        zmax, s, lse = _row_lse(z, i)
        S = dt(0)
        S64 = 0.0
        tz64 = 0.0
        for k in range(K):
            t = y[i, k] * on + off if smooth else y[i, k]
            S += t
            S64 += np.float64(t)
            tz64 += np.float64(t) * np.float64(z[i, k])
        total += S64 * lse - tz64
        if want_grad:
            for k in range(K):
                t = y[i, k] * on + off if smooth else y[i, k]
                p = np.exp(z[i, k] - zmax) / s
                grad[i, k] = (p * S - t) * c
    return total / B


@kernel
def _sparse_smoothed(z, y, grad, ls, want_grad):
    """sparse_categorical_crossentropy with label smoothing ls > 0 (and Mixup's mixed
    targets): reference _sparse_categorical's smoothed branch."""
    B, K = z.shape
    dt = z.dtype.type
    c = dt(1.0 / B)
    on64 = 1.0 - ls
    off64 = ls / K
    on = dt(on64)
    off = dt(off64)
    mixed = y.shape[1] == contract.SCE_MIXED_WIDTH
    total = 0.0
    for i in range(B):
        label = int(y[i, contract.SCE_LABEL])
        label_b = label
        lam = dt(1)
        if mixed:
            label_b = int(y[i, contract.SCE_LABEL_B])
            lam = y[i, contract.SCE_LAM]
        zmax, s, lse = _row_lse(z, i)
        zsum = 0.0
        for k in range(K):
            zsum += np.float64(z[i, k])
        if mixed:
            lam64 = np.float64(lam)
            total += lse - off64 * zsum - on64 * (lam64 * np.float64(z[i, label])
                                                  + (1.0 - lam64) * np.float64(z[i, label_b]))
        else:
            total += lse - off64 * zsum - on64 * np.float64(z[i, label])
        if want_grad:
            for k in range(K):
                p = np.exp(z[i, k] - zmax) / s - off
                if mixed:
                    if k == label:
                        p = p - on * lam
                    if k == label_b:
                        p = p - on * (dt(1) - lam)
                elif k == label:
                    p = p - on
                grad[i, k] = p * c
    return total / B


@kernel
def _mse(z, y, grad, want_grad):
    B, K = z.shape
    total = 0.0
    c = z.dtype.type(2.0 / (B * K))
    for i in range(B):
        for k in range(K):
            d = z[i, k] - y[i, k]
            total += np.float64(d) * np.float64(d)
            if want_grad:
                grad[i, k] = d * c
    return total / (B * K)


@kernel
def _bce(z, y, grad, want_grad):
    B, K = z.shape
    total = 0.0
    c = z.dtype.type(1.0 / (B * K))
    for i in range(B):
        for k in range(K):
            zz = np.float64(z[i, k])
            total += max(zz, 0.0) - zz * y[i, k] + math.log1p(math.exp(-abs(zz)))
            if want_grad:
                grad[i, k] = (sigmoid(z[i, k]) - y[i, k]) * c
    return total / (B * K)


@kernel
def _sparse(z, y, grad, param, want_grad):
    """sparse_categorical_crossentropy (with label smoothing: _sparse_smoothed)."""
    if param != 0:
        return _sparse_smoothed(z, y, grad, param, want_grad)
    B, K = z.shape
    total = 0.0
    c = z.dtype.type(1.0 / B)
    mixed = y.shape[1] == contract.SCE_MIXED_WIDTH    # Mixup: lam * CE(a) + (1 - lam) * CE(b)
    for i in range(B):
        label = int(y[i, contract.SCE_LABEL])
        zmax, s, lse = _row_lse(z, i)
        if mixed:
            label_b = int(y[i, contract.SCE_LABEL_B])
            lam64 = np.float64(y[i, contract.SCE_LAM])
            total += (lam64 * (lse - np.float64(z[i, label]))
                      + (1.0 - lam64) * (lse - np.float64(z[i, label_b])))
            if want_grad:
                # in float64, as the one-column path below (Numba promotes its p - 1): with
                # lam = 1 (or 0) the gradient is that path's, bit for bit
                lam_b64 = 1.0 - lam64
                for k in range(K):
                    p = np.exp(z[i, k] - zmax) / s
                    if k == label:
                        p = p - lam64
                    if k == label_b:
                        p = p - lam_b64
                    grad[i, k] = p * c
            continue
        total += lse - np.float64(z[i, label])
        if want_grad:
            for k in range(K):
                p = np.exp(z[i, k] - zmax) / s
                if k == label:
                    p = p - 1
                grad[i, k] = p * c
    return total / B




def _loss_kind(z, loss, y, grad, param, want_grad):
    """The loss of code `loss` (a compile-time constant: jit.by_code picks its case)."""
    raise NotImplementedError("a Numba loss runs in compiled code only")


def _mse_case(z, loss, y, grad, param, want_grad):
    return _mse(z, y, grad, want_grad)


def _bce_case(z, loss, y, grad, param, want_grad):
    return _bce(z, y, grad, want_grad)


def _sparse_case(z, loss, y, grad, param, want_grad):
    return _sparse(z, y, grad, param, want_grad)


def _categorical_case(z, loss, y, grad, param, want_grad):
    return _categorical(z, y, grad, param, want_grad)


def _elementwise_case(z, loss, y, grad, param, want_grad):
    return _elementwise(z, y, grad, loss, param, want_grad)


by_code(_loss_kind, {contract.LOSS_MSE: _mse_case, contract.LOSS_BCE: _bce_case,
                     contract.LOSS_SCE: _sparse_case, contract.LOSS_CCE: _categorical_case,
                     **{code: _elementwise_case for code in (
                         contract.LOSS_MAE, contract.LOSS_HUBER, contract.LOSS_LOG_COSH,
                         contract.LOSS_POISSON)}})


@kernel_inline
def _loss_loop(z, y, grad, param, want_grad, loss):
    return _loss_kind(z, loss, y, grad, param, want_grad)


# loss_of(uses, loss, z, y, grad, param, want_grad): the mean batch loss (float64); grad =
# d(mean)/dz written when want_grad. y is (B, Ky): Ky = K but for sparse_categorical_
# crossentropy: 1 (labels) or SCE_MIXED_WIDTH (label a, label b, lam: lam * CE(a) + (1 - lam)
# * CE(b)). A code not in `uses` gives NaN.
loss_of = specialized(_loss_loop, returns=True)


def loss_uses(codes):
    """The `uses` tuple of a set of loss codes (for loss_of)."""
    return uses_of(codes, max(contract.LOSS_BY_CODE) + 1)


@kernel
def weighted_loss_forward_backward(uses, z, y, grad, loss, param, Y, perm, start, wcol):
    """The batch loss with the sample weights in column wcol of Y (rows perm[start:start+B]):
    sum_r w_r l_r / B, each row's gradient times w_r / B (reference
    weighted_loss_forward_backward: every loss is a mean over rows)."""
    B = z.shape[0]
    total = 0.0
    for r in range(B):
        w = np.float64(Y[perm[start + r], wcol])
        total += w * loss_of(uses, loss, z[r:r + 1], y[r:r + 1], grad[r:r + 1], param, True)
        scale = grad.dtype.type(w / B)
        for k in range(grad.shape[1]):
            grad[r, k] *= scale
    return total / B
