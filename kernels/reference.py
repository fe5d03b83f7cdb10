"""The reference backend: NumPy, float32 or float64. The readable spec and the test oracle.

Shape legend: B batch rows, I fan_in, O fan_out, K outputs.
Forward and backward of each operation sit side by side. Outputs are preallocated by the
caller and written in place; an empty array (size 0) means "not present" (no bias, no dx).
"""
import math

import numpy as np

from . import contract as C
from . import driver
from .philox import (STREAM_DROPOUT, STREAM_INPUT_DROPOUT, STREAM_INPUT_NOISE, STREAM_NOISE,
                     keep_mask, standard_normals)

NAME = "numpy"


# ---------------------------------------------------------------- activations
def activation(z, act, slope):
    """f(z) for an activation code."""
    if act == C.ACT_RELU:
        return np.maximum(z, 0)
    if act == C.ACT_LEAKY_RELU:
        return np.where(z > 0, z, z * z.dtype.type(slope))
    if act == C.ACT_TANH:
        return np.tanh(z)
    if act == C.ACT_SIGMOID:
        return sigmoid(z)
    return z


def activation_grad_from_output(a, act, slope):
    """f'(z) written in terms of a = f(z): backward needs only the stored output."""
    one = a.dtype.type(1)
    if act == C.ACT_RELU:
        return (a > 0).astype(a.dtype)
    if act == C.ACT_LEAKY_RELU:
        return np.where(a > 0, one, a.dtype.type(slope))
    if act == C.ACT_TANH:
        return one - a * a
    if act == C.ACT_SIGMOID:
        return a * (one - a)
    return np.ones_like(a)


def sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype)


# ---------------------------------------------------------------- Gaussian noise
def noise_values(shape, dtype, seed, step, layer, stream):
    """Standard normals of `shape` (row-major element order), rounded once to dtype."""
    n = int(np.prod(shape))
    return standard_normals(n, seed, step, layer, stream).astype(dtype).reshape(shape)


def noise_factor(std, nrm, dtype):
    """1 + std * n, GaussianDropout's multiplier, in the working dtype."""
    return dtype.type(1) + dtype.type(std) * nrm


def apply_noise(a, noise, std, seed, step, layer, stream):
    """NOISE_ADD: a + std * n; NOISE_MUL: a * (1 + std * n); in a's dtype, n rounded first."""
    if noise == C.NOISE_NONE:
        return a
    nrm = noise_values(a.shape, a.dtype, seed, step, layer, stream)
    if noise == C.NOISE_ADD:
        return a + a.dtype.type(std) * nrm
    return a * noise_factor(std, nrm, a.dtype)


needs_pre = driver.needs_pre


# ---------------------------------------------------------------- dense layer
def dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    """out = dropout(noise(f(x @ W + b))): what backward keeps (B*O values), and with noise
    and a nonlinear f also pre = f(x @ W + b) (needs_pre).

    Noise (stream STREAM_NOISE) comes after the activation and before the dropout: a Keras
    list Dense(activation), GaussianNoise, Dropout. It is training-only: inference passes
    noise = NOISE_NONE.
    """
    z = x @ W
    if b.size:
        z += b
    output_epilogue(activation(z, act, slope), out, drop_threshold, drop_scale, seed, step,
                    layer, noise, noise_std, pre)


def output_epilogue(a, out, drop_threshold, drop_scale, seed, step, layer, noise, noise_std,
                    pre):
    """out = dropout(noise(a)) for the activation a = f(.) of a dense layer (plain or
    BatchNorm); with noise, pre = a first (when pre is given and not empty)."""
    if noise != C.NOISE_NONE:
        if pre is not None and pre.size:
            pre[...] = a
        a = apply_noise(a, noise, noise_std, seed, step, layer, STREAM_NOISE)
    if drop_threshold > 0:
        keep = keep_mask(a.shape, drop_threshold, seed, step, layer, STREAM_DROPOUT)
        a = np.where(keep, a * a.dtype.type(drop_scale), a.dtype.type(0))
    out[...] = a


def output_epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed, step,
                             layer, noise, noise_std, pre):
    """dL/d(f's input) from grad = dL/d(out): output_epilogue and f undone, a new array.

    The dropout mask is regenerated from Philox, never stored. f' comes from the output:
    a = out / scale for kept units (dropped units have zero gradient whatever f' is).
    With noise, f' comes from pre (the kept f(.); f' = 1 for a linear layer) and, for
    NOISE_MUL, the factor 1 + std * n is regenerated: ((g * scale) * (1 + std*n)) * f'.
    """
    scale = out.dtype.type(drop_scale)
    if noise != C.NOISE_NONE:
        d = grad * scale if drop_threshold > 0 else grad
        if noise == C.NOISE_MUL:
            nrm = noise_values(out.shape, out.dtype, seed, step, layer, STREAM_NOISE)
            d = d * noise_factor(noise_std, nrm, out.dtype)
        if act != C.ACT_LINEAR:
            d = d * activation_grad_from_output(pre, act, slope)
        if drop_threshold > 0:
            keep = keep_mask(out.shape, drop_threshold, seed, step, layer, STREAM_DROPOUT)
            d = np.where(keep, d, out.dtype.type(0))
        return d
    if drop_threshold > 0:
        keep = keep_mask(out.shape, drop_threshold, seed, step, layer, STREAM_DROPOUT)
        a = out / scale if act in (C.ACT_TANH, C.ACT_SIGMOID) else out
        return np.where(keep, (grad * scale) * activation_grad_from_output(a, act, slope),
                        out.dtype.type(0))
    return grad * activation_grad_from_output(out, act, slope)


def dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    """grad (B, O) holds dL/d(out) on entry and dL/dz on exit; dW, db, dx written.

    dz comes from output_epilogue_backward (mask, noise factor and f' regenerated or read
    from out / pre); then db = column sums, dW = x.T @ dz, dx = dz @ W.T.
    """
    dz = output_epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed,
                                  step, layer, noise, noise_std, pre)
    grad[...] = dz
    if db.size:
        db[...] = dz.sum(axis=0)
    dW[...] = x.T @ dz
    if dx.size:
        dx[...] = dz @ W.T


# ---------------------------------------------------------------- dense + BatchNorm (training)
def bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    """out = dropout(noise(f(gamma * zhat + beta))), zhat = (z - mean) / sqrt(var + eps),
    z = x @ W + b, with the batch mean and biased variance of every unit (Ioffe & Szegedy
    2015). The noise, dropout and pre are dense_forward's (output_epilogue).

    The statistics are summed in float64 in row order (mean first, then the squared
    deviations); inv_std = 1 / sqrt(var + eps) in float64; mean and inv_std are rounded once
    to the dtype, and zhat, y, f(y) are computed in the dtype. Writes out, xhat (zhat: what
    backward needs besides out) and save (mean, var, inv_std). The running statistics are
    not touched here: bn_dense_backward updates them once the step's loss is known finite.
    """
    dt = out.dtype.type
    n = x.shape[0]
    z = x @ W
    if b.size:
        z += b
    z64 = z.astype(np.float64)
    mean = z64.sum(axis=0) / n
    var = ((z64 - mean) ** 2).sum(axis=0) / n
    inv = (1.0 / np.sqrt(var + float(dt(eps)))).astype(out.dtype)
    save[C.BN_SAVE_MEAN] = mean
    save[C.BN_SAVE_VAR] = var
    save[C.BN_SAVE_INVSTD] = inv
    xh = (z - mean.astype(out.dtype)) * inv
    xhat[...] = xh
    output_epilogue(activation(gb[C.BN_GAMMA] * xh + gb[C.BN_BETA], act, slope), out,
                    drop_threshold, drop_scale, seed, step, layer, noise, noise_std, pre)


def bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer,
                      noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    """The BatchNorm dense layer's backward, through the batch statistics.

    grad (B, O) holds dL/d(out) on entry and dL/dz on exit. dy = dL/d(gamma zhat + beta) comes
    from out (or pre, with noise) and the regenerated mask and noise exactly as in
    dense_backward (output_epilogue_backward); then, per unit, in float64
    in row order: dbeta = sum dy, dgamma = sum dy * zhat, and
        dz = c1 * ((dy - c2) - zhat * c3),  c1 = gamma * inv_std, c2 = dbeta / B, c3 = dgamma / B
    (c1, c2, c3 rounded once to the dtype). db is exactly 0: the output does not depend on b
    (the batch mean absorbs it). dgb = (dgamma, dbeta); dW, dx as in dense_backward. Last, the
    running statistics: stats = momentum * stats + (1 - momentum) * (batch mean, biased batch
    variance), in float64, rounded to the dtype (Keras' convention).
    """
    dt = out.dtype.type
    n = grad.shape[0]
    dy = output_epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed,
                                  step, layer, noise, noise_std, pre)
    dy64 = dy.astype(np.float64)
    s1 = dy64.sum(axis=0)
    s2 = (dy64 * xhat.astype(np.float64)).sum(axis=0)
    dgb[C.BN_GAMMA] = s2
    dgb[C.BN_BETA] = s1
    c1 = (gb[C.BN_GAMMA].astype(np.float64) * save[C.BN_SAVE_INVSTD]).astype(out.dtype)
    c2 = (s1 / n).astype(out.dtype)
    c3 = (s2 / n).astype(out.dtype)
    dz = c1 * ((dy - c2) - xhat * c3)
    grad[...] = dz
    if db.size:
        db[...] = 0
    dW[...] = x.T @ dz
    if dx.size:
        dx[...] = dz @ W.T
    mom = float(dt(momentum))
    for row, srow in ((C.BN_MEAN, C.BN_SAVE_MEAN), (C.BN_VAR, C.BN_SAVE_VAR)):
        stats[row] = mom * stats[row].astype(np.float64) + (1.0 - mom) * save[srow]


def input_dropout(x, out, threshold, scale, seed, step, layer, noise=C.NOISE_NONE,
                  noise_std=0.0):
    """out = dropout(noise(x)) on a layer's input (standalone Dropout / GaussianNoise /
    GaussianDropout layers before the first Dense); noise on stream STREAM_INPUT_NOISE."""
    v = apply_noise(x, noise, noise_std, seed, step, layer, STREAM_INPUT_NOISE)
    if threshold > 0:
        keep = keep_mask(x.shape, threshold, seed, step, layer, STREAM_INPUT_DROPOUT)
        v = np.where(keep, v * x.dtype.type(scale), x.dtype.type(0))
    out[...] = v


# ---------------------------------------------------------------- losses (from logits)
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


# ---------------------------------------------------------------- penalized update
def update_coefficients(hp, opt, t, dtype):
    """Every scalar the fused update needs, computed once in float64, rounded to dtype.

    Returns (lr, b1, omb1, b2, omb2, eps, l1, l2, decay, step_size, bc2_sqrt, lr_l1, maxnorm).
    Bias corrections follow PyTorch: step_size = lr / (1 - b1**t), denominator
    sqrt(v) / sqrt(1 - b2**t) + eps; AdamW multiplies w by (1 - lr * wd) first.
    """
    lr, b1, b2 = hp[C.HP_LR], hp[C.HP_BETA1], hp[C.HP_BETA2]
    if opt == C.OPT_SGD:
        step_size, bc2_sqrt = lr, 1.0
    else:
        step_size = lr / (1.0 - b1 ** float(t))
        bc2_sqrt = math.sqrt(1.0 - b2 ** float(t))
    decay = 1.0 - lr * hp[C.HP_DECOUPLED] if opt == C.OPT_ADAMW else 1.0
    vals = (lr, b1, 1.0 - b1, b2, 1.0 - b2, hp[C.HP_EPS], hp[C.HP_L1], hp[C.HP_L2], decay,
            step_size, bc2_sqrt, lr * hp[C.HP_L1], hp[C.HP_MAXNORM])
    return tuple(dtype(v) for v in vals)


def column_norms(w):
    """The L2 norm of every column of a matrix (every unit's incoming weights), in float64."""
    return np.sqrt((w.astype(np.float64) ** 2).sum(axis=0))


def penalty_value(w, hp):
    """l1 * sum|w| + l2 / 2 * sum w^2 (+ group * sum_j ||w[:, j]|| for a matrix), in float64."""
    w64 = w.astype(np.float64)
    pen = float(hp[C.HP_L1] * np.abs(w64).sum() + 0.5 * hp[C.HP_L2] * (w64 * w64).sum())
    if hp[C.HP_GROUP] > 0 and w.ndim == 2:
        pen += float(hp[C.HP_GROUP] * column_norms(w).sum())
    return pen


def group_prox(w, tau):
    """Block soft-thresholding of every column: w_j <- w_j * max(0, 1 - tau_j / ||w_j||).

    The proximal map of tau_j * ||w_j|| (tau a scalar or one value per column): a column
    whose norm is at most tau_j becomes exactly zero (the unit is dead), the others shrink
    toward zero along their own direction. The scale is computed in float64 and rounded to
    the parameter dtype before it multiplies.
    """
    norms = column_norms(w)
    tau = np.broadcast_to(np.asarray(tau, np.float64), norms.shape)
    alive = norms > tau
    scale = np.zeros_like(norms)
    scale[alive] = 1.0 - tau[alive] / norms[alive]
    w *= scale.astype(w.dtype)


def group_thresholds(v, hp, opt, step_size, bc2_sqrt, eps):
    """The block-prox threshold of every column for group strength hp[HP_GROUP].

    SGD: lr * group. Adam/AdamW: the prox is taken in the column's mean Adam metric,
    group * step_size / mean_i(sqrt(v_ij) / bc2_sqrt + eps), the block analogue of taking the
    L1 threshold in Adam's per-coordinate metric (an exact block prox in a diagonal metric
    has no closed form). A unit whose gradients are small relative to the penalty then dies,
    as with SGD; with the Euclidean threshold lr * group, Adam's normalised steps would keep
    every unit alive. Everything in float64 from the dtype-rounded coefficients, summed over
    rows in order, so every backend computes the same thresholds.
    """
    group = float(hp[C.HP_GROUP])
    if opt == C.OPT_SGD:
        return float(hp[C.HP_LR]) * group
    den = (np.sqrt(v.astype(np.float64)) / float(bc2_sqrt) + float(eps)).sum(axis=0)
    return group * float(step_size) / (den / v.shape[0])


def penalized_update(w, g, m, v, hp, opt, t):
    """One fused step of one parameter tensor; returns the penalty of w before the step.

    g is the data gradient. The L2 gradient (and the L1 subgradient when not proximal) is
    added here, then the optimizer step, then the L1 proximal shrink, the group-lasso block
    shrink (group_thresholds) and the max-norm projection. t is the 1-based optimizer step.
    m / v are empty when not needed.
    """
    dt = w.dtype.type
    lr, b1, omb1, b2, omb2, eps, l1, l2, decay, step_size, bc2_sqrt, lr_l1, maxnorm = \
        update_coefficients(hp, opt, t, dt)
    proximal = hp[C.HP_PROXIMAL] != 0
    penalty = penalty_value(w, hp)
    ge = g.copy()
    if l2 != 0:
        ge = ge + l2 * w
    if l1 != 0 and not proximal:
        ge = ge + l1 * np.sign(w)
    if opt == C.OPT_SGD:
        if m.size:
            m[...] = m * b1 + ge
            d = ge + b1 * m if hp[C.HP_NESTEROV] != 0 else m
        else:
            d = ge
        w -= lr * d
        tau = lr_l1
    else:
        if opt == C.OPT_ADAMW:
            w *= decay
        m[...] = m + omb1 * (ge - m)
        v[...] = v * b2 + (omb2 * ge) * ge
        denom = np.sqrt(v) / bc2_sqrt + eps
        w -= step_size * (m / denom)
        tau = lr_l1 / denom
    if l1 != 0 and proximal:
        w[...] = np.sign(w) * np.maximum(np.abs(w) - tau, dt(0))
    if hp[C.HP_GROUP] > 0 and w.ndim == 2:
        group_prox(w, group_thresholds(v, hp, opt, step_size, bc2_sqrt, eps))
    c = hp[C.HP_MAXNORM]
    if c > 0 and w.ndim == 2:
        norms = np.sqrt((w.astype(np.float64) ** 2).sum(axis=0))
        over = norms > c
        w[:, over] *= (c / norms[over]).astype(w.dtype)
    return penalty


# ---------------------------------------------------------------- epoch / inference entry
def train_epoch(net, X, Y, perm, batch_size, step0, t0):
    """One epoch through the Python driver over these kernels (the spec of an epoch)."""
    return driver.train_epoch(_SELF, net, X, Y, perm, batch_size, step0, t0)


def forward_inference(net, X, batch_size):
    return driver.forward_inference(_SELF, net, X, batch_size)


_SELF = __import__("sys").modules[__name__]
